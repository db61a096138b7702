"""The DuckDB warehouse IO manager: polars frames in, tables out, empty tables included.

dagster-duckdb-polars skips writing an empty frame, which would leave a stale table from an
earlier source (say, synthetic follows after switching to EBNeRD, which has none) and break
downstream loads. This handler always replaces the table, so the warehouse reflects exactly
the last materialisation, schema included.
"""

from collections.abc import Sequence

import polars as pl
from dagster import OutputContext
from dagster._core.storage.db_io_manager import DbTypeHandler, TableSlice
from dagster_duckdb import DuckDBIOManager
from dagster_duckdb_polars import DuckDBPolarsTypeHandler

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


class WarehouseIOManager(DuckDBIOManager):
    """DuckDB warehouse IO manager for polars frames (one writer at a time: pool 'warehouse')."""

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [ReplacingPolarsTypeHandler()]

    @staticmethod
    def default_load_type() -> type:
        return pl.DataFrame
