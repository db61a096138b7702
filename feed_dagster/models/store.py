"""A versioned model store on a filesystem: safetensors weights + JSON, no pickle.

Layout: `<root>/<name>/<version>/{model.safetensors, config.json, metrics.json}` and a
promotion pointer `<root>/<name>/PROMOTED` holding one version string. The version is a
content hash of the weights and config, so saving the same model twice is a no-op and a
version string always means the same bytes. A version directory is written aside and renamed
into place, and the pointer is replaced atomically, so a reader sees either the old or the
new state, never half of one.

The root is kept as a string (not a Path) so another backend (an object store URI) can be
added behind the same API later.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
POINTER = "PROMOTED"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CorruptModelError(ValueError):
    """A stored version whose files cannot be read or no longer match their content hash
    (a truncated copy, a full disk, bytes changed by hand)."""


def _check_component(value: str, what: str) -> str:
    if not _NAME.match(value) or value in {".", ".."}:
        raise ValueError(f"model store: {what} {value!r} must match {_NAME.pattern}")
    return value


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def content_version(state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """16 hex chars of SHA-256 over (name, dtype, shape, bytes) of every tensor + the config."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(_canonical_json(config).encode())
    return h.hexdigest()[:16]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ModelStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = str(root)

    def _model_dir(self, name: str) -> Path:
        return Path(self.root) / _check_component(name, "model name")

    def _version_dir(self, name: str, version: str) -> Path:
        return self._model_dir(name) / _check_component(version, "version")

    def save(
        self,
        name: str,
        state_dict: dict[str, torch.Tensor],
        config: dict[str, Any],
        metrics: dict[str, Any] | None = None,
    ) -> str:
        """Store weights + config (+ metrics); returns the content-hash version.

        Saving an existing version keeps its files and only refreshes metrics.json.
        """
        version = content_version(state_dict, config)
        final = self._version_dir(name, version)
        if not final.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=final.parent))
            try:
                # safetensors refuses shared or strided storage: store compact copies.
                tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
                save_file(tensors, str(tmp / WEIGHTS))
                (tmp / CONFIG).write_text(_dumps(config))
                (tmp / METRICS).write_text(_dumps(metrics or {}))
                os.replace(tmp, final)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not final.exists():  # a concurrent writer of the same version wins
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        elif metrics is not None:
            _atomic_write_text(final / METRICS, _dumps(metrics))
        return version

    def load(
        self, name: str, version: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state_dict, config) of a version; None means the promoted version."""
        version = version or self.promoted(name)
        if version is None:
            raise FileNotFoundError(
                f"model store {self.root}: model {name!r} has no promoted version; "
                f"available: {self.versions(name)}"
            )
        d = self._version_dir(name, version)
        if not (d / WEIGHTS).exists():
            raise FileNotFoundError(
                f"model store: {d / WEIGHTS} does not exist; versions of {name!r}: "
                f"{self.versions(name)}"
            )
        try:
            return load_file(str(d / WEIGHTS)), json.loads((d / CONFIG).read_text())
        except (SafetensorError, json.JSONDecodeError, FileNotFoundError) as exc:
            raise CorruptModelError(
                f"model store: {name}/{version} in {d} is unreadable ({exc}); expected a "
                f"complete {WEIGHTS} and {CONFIG} as written by save(). The file is "
                f"truncated or damaged: retrain, or promote another version of {name!r} "
                f"({self.versions(name)}); promoted now: {self.promoted(name)}"
            ) from exc

    def verify(self, name: str, version: str) -> None:
        """Raise CorruptModelError unless the version's files load and hash to `version`."""
        state_dict, config = self.load(name, version)
        actual = content_version(state_dict, config)
        if actual != version:
            raise CorruptModelError(
                f"model store: {name}/{version} in {self._version_dir(name, version)} holds "
                f"content hashing to {actual}, expected {version}: its files were changed "
                "after saving"
            )

    def metrics(self, name: str, version: str) -> dict[str, Any]:
        path = self._version_dir(name, version) / METRICS
        return json.loads(path.read_text()) if path.exists() else {}

    def versions(self, name: str) -> list[str]:
        """Stored versions of a model, oldest first."""
        d = self._model_dir(name)
        if not d.exists():
            return []
        found = [
            p
            for p in d.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / WEIGHTS).exists()
        ]
        return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))]

    def promoted(self, name: str) -> str | None:
        path = self._model_dir(name) / POINTER
        if not path.exists():
            return None
        return path.read_text().strip() or None

    def promote(self, name: str, version: str) -> None:
        """Point `name` at `version` atomically (temp file + os.replace), after checking
        that the version loads and matches its content hash: a damaged version is never
        promoted, and the previously promoted one stays."""
        if not (self._version_dir(name, version) / WEIGHTS).exists():
            raise FileNotFoundError(
                f"model store {self.root}: cannot promote {name}/{version}: no such version; "
                f"versions: {self.versions(name)}"
            )
        self.verify(name, version)
        _atomic_write_text(self._model_dir(name) / POINTER, version + "\n")
