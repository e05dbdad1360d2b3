"""The one exception type of the data pipeline, so callers can report it cleanly."""


class DataError(RuntimeError):
    """Data cannot be loaded as asked; the message says why and what to do."""
