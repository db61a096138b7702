"""Materialising the project's assets in a test, as the UI's "Materialize" button does."""

from __future__ import annotations

from typing import Any

import dagster as dg


def definitions() -> dg.Definitions:
    """The project's definitions built now, so they follow the environment the test set
    (FEED_DAGSTER_DATA, FEED_DAGSTER_SOURCE, FEED_DAGSTER_SHARDS). Imported here, not at
    the top: importing feed_dagster.definitions builds definitions for the environment of
    the moment."""
    from feed_dagster.definitions import build_definitions

    return build_definitions()


def materialize(
    selection: dg.AssetSelection | None = None,
    partition_key: str | None = None,
    *,
    defs: dg.Definitions | None = None,
    run_config: dict[str, Any] | None = None,
    instance: dg.DagsterInstance | None = None,
    raise_on_error: bool = False,
) -> dg.ExecuteInProcessResult:
    """Materialise `selection` (default: every asset) with the asset checks, resources and
    run config of a run of the project's definitions.

    `defs` defaults to `definitions()`; `instance` to a fresh ephemeral one. A failed step
    is returned in the result unless `raise_on_error`."""
    defs = defs or definitions()
    return dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        partition_key=partition_key,
        resources=defs.resources,
        instance=instance or dg.DagsterInstance.ephemeral(),
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def instance_with_ranker_candidate(candidate: str, incumbent: str) -> dg.DagsterInstance:
    """An ephemeral instance where trained_models has recorded ranker `candidate` against
    `incumbent` (ranker_evaluation's metadata), as promoted_ranker reads them."""
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "ranker_evaluation",
            metadata={"ranker_version": candidate, "path": "", "incumbent_version": incumbent},
        )
    )
    return instance
