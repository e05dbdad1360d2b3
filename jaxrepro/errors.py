"""The one base class of the errors a user can fix.

Every command-line tool reports a `UserError` as `error: <message>` and exits with
status 2 (`jaxrepro.cli.guarded`); anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An input, option or file the user can fix; the message says what to do."""
