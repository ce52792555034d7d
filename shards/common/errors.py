"""Errors a user can act on. Entry points print them as one line and exit; nothing else does."""


class UsageError(Exception):
    """Bad config key, bad value or missing path: the command line must change (exit 2)."""


class DataError(Exception):
    """The inputs or the run went wrong in a way the user must fix (exit 1)."""


class Interrupted(Exception):
    """Stopped by a signal after saving what lets the same command continue (exit 130, as for Ctrl-C)."""
