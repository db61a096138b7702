"""The ranker's candidate blocks compiled with `torch.compile`, on request.

With d_model 64 the candidate forward is bound by passes over memory: layer norms, the
softmax over the context keys, GELU and residual adds each stream the activations once.
Inductor fuses them into a few loops around the matmuls. On this 2-core machine
(`bench/bench_feeds.py`, demo world, one torch thread) the forward took 1.13x less time and
a whole feed run 1.06x; two processes side by side, as feed shards run, gained 1.01x, less
than the compile costs: about 25 s the first time on a machine (its cache, in the system
temp directory, keeps the result) and a few seconds in each new process after that. So
feed runs compile only when FEED_DAGSTER_COMPILE_RANKER=1, e.g. on a machine with more cores per
shard. Any compile error (a machine without a C compiler, say) falls back to the
uncompiled blocks, with a warning: the scores are the same within float rounding either
way (tested).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

COMPILE_ENV = "FEED_DAGSTER_COMPILE_RANKER"


def compile_requested() -> bool:
    """Whether feed runs compile the ranker: FEED_DAGSTER_COMPILE_RANKER=1 (0 or unset: no)."""
    mode = os.environ.get(COMPILE_ENV, "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or unset, not {mode!r}")
    return mode == "1"


class CompiledBlocks:
    """`model.candidate_blocks` compiled for fixed shapes (callers pad the last pass), or
    the uncompiled method after the first failure to compile."""

    def __init__(self, model: torch.nn.Module):
        import torch._inductor.config as inductor

        # Compile in this process: the default pool of compile workers is a process per
        # core, each holding torch (hundreds of MB) beside two feed shards' 4.5 GiB each.
        inductor.compile_threads = 1
        self.model = model
        self.compiled = torch.compile(model.candidate_blocks, dynamic=False)
        self.failed: str | None = None

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.failed is None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: score uncompiled
                self.failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
                warnings.warn(
                    f"the ranker could not be compiled ({self.failed}); scoring uncompiled",
                    stacklevel=2,
                )
        return self.model.candidate_blocks(*args)
