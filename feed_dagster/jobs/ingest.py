"""The op that appends dropped Parquet batches to the warehouse."""

import dagster as dg

from feed_dagster.data.incoming import BatchError, ingest_batches
from feed_dagster.resources.storage import incoming_dir, warehouse_path


class IngestConfig(dg.Config):
    files: list[str]


@dg.op(pool="warehouse", out={})
def ingest_files(context: dg.OpExecutionContext, config: IngestConfig):
    """Validate and append the batch files in one transaction, then move them to done/."""
    paths = [incoming_dir() / name for name in config.files]
    present = [p for p in paths if p.exists()]
    if not present:
        context.log.info("nothing to ingest: the files were already handled")
        return
    try:
        report = ingest_batches(warehouse_path(), present)
    except BatchError as exc:
        raise dg.Failure(description=str(exc)) from exc
    for table, rows in report.rows.items():
        yield dg.AssetMaterialization(
            asset_key=table,
            description=f"appended {rows:,} rows from incoming batches",
            metadata={"appended_rows": rows, "files": ", ".join(report.files)},
        )
    yield dg.AssetMaterialization(asset_key="world_info", metadata={"now": str(report.now)})


@dg.job(description="Append Parquet batches dropped into data/incoming/ to the warehouse.")
def ingest_incoming():
    ingest_files()
