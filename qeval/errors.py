"""Exceptions shared across modules (kept free of imports to avoid cycles)."""


class UnsupportedCellError(Exception):
    """A method cannot produce this cell (tensor type, family, format).

    Raised before any heavy work; a sweep records the cell as skipped with
    this message.
    """
