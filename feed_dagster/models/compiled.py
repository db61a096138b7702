"""The ranker's candidate blocks compiled with `torch.compile`, for long scoring runs.

With d_model 64 the candidate forward is bound by passes over memory: layer norms, the
softmax over the context keys, GELU and residual adds each stream the activations once.
Inductor fuses them into a few loops around the matmuls. Compiling costs about 25 s the
first time on a machine (its cache, in the system temp directory, keeps the result) and a
few seconds in each new process after that, so only runs scoring many users compile: a
feed shard of `m` (6,250 users), not one of the demo world (750) or a test's.

FEED_RANKER_COMPILE=1 compiles whatever the size, =0 never; unset decides by size. A machine
without a C compiler, or any compile error, falls back to the uncompiled blocks, with a
warning: the scores are the same within float rounding either way (tested).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

COMPILE_ENV = "FEED_RANKER_COMPILE"
# Users per scoring run from which compiling pays for itself (see the module docstring).
COMPILE_MIN_USERS = 4_000


def worth_compiling(users: int) -> bool:
    """Whether a run scoring `users` users should compile the ranker (FEED_RANKER_COMPILE
    overrides: 1 always, 0 never)."""
    mode = os.environ.get(COMPILE_ENV, "").strip()
    if mode in ("0", "1"):
        return mode == "1"
    if mode:
        raise ValueError(f"{COMPILE_ENV} must be 0, 1 or unset, not {mode!r}")
    return users >= COMPILE_MIN_USERS


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
