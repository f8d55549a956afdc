"""Errors that the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
