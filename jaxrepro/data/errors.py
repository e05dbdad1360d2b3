"""The one exception type of the data pipeline, so callers can report it cleanly."""

from jaxrepro.errors import UserError


class DataError(UserError, RuntimeError):
    """Data cannot be loaded as asked; the message says why and what to do."""
