"""Where the report's tables used to live; kept so that existing imports keep working.

The frames are computed in :mod:`qeval.report.frames` and every file is written by
:mod:`qeval.report.write`.  ``qeval.sweep`` (and user scripts) still import
``qeval.report.table.write_tables``; import from those modules instead: this module goes once
nothing names it.  It imports only the two, and nothing imports it, so it closes no cycle.
"""

from __future__ import annotations

from qeval.report.frames import (
    CELL_KEYS,
    DERIVED,
    add_normalized,
    agreement_table,
    cell_table,
    efficiency_frame,
    family_table,
    long_frame,
    marked_table,
    not_ok_frame,
    primary_table,
    read_sweeps,
    report_name,
    views,
)
from qeval.report.write import write_table, write_tables

__all__ = [
    "CELL_KEYS",
    "DERIVED",
    "add_normalized",
    "agreement_table",
    "cell_table",
    "efficiency_frame",
    "family_table",
    "long_frame",
    "marked_table",
    "not_ok_frame",
    "primary_table",
    "read_sweeps",
    "report_name",
    "views",
    "write_table",
    "write_tables",
]
