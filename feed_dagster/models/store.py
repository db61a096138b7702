"""A versioned model store on a local directory or an object store bucket: safetensors
weights + JSON, no pickle.

Layout: `<root>/<name>/<version>/{model.safetensors, config.json, metrics.json}` and a
promotion pointer `<root>/<name>/PROMOTED` holding one version string. The version is a
content hash of the weights and config, so saving the same model twice is a no-op and a
version string always means the same bytes; load() checks that hash, so damaged or
swapped files are refused rather than served.

The root is a local path or an fsspec URL (`s3://bucket/prefix`; endpoint and credentials
from the usual AWS_* variables or `storage_options`). Every read and write goes through one
fsspec filesystem; only publishing differs, because only a local directory can rename:
- local: a version directory is written aside and renamed into place, and the pointer is
  replaced with os.replace;
- object store: a version's objects are uploaded one by one (each object appears whole, on
  one PUT or a completed multipart upload), the weights last, and a version counts only
  once its weights and config are both there; the pointer is one object written in one PUT.
Either way a reader sees the old or the new state, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
POINTER = "PROMOTED"
# What a version needs to be loadable; metrics.json is optional (metrics() reads {}).
REQUIRED = (WEIGHTS, CONFIG)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CorruptModelError(ValueError):
    """A stored version whose files cannot be read or no longer match their content hash
    (a truncated copy, a full disk, bytes changed by hand)."""


class ModelStoreUnavailable(OSError):
    """The store's bucket does not exist or cannot be reached (endpoint, credentials)."""


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


def _modified(info: dict[str, Any]) -> float:
    """When a listed file was written: `mtime` on a local disk, `LastModified` on S3."""
    when = info.get("mtime", info.get("LastModified", 0))
    return when.timestamp() if isinstance(when, datetime) else float(when)


class ModelStore:
    """Versions of named models under `root` (a local path or an fsspec URL); see the
    module docstring for the layout and the publishing rules."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.root = str(root)
        # No listings cache: another process (a training run, a promotion) changes the
        # store while this one holds it. No shared instance: the AWS_* variables are read
        # when the store is built, not when some earlier store with the same root was.
        self.fs, self._base = fsspec.url_to_fs(
            self.root,
            use_listings_cache=False,
            skip_instance_cache=True,
            **(storage_options or {}),
        )
        self.local = isinstance(self.fs, LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self._base.rstrip("/"), *parts])

    def _where(self, *parts: str) -> str:
        """A location as the user configured it (`s3://...` or a local path), for messages."""
        return "/".join([self.root.rstrip("/"), *parts])

    def _model_dir(self, name: str) -> str:
        return self._path(_check_component(name, "model name"))

    def _version_dir(self, name: str, version: str) -> str:
        return f"{self._model_dir(name)}/{_check_component(version, 'version')}"

    def _complete(self, name: str, version: str) -> bool:
        d = self._version_dir(name, version)
        return all(self.fs.exists(f"{d}/{f}") for f in REQUIRED)

    def _write_small(self, path: str, text: str) -> None:
        """Replace one small file whole: os.replace locally, one PUT on an object store."""
        if self.local:
            _atomic_write_text(Path(path), text)
        else:
            self.fs.pipe_file(path, text.encode())

    def _publish(self, staging: Path, final: str) -> None:
        if self.local:
            os.replace(staging, final)
            return
        # No rename on an object store: each object appears whole, and the version only
        # counts once its weights (uploaded last) and config are both there.
        for file in (CONFIG, METRICS, WEIGHTS):
            self.fs.put_file(str(staging / file), f"{final}/{file}")

    def check(self) -> None:
        """Raise ModelStoreUnavailable unless the store's bucket exists and answers. A local
        root needs nothing: save() creates the directories."""
        if self.local:
            return
        bucket = self._base.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError as exc:
            raise ModelStoreUnavailable(
                f"model store {self.root}: bucket {bucket!r} does not exist"
            ) from exc
        except Exception as exc:  # botocore's and aiohttp's errors share no base class
            raise ModelStoreUnavailable(
                f"model store {self.root}: cannot reach bucket {bucket!r} "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def save(
        self,
        name: str,
        state_dict: dict[str, torch.Tensor],
        config: dict[str, Any],
        metrics: dict[str, Any] | None = None,
    ) -> str:
        """Store weights + config (+ metrics); returns the content-hash version.

        Saving an existing version keeps its files and only refreshes metrics.json; a
        version missing a file (an upload cut off) is written again."""
        version = content_version(state_dict, config)
        final = self._version_dir(name, version)
        if self._complete(name, version):
            if metrics is not None:
                self._write_small(f"{final}/{METRICS}", _dumps(metrics))
            return version
        if self.local:
            # Staged beside the final directory: a rename stays on one filesystem.
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=Path(final).parent))
        else:
            tmp = Path(tempfile.mkdtemp(prefix=f"model-{version}-"))
        try:
            # safetensors refuses shared or strided storage: store compact copies.
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
            save_file(tensors, str(tmp / WEIGHTS))
            (tmp / CONFIG).write_text(_dumps(config))
            (tmp / METRICS).write_text(_dumps(metrics or {}))
            self._publish(tmp, final)
        except OSError:
            if not self._complete(name, version):  # a concurrent writer of the same version wins
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return version

    def load(
        self, name: str, version: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state_dict, config) of a version; None means the promoted version. Raises
        CorruptModelError when the files are unreadable or do not hash to the version."""
        version = version or self.promoted(name)
        if version is None:
            raise FileNotFoundError(
                f"model store {self.root}: model {name!r} has no promoted version; "
                f"available: {self.versions(name)}"
            )
        d = self._version_dir(name, version)
        where = self._where(name, version)
        if not self.fs.exists(f"{d}/{WEIGHTS}"):
            raise FileNotFoundError(
                f"model store: {where}/{WEIGHTS} does not exist; versions of {name!r}: "
                f"{self.versions(name)}"
            )
        try:
            state_dict = load_bytes(self.fs.cat_file(f"{d}/{WEIGHTS}"))
            config = json.loads(self.fs.cat_file(f"{d}/{CONFIG}"))
        except (SafetensorError, ValueError, FileNotFoundError) as exc:
            raise CorruptModelError(
                f"model store: {name}/{version} in {where} is unreadable ({exc}); expected a "
                f"complete {WEIGHTS} and {CONFIG} as written by save(). The file is "
                f"truncated or damaged: retrain, or promote another version of {name!r} "
                f"({self.versions(name)}); promoted now: {self.promoted(name)}"
            ) from exc
        actual = content_version(state_dict, config)
        if actual != version:
            raise CorruptModelError(
                f"model store: {name}/{version} in {where} holds content hashing to "
                f"{actual}, expected {version}: its files were changed after saving"
            )
        return state_dict, config

    def verify(self, name: str, version: str) -> None:
        """Raise CorruptModelError unless the version's files load and hash to `version`."""
        self.load(name, version)

    def metrics(self, name: str, version: str) -> dict[str, Any]:
        try:
            return json.loads(self.fs.cat_file(f"{self._version_dir(name, version)}/{METRICS}"))
        except FileNotFoundError:
            return {}

    def versions(self, name: str) -> list[str]:
        """Complete stored versions of a model, oldest first (by when their weights were
        written; S3 times are whole seconds, ties go by name)."""
        model_dir = self._model_dir(name)
        # One listing of the model's files (one request on S3), grouped by version.
        files: dict[str, dict[str, dict[str, Any]]] = {}
        for path, info in self.fs.find(model_dir, maxdepth=2, detail=True).items():
            parts = path[len(model_dir) :].strip("/").split("/")
            if len(parts) == 2 and not parts[0].startswith("."):  # .<version>.*: staging
                files.setdefault(parts[0], {})[parts[1]] = info
        found = {v: fs for v, fs in files.items() if all(f in fs for f in REQUIRED)}
        return sorted(found, key=lambda v: (_modified(found[v][WEIGHTS]), v))

    def promoted(self, name: str) -> str | None:
        try:
            text = self.fs.cat_file(f"{self._model_dir(name)}/{POINTER}").decode()
        except FileNotFoundError:
            return None
        return text.strip() or None

    def promote(self, name: str, version: str) -> None:
        """Point `name` at `version` in one write (os.replace locally, one PUT on an object
        store), after checking that the version loads and matches its content hash: a
        damaged version is never promoted, and the previously promoted one stays."""
        if not self.fs.exists(f"{self._version_dir(name, version)}/{WEIGHTS}"):
            raise FileNotFoundError(
                f"model store {self.root}: cannot promote {name}/{version}: no such version; "
                f"versions: {self.versions(name)}"
            )
        self.verify(name, version)
        self._write_small(f"{self._model_dir(name)}/{POINTER}", version + "\n")
