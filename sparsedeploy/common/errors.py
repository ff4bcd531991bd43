"""The one exception type that the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix, on one line."""
