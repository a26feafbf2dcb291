"""Exceptions shared across modules (kept free of imports to avoid cycles)."""


class UnsupportedCellError(Exception):
    """A method cannot produce this cell (tensor type, family, format).

    Raised before any heavy work; a sweep records the cell as skipped with
    this message.
    """


class ResultsNotWritable(Exception):
    """The results folder cannot be written: the sweep stops at this cell (computing the rest
    would only lose their records too)."""
