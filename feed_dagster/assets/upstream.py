"""What an upstream asset's latest materialization recorded, read through the instance.

Model versions travel from the training step to the gate, the promotion and the vector
build as materialization metadata instead of side files: the instance keeps them across
runs (so assets run one at a time still find them), the UI shows them on the asset, and
nothing outside the storage resource holds state the asset graph depends on."""

from typing import Any

import dagster as dg


def upstream_metadata(
    instance: dg.DagsterInstance, asset: str, keys: list[str], produced_by: str
) -> dict[str, Any]:
    """The values of `keys` in the latest materialization metadata of `asset`.

    Raises a non-retried Failure naming `produced_by` (the asset to materialise) when
    there is no materialization yet or it predates one of the keys: retrying cannot help."""
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        raise dg.Failure(
            description=f"{asset} has never been materialised: materialise {produced_by} first",
            allow_retries=False,
        )
    missing = [k for k in keys if k not in materialization.metadata]
    if missing:
        raise dg.Failure(
            description=f"the latest materialization of {asset} (run {event.run_id}) has no "
            f"{missing} metadata: rematerialise {produced_by}",
            allow_retries=False,
        )
    return {k: materialization.metadata[k].value for k in keys}
