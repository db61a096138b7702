"""ModelStore: content-hash versions, safetensors round trip, atomic promotion pointer."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from feed_dagster.models import store as store_mod
from feed_dagster.models.store import ModelStore, content_version


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "layer.bias": torch.randn(4, generator=g),
        "emb.weight": torch.randn(10, 2, generator=g).t(),  # non-contiguous on purpose
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def test_round_trip_and_content_versions(tmp_path):
    s = ModelStore(str(tmp_path))
    state, config = _state(), {"kind": "ranker", "d_model": 8, "actions": ["click"]}
    v = s.save("ranker", state, config, {"auc": 0.7})
    assert s.save("ranker", state, config) == v, "same content, same version"
    assert s.save("ranker", _state(1), config) != v
    assert s.save("ranker", state, {**config, "d_model": 16}) != v
    loaded, cfg = s.load("ranker", v)
    assert cfg == config
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
    assert s.metrics("ranker", v) == {"auc": 0.7}
    assert v in s.versions("ranker") and len(s.versions("ranker")) == 3
    files = sorted(p.name for p in (tmp_path / "ranker" / v).iterdir())
    assert files == ["config.json", "metrics.json", "model.safetensors"]
    assert content_version(loaded, cfg) == v, "the version is a function of the stored bytes"


def test_promotion_pointer(tmp_path):
    s = ModelStore(str(tmp_path))
    assert s.promoted("ranker") is None
    with pytest.raises(FileNotFoundError, match="no promoted version"):
        s.load("ranker")
    v1 = s.save("ranker", _state(1), {"kind": "ranker"})
    v2 = s.save("ranker", _state(2), {"kind": "ranker"})
    s.promote("ranker", v1)
    assert s.promoted("ranker") == v1
    assert torch.equal(s.load("ranker")[0]["layer.bias"], _state(1)["layer.bias"])
    s.promote("ranker", v2)
    assert s.promoted("ranker") == v2
    with pytest.raises(FileNotFoundError, match="no such version"):
        s.promote("ranker", "0123456789abcdef")
    assert s.promoted("ranker") == v2
    # No temp files are left behind next to the pointer.
    assert sorted(p.name for p in (tmp_path / "ranker").iterdir() if p.is_file()) == ["PROMOTED"]


def test_pointer_is_replaced_atomically(tmp_path, monkeypatch):
    """The pointer file is only ever swapped by os.replace, and a failure mid-write leaves
    the previous pointer intact."""
    s = ModelStore(str(tmp_path))
    v1 = s.save("m", _state(1), {})
    v2 = s.save("m", _state(2), {})
    s.promote("m", v1)
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.fspath(src), os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", spy)
    s.promote("m", v2)
    assert len(calls) == 1 and calls[0][1].endswith("PROMOTED") and calls[0][0] != calls[0][1]

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        s.promote("m", v1)
    assert s.promoted("m") == v2
    assert [p.name for p in (tmp_path / "m").iterdir() if p.is_file()] == ["PROMOTED"]


def test_concurrent_readers_never_see_a_partial_pointer(tmp_path):
    s = ModelStore(str(tmp_path))
    versions = [s.save("m", _state(i), {}) for i in range(2)]
    s.promote("m", versions[0])
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(s.promoted("m"))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(200):
        s.promote("m", versions[i % 2])
    stop.set()
    t.join()
    assert seen <= set(versions)


def test_no_pickle_on_the_load_path(tmp_path, monkeypatch):
    s = ModelStore(str(tmp_path))
    v = s.save("m", _state(), {"a": 1})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    state, cfg = s.load("m", v)
    assert cfg == {"a": 1} and "layer.weight" in state
    assert json.loads((tmp_path / "m" / v / "config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden"])
def test_rejects_unsafe_names(tmp_path, bad):
    with pytest.raises(ValueError, match="must match"):
        ModelStore(str(tmp_path)).save(bad, _state(), {})
