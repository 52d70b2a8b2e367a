"""The one exception type for failures a user can cause and fix."""


class UserError(Exception):
    """A bad path, parameter or input file: the CLI prints the message as one line and exits 1."""
