"""The one exception type for failures a user can cause and fix."""


class UserError(ValueError):
    """A bad path, parameter or input file: the CLI prints the message as one line and exits 1.

    A ``ValueError`` so callers of the library can catch bad input the usual way; programming errors
    (a broken invariant no user input reaches) raise plain ``ValueError``/``TypeError`` instead.
    """
