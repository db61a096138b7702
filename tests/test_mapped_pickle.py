"""Pickles whose arrays are mapped from the file: the same values back, arrays that are
views of one copy-on-write mapping, and clear refusals of other files."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from feed_dagster import mapped_pickle


@dataclass
class Holder:
    name: str
    arrays: dict[str, np.ndarray]
    matrix: sp.csr_matrix


def _value() -> Holder:
    rng = np.random.default_rng(0)
    return Holder(
        name="peers",
        arrays={
            "floats": rng.random((300, 7), dtype=np.float32),
            "fortran": np.asfortranarray(rng.random((5, 9))),
            "strided": np.arange(100, dtype=np.int64)[::3],  # not contiguous: kept in the pickle
            "empty": np.zeros(0, dtype=np.int32),
            "bools": rng.random(33) > 0.5,
        },
        matrix=sp.random(50, 40, density=0.1, format="csr", random_state=1, dtype=np.float32),
    )


def test_a_value_comes_back_with_its_arrays_mapped_at_aligned_offsets(tmp_path):
    path = tmp_path / "v.pkl"
    value = _value()
    mapped_pickle.dump(value, path)
    back = mapped_pickle.load(path)
    assert back.name == value.name
    for key, array in value.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], array)
        assert back.arrays[key].dtype == array.dtype
    assert back.arrays["fortran"].flags.f_contiguous
    assert (back.matrix != value.matrix).nnz == 0
    # The large arrays are views of the file, not copies: they own no memory.
    floats = back.arrays["floats"]
    assert not floats.flags.owndata and floats.ctypes.data % mapped_pickle.ALIGN == 0
    assert path.stat().st_size > floats.nbytes


def test_writing_into_a_loaded_array_changes_neither_the_file_nor_another_load(tmp_path):
    path = tmp_path / "v.pkl"
    mapped_pickle.dump(_value(), path)
    before = path.read_bytes()
    first, second = mapped_pickle.load(path), mapped_pickle.load(path)
    first.arrays["floats"][:] = -1.0
    first.matrix.data[:] = 0.0
    assert path.read_bytes() == before
    assert (second.arrays["floats"] >= 0).all()
    np.testing.assert_array_equal(mapped_pickle.load(path).matrix.data, second.matrix.data)


def test_a_loaded_value_outlives_the_file_being_replaced_or_removed(tmp_path):
    """Stores replace and prune their files while other processes hold them loaded."""
    path = tmp_path / "v.pkl"
    mapped_pickle.dump(_value(), path)
    loaded = mapped_pickle.load(path)
    mapped_pickle.dump({"other": np.ones(3)}, path)
    path.unlink()
    np.testing.assert_array_equal(loaded.arrays["floats"], _value().arrays["floats"])


@pytest.mark.parametrize(
    "content",
    [
        pickle.dumps({"a": np.ones(3)}),  # a plain pickle, as stores held before
        b"",
        b"FDMAPPK1" + b"\0" * 7,
    ],
    ids=["plain pickle", "empty", "cut short"],
)
def test_other_files_are_refused(tmp_path, content):
    path = tmp_path / "v.pkl"
    path.write_bytes(content)
    with pytest.raises(mapped_pickle.NotMappedPickle):
        mapped_pickle.load(path)


def test_a_file_cut_after_its_arrays_is_refused(tmp_path):
    path = tmp_path / "v.pkl"
    mapped_pickle.dump(_value(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + data[-16:])
    with pytest.raises(mapped_pickle.NotMappedPickle):
        mapped_pickle.load(path)
