"""The DuckDB warehouse IO manager: polars frames in, tables out, empty tables included.

dagster-duckdb-polars skips writing an empty frame, which would leave a stale table from an
earlier source (say, synthetic follows after switching to EBNeRD, which has none) and break
downstream loads. This handler always replaces the table, so the warehouse reflects exactly
the last materialisation, schema included.

The database file is the storage resource's warehouse (a resource dependency), so the
storage root a run is configured with decides where the tables go. When the artifacts root
is a bucket, that warehouse is a prefix of Parquet objects (one per table) instead, and the
IO manager writes and reads those (RemoteWarehouseIOManager).
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
from dagster import InputContext, OutputContext
from dagster._core.storage.db_io_manager import DbIOManager, DbTypeHandler, TableSlice
from dagster._utils.backoff import backoff
from dagster_duckdb import DuckDBIOManager
from dagster_duckdb.io_manager import DuckDbClient
from dagster_duckdb_polars import DuckDBPolarsTypeHandler
from pydantic import Field

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import read_table
from feed_dagster.data.warehouse_store import is_remote_warehouse, table_location, write_tables
from feed_dagster.resources.storage import StorageResource

# The concurrency pool of every step that writes the warehouse (DuckDB allows one writer
# process per file) or reads it while another step may write.
WAREHOUSE_POOL = "warehouse"


class ReplacingPolarsTypeHandler(DuckDBPolarsTypeHandler):
    def handle_output(
        self, context: OutputContext, table_slice: TableSlice, obj: pl.DataFrame, connection
    ) -> None:
        if table_slice.partition_dimensions:
            # Partitioned tables keep the library's delete-then-insert behaviour.
            return super().handle_output(context, table_slice, obj, connection)
        arrow = obj.to_arrow()
        connection.execute(f"create schema if not exists {table_slice.schema}")
        connection.register("_frame", arrow)
        try:
            connection.execute(
                f"create or replace table {table_slice.schema}.{table_slice.table} "
                "as select * from _frame"
            )
        finally:
            connection.unregister("_frame")
        context.add_output_metadata({"row_count": obj.height})


class WarehouseClient(DuckDbClient):
    """DuckDbClient connecting to a path fixed when the IO manager is created: the
    library's client reads it from the IO manager's own config, which here may be empty
    (the path then comes from the storage resource)."""

    def __init__(self, database: Path) -> None:
        self.database = database

    @contextmanager
    def connect(self, context, table_slice: TableSlice) -> Iterator[duckdb.DuckDBPyConnection]:  # type: ignore[override]
        # As the library's client: retry while another process holds the file.
        conn = backoff(
            fn=duckdb.connect,
            retry_on=(RuntimeError, duckdb.IOException),
            kwargs={
                "database": str(self.database),
                "read_only": False,
                "config": {
                    "custom_user_agent": "dagster",
                    **context.resource_config["connection_config"],
                },
            },
            max_retries=10,
        )
        try:
            # A long load draws DuckDB's progress bar on stdout, into the step's log.
            conn.execute("set enable_progress_bar = false")
            yield conn
        finally:
            conn.close()


class RemoteWarehouseIOManager(dg.IOManager):
    """Polars frames in, one Parquet object per asset out, in the warehouse on a bucket.

    The object is named by the asset key's last part, as the DuckDB file's table is (every
    warehouse asset is in its `main` schema); an empty frame replaces the table too."""

    def __init__(self, warehouse: Location) -> None:
        self.warehouse = warehouse

    def handle_output(self, context: OutputContext, obj: pl.DataFrame | None) -> None:
        if obj is None:  # an output of type Nothing stores nothing, as in the DuckDB file
            return
        if context.has_asset_partitions:
            # No warehouse asset is partitioned; a shard of a whole-table object would need
            # a read-modify-write that two shard runs could race.
            raise ValueError(
                f"partitioned asset {context.asset_key.to_user_string()} cannot be stored in "
                f"the warehouse on a bucket ({self.warehouse})"
            )
        name = context.asset_key.path[-1]
        write_tables(self.warehouse, {name: obj})
        context.add_output_metadata(
            {"row_count": obj.height, "uri": str(table_location(self.warehouse, name))}
        )

    def load_input(self, context: InputContext) -> pl.DataFrame:
        # An AssetIn's metadata={"columns": [...]} reads only those, as the DuckDB handler does.
        columns = (context.definition_metadata or {}).get("columns")
        return read_table(self.warehouse, context.asset_key.path[-1], columns)


class WarehouseIOManager(DuckDBIOManager):
    """DuckDB warehouse IO manager for polars frames (one writer at a time: pool 'warehouse').

    `database` empty (the default): the storage resource's warehouse, warehouse.duckdb
    under the storage root or, with the artifacts on a bucket, Parquet objects there."""

    storage: StorageResource
    database: str = Field(
        default="", description="Path to the DuckDB database; empty = the storage root's."
    )

    def warehouse_path(self) -> Location:
        return Path(self.database) if self.database else self.storage.warehouse_path()

    def create_io_manager(self, context) -> DbIOManager | RemoteWarehouseIOManager:
        path = self.warehouse_path()
        if is_remote_warehouse(path):
            return RemoteWarehouseIOManager(path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return DbIOManager(
            db_client=WarehouseClient(path),
            database=str(path),
            schema=self.schema_,
            type_handlers=self.type_handlers(),
            default_load_type=self.default_load_type(),
            io_manager_name="DuckDBIOManager",
        )

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [ReplacingPolarsTypeHandler()]

    @staticmethod
    def default_load_type() -> type:
        return pl.DataFrame
