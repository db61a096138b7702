"""The op that appends dropped Parquet batches (activity, deletions, blocks, mutes) to the
warehouse and refreshes the readers' safety list."""

import dagster as dg

from feed_dagster.incoming import BatchError, ingest_batches
from feed_dagster.resources.storage import StorageResource


class IngestConfig(dg.Config):
    files: list[str]


@dg.op(pool="warehouse", out={})
def ingest_files(context: dg.OpExecutionContext, config: IngestConfig, storage: StorageResource):
    """Validate and append the batch files in one transaction, then move them to done/;
    deletions, blocks and mutes (and engagements, once feeds are published) also rewrite the
    safety list readers apply at once."""
    paths = [storage.incoming_dir() / name for name in config.files]
    present = [p for p in paths if p.exists()]
    if not present:
        context.log.info("nothing to ingest: the files were already handled")
        return
    try:
        report = ingest_batches(storage.warehouse_path(), present, storage.safety_path())
    except BatchError as exc:
        raise dg.Failure(description=str(exc)) from exc
    for table, rows in report.rows.items():
        yield dg.AssetMaterialization(
            asset_key=table,
            description=f"appended {rows:,} rows from incoming batches",
            metadata={"appended_rows": rows, "files": ", ".join(report.files)},
        )
    if report.safety_file is not None:
        context.log.info(
            "readers now drop deleted posts, blocked or muted authors and newly seen posts "
            f"listed in {report.safety_file}"
        )
    yield dg.AssetMaterialization(asset_key="world_info", metadata={"now": str(report.now)})


@dg.job(
    description="Append Parquet batches dropped into data/incoming/ (posts, engagements, "
    "deletions, blocks, mutes) to the warehouse."
)
def ingest_incoming():
    ingest_files()
