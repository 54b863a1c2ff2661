"""The one exception type for mistakes a user can fix (bad path, bad flag value, missing column)."""


class UserError(Exception):
    """Printed as one line on stderr, exit status 2, no traceback (unless --debug)."""

    exit_code = 2
