"""Reading an EBNeRD folder or zip: uniform access to either by relative path, and which
shape (official or flat) it has and what it holds. See `load.py` for the shapes supported.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from feed_dagster.data.validate import read_parquet
from feed_dagster.ebnerd.layout import (
    ARTICLES_FILE,
    BEHAVIORS_FILE,
    HISTORY_FILE,
    LABELLED_SPLITS,
    TEST_SPLIT,
)
from feed_dagster.errors import DataValidationError

FLAT_SPLIT = "flat"


@dataclass(frozen=True)
class EbnerdLayout:
    """What an EBNeRD folder or zip contains (as relative POSIX paths)."""

    location: str
    kind: str  # "official" or "flat"
    splits: tuple[str, ...]  # labelled splits read; ("flat",) for the flat shape
    has_test: bool  # test/ present (and ignored)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> relative parquet path

    def behaviors_file(self, split: str) -> str:
        return BEHAVIORS_FILE if split == FLAT_SPLIT else f"{split}/{BEHAVIORS_FILE}"

    def history_file(self, split: str) -> str:
        return HISTORY_FILE if split == FLAT_SPLIT else f"{split}/{HISTORY_FILE}"


class Archive:
    """Uniform read access to a folder or a zip archive, by relative POSIX path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        self._root = PurePosixPath(".")
        if self.path.is_file():
            # A truncated or corrupt archive has no readable central directory: say so,
            # rather than "no such folder", since the file is right there.
            try:
                if not zipfile.is_zipfile(self.path):
                    raise zipfile.BadZipFile("no zip end-of-archive record")
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataValidationError(
                    str(self.path),
                    None,
                    "an EBNeRD folder or a readable zip archive",
                    f"a file that is not a readable zip archive ({exc})",
                ) from exc
            self._index_zip()
        elif not self.path.is_dir():
            raise DataValidationError(
                str(self.path), None, "an EBNeRD folder or zip", "no such folder or zip"
            )

    def _index_zip(self) -> None:
        assert self._zip is not None
        names = [
            n
            for n in self._zip.namelist()
            if not n.endswith("/")
            and not n.startswith("__MACOSX/")
            and not PurePosixPath(n).name.startswith("._")
        ]
        roots = sorted(
            (PurePosixPath(n).parent for n in names if PurePosixPath(n).name == ARTICLES_FILE),
            key=lambda p: len(p.parts),
        )
        root = roots[0] if roots else PurePosixPath(".")
        self._root = root
        for n in names:
            p = PurePosixPath(n)
            if root == PurePosixPath(".") or p.is_relative_to(root):
                rel = p if root == PurePosixPath(".") else p.relative_to(root)
                self._members[rel.as_posix()] = n

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def display(self, rel: str) -> str:
        """How a file is named in error messages."""
        if self._zip is not None:
            # A missing member is named where it should be, below the archive's root.
            where = self._members.get(rel, (self._root / rel).as_posix())
            return f"{self.path}!{where}"
        return str(self.path / rel)

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            return rel in self._members
        return (self.path / rel).is_file()

    def relative_files(self) -> list[str]:
        if self._zip is not None:
            return sorted(self._members)
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*.parquet"))

    def schema(self, rel: str) -> pa.Schema:
        try:
            return pq.read_schema(self._open(rel))
        except DataValidationError:
            raise
        except Exception as exc:  # truncated, empty or not Parquet at all
            raise DataValidationError(
                self.display(rel),
                None,
                "a readable Parquet file",
                f"not a readable Parquet file ({exc})",
            ) from exc

    def read(self, rel: str) -> pl.DataFrame:
        return read_parquet(self._open(rel), self.display(rel))

    def _open(self, rel: str) -> str | io.BytesIO:
        if self._zip is not None:
            # A member whose bytes fail their CRC or do not inflate is a damaged archive,
            # not a bad Parquet file: name the member and the zip.
            try:
                return io.BytesIO(self._zip.read(self._members[rel]))
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataValidationError(
                    self.display(rel),
                    None,
                    "a readable zip member",
                    f"a damaged zip member ({exc})",
                ) from exc
        return str(self.path / rel)


def inspect_layout(path: str | Path) -> EbnerdLayout:
    """Describe the shape of an EBNeRD folder or zip without reading any rows."""
    src = Archive(path)
    try:
        return read_layout(src)
    finally:
        src.close()


def list_artifacts(path: str | Path) -> dict[str, str]:
    """Artifact files (`<name>/<name>.parquet`, e.g. contrastive vectors) by name.

    Values are paths relative to the dataset root (inside the zip for a zip).
    """
    return inspect_layout(path).artifacts


def read_layout(src: Archive) -> EbnerdLayout:
    """The shape of an open archive; raises DataValidationError when it is not EBNeRD's."""
    if not src.exists(ARTICLES_FILE):
        raise DataValidationError(
            src.display(ARTICLES_FILE), None, "the EBNeRD articles file", "missing file"
        )
    if src.exists(f"train/{BEHAVIORS_FILE}") or src.exists(f"validation/{BEHAVIORS_FILE}"):
        kind, splits = "official", LABELLED_SPLITS
    elif src.exists(BEHAVIORS_FILE):
        kind, splits = "flat", (FLAT_SPLIT,)
    else:
        raise DataValidationError(
            src.display(BEHAVIORS_FILE),
            None,
            f"train/{BEHAVIORS_FILE} (official layout) or {BEHAVIORS_FILE} (flat layout)",
            "missing file",
        )
    reserved = {*LABELLED_SPLITS, TEST_SPLIT}
    artifacts = {}
    for rel in src.relative_files():
        parts = PurePosixPath(rel).parts
        if len(parts) == 2 and parts[0] not in reserved and parts[1] == f"{parts[0]}.parquet":
            artifacts[parts[0]] = rel
    return EbnerdLayout(
        location=str(src.path),
        kind=kind,
        splits=splits,
        has_test=src.exists(f"{TEST_SPLIT}/{BEHAVIORS_FILE}"),
        artifacts=artifacts,
    )
