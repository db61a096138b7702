"""The model store on an S3-compatible bucket (moto's server on loopback, tests/servers.py):
the same behaviour as on a local directory, a pointer written in one PUT, and no half-saved
or damaged version ever listed, promoted or loaded."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import torch
from dagster_helpers import instance_with_ranker_candidate, materialize
from safetensors.torch import save as safetensors_bytes
from servers import S3Server, unreachable_s3_endpoint

from feed_dagster.models.store import (
    CONFIG,
    METRICS,
    WEIGHTS,
    CorruptModelError,
    ModelStore,
    ModelStoreUnavailable,
    content_version,
)
from feed_dagster.paths import MODELS_URI_VARIABLE
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import ModelStoreResource


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(4, 3, generator=g),
        "emb.weight": torch.randn(10, 2, generator=g).t(),  # non-contiguous on purpose
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


CONFIG_ = {"kind": "ranker", "d_model": 8, "actions": ["click"]}


def _keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _writes(server: S3Server, since: int) -> list[tuple[str, str]]:
    """Requests after the first `since` that change objects."""
    return [r for r in server.requests()[since:] if r[0] in {"PUT", "POST", "DELETE"}]


def test_round_trip_matches_the_local_store(tmp_path: Path, s3_server, s3_bucket) -> None:
    local, remote = ModelStore(tmp_path / "models"), ModelStore(f"s3://{s3_bucket}/models")
    assert local.local and not remote.local
    for store in (local, remote):
        assert store.promoted("ranker") is None and store.versions("ranker") == []
        v1 = store.save("ranker", _state(1), CONFIG_, {"auc": 0.7})
        v2 = store.save("ranker", _state(2), CONFIG_, {"auc": 0.8})
        store.promote("ranker", v1)
        store.promote("ranker", v2)

    assert sorted(remote.versions("ranker")) == sorted(local.versions("ranker")) == sorted([v1, v2])
    assert remote.promoted("ranker") == local.promoted("ranker") == v2
    assert remote.metrics("ranker", v1) == local.metrics("ranker", v1) == {"auc": 0.7}
    for version in (v1, v2, None):
        (a, cfg_a), (b, cfg_b) = remote.load("ranker", version), local.load("ranker", version)
        assert cfg_a == cfg_b == CONFIG_ and set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(remote.load("ranker")[0]["steps"], torch.tensor([2]))
    # The same objects as the local files, nothing else (no staging objects).
    local_files = sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "models").rglob("*") if p.is_file()
    )
    assert _keys(s3_server, s3_bucket) == local_files

    # Saving the same model again writes nothing; new metrics are one object, replaced.
    mark = len(s3_server.requests())
    assert remote.save("ranker", _state(1), CONFIG_) == v1
    assert _writes(s3_server, mark) == []
    remote.save("ranker", _state(1), CONFIG_, {"auc": 0.75})
    assert _writes(s3_server, mark) == [("PUT", f"/{s3_bucket}/models/ranker/{v1}/{METRICS}")]
    assert remote.metrics("ranker", v1) == {"auc": 0.75}


def test_the_pointer_is_one_object_written_in_one_put(s3_server, s3_bucket) -> None:
    store = ModelStore(f"s3://{s3_bucket}/models")
    v1 = store.save("ranker", _state(1), CONFIG_)
    v2 = store.save("ranker", _state(2), CONFIG_)
    store.promote("ranker", v1)

    mark = len(s3_server.requests())
    store.promote("ranker", v2)
    assert _writes(s3_server, mark) == [("PUT", f"/{s3_bucket}/models/ranker/PROMOTED")]
    pointer = s3_server.client().get_object(Bucket=s3_bucket, Key="models/ranker/PROMOTED")
    assert pointer["Body"].read() == f"{v2}\n".encode()
    outside_versions = [k for k in _keys(s3_server, s3_bucket) if k.count("/") == 2]
    assert outside_versions == ["models/ranker/PROMOTED"]


def test_a_save_cut_off_before_its_weights_is_never_a_version(
    s3_server, s3_bucket, monkeypatch
) -> None:
    store = ModelStore(f"s3://{s3_bucket}/models")
    v1 = store.save("ranker", _state(1), CONFIG_)
    store.promote("ranker", v1)
    v2 = content_version(_state(2), CONFIG_)
    real_put = store.fs.put_file

    def connection_lost_at_the_weights(lpath: str, rpath: str, **kwargs) -> None:
        if rpath.endswith(WEIGHTS):
            raise ConnectionResetError("connection lost")
        real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", connection_lost_at_the_weights)
    with pytest.raises(ConnectionResetError):
        store.save("ranker", _state(2), CONFIG_)
    monkeypatch.undo()
    # The half-saved version's other objects are there, and still it is not a version.
    assert _keys(s3_server, s3_bucket, f"models/ranker/{v2}/") == [
        f"models/ranker/{v2}/{CONFIG}",
        f"models/ranker/{v2}/{METRICS}",
    ]
    assert store.versions("ranker") == [v1]
    with pytest.raises(FileNotFoundError, match="no such version"):
        store.promote("ranker", v2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        store.load("ranker", v2)
    assert store.promoted("ranker") == v1
    assert torch.equal(store.load("ranker")[0]["layer.weight"], _state(1)["layer.weight"])

    # Saving it again completes it.
    assert store.save("ranker", _state(2), CONFIG_) == v2
    assert sorted(store.versions("ranker")) == sorted([v1, v2])
    store.promote("ranker", v2)
    assert store.promoted("ranker") == v2


def test_damaged_objects_are_refused_and_the_promoted_version_is_checked_on_load(
    s3_server, s3_bucket
) -> None:
    store = ModelStore(f"s3://{s3_bucket}/models")
    client = s3_server.client()
    v1 = store.save("ranker", _state(1), CONFIG_)
    store.promote("ranker", v1)

    # A weights object that is not safetensors.
    v2 = store.save("ranker", _state(2), CONFIG_)
    client.put_object(Bucket=s3_bucket, Key=f"models/ranker/{v2}/{WEIGHTS}", Body=b"\x08\x00")
    with pytest.raises(CorruptModelError) as err:
        store.load("ranker", v2)
    assert f"s3://{s3_bucket}/models/ranker/{v2}" in str(err.value)
    assert f"promoted now: {v1}" in str(err.value)
    with pytest.raises(CorruptModelError):
        store.promote("ranker", v2)
    assert store.promoted("ranker") == v1

    # A version missing its config is not listed, and cannot be promoted.
    v3 = store.save("ranker", _state(3), CONFIG_)
    client.delete_object(Bucket=s3_bucket, Key=f"models/ranker/{v3}/{CONFIG}")
    assert v3 not in store.versions("ranker")
    with pytest.raises(CorruptModelError):
        store.promote("ranker", v3)
    assert store.promoted("ranker") == v1

    # The promoted version's weights swapped for other, well-formed weights after the
    # promotion: the content hash refuses them rather than serving another model.
    client.put_object(
        Bucket=s3_bucket,
        Key=f"models/ranker/{v1}/{WEIGHTS}",
        Body=safetensors_bytes({k: v.contiguous() for k, v in _state(4).items()}),
    )
    with pytest.raises(CorruptModelError, match=f"expected {v1}"):
        store.load("ranker")


def test_the_resource_switches_by_FEED_DAGSTER_MODELS_URI(
    tmp_path: Path, s3_server, s3_bucket, monkeypatch
) -> None:
    storage = StorageResource(root=str(tmp_path / "data"))
    monkeypatch.delenv(MODELS_URI_VARIABLE, raising=False)
    default = ModelStoreResource(storage=storage)
    assert default.uri() == str(tmp_path / "data" / "models") and default.store().local

    monkeypatch.setenv(MODELS_URI_VARIABLE, f"s3://{s3_bucket}/feed/models")
    store = ModelStoreResource(storage=storage).store()
    version = store.save("two_tower", _state(1), {"kind": "two_tower"})
    store.promote("two_tower", version)
    assert f"feed/models/two_tower/{version}/{WEIGHTS}" in _keys(s3_server, s3_bucket)
    assert not (tmp_path / "data").exists(), "nothing is written to the local storage root"

    # The resource's own root overrides the variable.
    own = ModelStoreResource(storage=storage, root=str(tmp_path / "own"))
    assert own.uri() == str(tmp_path / "own") and own.store().local


def test_a_missing_bucket_or_unreachable_endpoint_names_the_setting(s3_bucket, monkeypatch) -> None:
    resource = ModelStoreResource(storage=StorageResource(root="unused"))
    monkeypatch.setenv(MODELS_URI_VARIABLE, "s3://no-such-bucket/models")
    with pytest.raises(ModelStoreUnavailable) as err:
        resource.store()
    assert "bucket 'no-such-bucket' does not exist" in str(err.value)
    assert MODELS_URI_VARIABLE in str(err.value)

    unreachable_s3_endpoint(monkeypatch)
    monkeypatch.setenv(MODELS_URI_VARIABLE, f"s3://{s3_bucket}/models")
    with pytest.raises(ModelStoreUnavailable) as err:
        resource.store()
    assert "cannot reach bucket" in str(err.value)
    assert MODELS_URI_VARIABLE in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


def test_the_promotion_asset_promotes_in_the_bucket(data_dir, s3_bucket, monkeypatch) -> None:
    """The asset graph, unchanged, keeps its models in the bucket by configuration only."""
    monkeypatch.setenv(MODELS_URI_VARIABLE, f"s3://{s3_bucket}/models")
    store = ModelStore(f"s3://{s3_bucket}/models")
    v1 = store.save("ranker", _state(1), CONFIG_)
    store.promote("ranker", v1)
    v2 = store.save("ranker", _state(2), CONFIG_)
    instance = instance_with_ranker_candidate(v2, v1)
    result = materialize(dg.AssetSelection.assets("promoted_ranker"), instance=instance)
    assert result.success
    assert store.promoted("ranker") == v2
    assert not (data_dir / "models").exists()
