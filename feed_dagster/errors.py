"""Errors shared by every data source and store of the project."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

# How many offending rows an error message quotes: enough to spot the pattern, short enough
# to read in a log line.
MAX_ROWS_SHOWN = 5


class DataValidationError(ValueError):
    """Input data that does not match the layout or the value rules it must follow.

    Attributes name where the problem is (`file`, `column`), what the rule wanted
    (`expected`), what the data had (`found`) and the first offending rows (`rows`, each a
    dict of identifying values, at most MAX_ROWS_SHOWN of them).
    """

    def __init__(
        self,
        file: str,
        column: str | None,
        expected: str,
        found: str,
        rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.file = file
        self.column = column
        self.expected = expected
        self.found = found
        self.rows = list(rows)[:MAX_ROWS_SHOWN]
        where = f"{file}, column '{column}'" if column else file
        message = f"{where}: expected {expected}, found {found}"
        if self.rows:
            message += f"; first offending rows: {self.rows}"
        super().__init__(message)

    @classmethod
    def from_frame(
        cls,
        file: str,
        column: str | None,
        expected: str,
        found: str,
        offending: pl.DataFrame,
    ) -> DataValidationError:
        """Build the error from a frame of offending rows (only the first few are quoted)."""
        return cls(file, column, expected, found, offending.head(MAX_ROWS_SHOWN).to_dicts())
