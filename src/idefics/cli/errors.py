"""The one exception type the CLI turns into a one-line message and exit status 2."""


class UserError(Exception):
    """A mistake in what the user asked for (a missing file, a bad value): reported without a traceback."""
