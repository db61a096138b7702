"""Pickles whose arrays are mapped from their file when loaded, not copied into memory.

The feed shards of a refresh load the same stored inputs and peers (at 1M users 8.9 GB of
numpy arrays, 11.3 GiB once unpickled): two shards side by side held two copies. Pickle
protocol 5 hands every contiguous numpy array (and so every scipy sparse matrix's) to a
callback instead of writing it into the stream. Here the arrays go into the file each at
an aligned offset, after which comes the small pickle that refers to them. Loading maps
the file copy-on-write and gives the pickle views of the mapping: the arrays are the file's
pages in the kernel's page cache, shared by every process that loads the same file and
read from disk only where touched. A process that writes into such an array gets a
private copy of the pages it writes, so nothing else sees the write, as with a plain
pickle.

    [MAGIC][array 0][array 1]...[pickle][offset and length of each array and of the
    pickle, as little-endian uint64][offset of that table, uint64][MAGIC]
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
from pathlib import Path
from typing import Any

MAGIC = b"FDMAPPK1"
# Arrays start at multiples of this: a cache line, and what numpy's SIMD loops prefer.
ALIGN = 64
_U64 = struct.Struct("<Q")
_SPAN = struct.Struct("<QQ")  # an (offset, length) of the table


class NotMappedPickle(ValueError):
    """The file is not in this format (a plain pickle, or cut short)."""


def dump(value: object, path: Path) -> None:
    """Write `value` to `path` in this format: beside it first, then renamed over it, so a
    reader sees a whole file or none, and a process that has the old file mapped keeps
    its pages (truncating a mapped file in place would kill that process with SIGBUS)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    spans: list[tuple[int, int]] = []
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(MAGIC)
            for buffer in buffers:
                raw = buffer.raw()
                f.write(b"\0" * (-f.tell() % ALIGN))
                spans.append((f.tell(), raw.nbytes))
                f.write(raw)
                raw.release()
            spans.append((f.tell(), len(stream)))
            f.write(stream)
            table = f.tell()
            f.write(_U64.pack(len(spans)))
            for offset, length in spans:
                f.write(_SPAN.pack(offset, length))
            f.write(_U64.pack(table) + MAGIC)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path) -> Any:
    """The value stored at `path`, its arrays mapped from the file (see the module)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 2 * len(MAGIC) + _U64.size:
            raise NotMappedPickle(f"{path} is too short for a mapped pickle")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    view = memoryview(mapping)
    if view[: len(MAGIC)] != MAGIC or view[-len(MAGIC) :] != MAGIC:
        raise NotMappedPickle(f"{path} is not a mapped pickle")
    end = size - len(MAGIC) - _U64.size  # where the table's offset is kept
    (table,) = _U64.unpack_from(view, end)
    if table + _U64.size > end:
        raise NotMappedPickle(f"{path} is cut short: its table lies past its end")
    (count,) = _U64.unpack_from(view, table)
    if table + _U64.size + _SPAN.size * count > end:
        raise NotMappedPickle(f"{path} is cut short: its table runs past its end")
    spans = [_SPAN.unpack_from(view, table + _U64.size + _SPAN.size * i) for i in range(count)]
    if any(offset + length > size for offset, length in spans):
        raise NotMappedPickle(f"{path} is cut short: its table points past its end")
    if not spans:
        raise NotMappedPickle(f"{path} holds no pickle")
    *arrays, (start, length) = spans
    return pickle.loads(view[start : start + length], buffers=[view[o : o + n] for o, n in arrays])
