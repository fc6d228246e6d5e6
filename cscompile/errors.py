"""Errors that reach the user as one clear line and an exit code, never a traceback.

Every module raises these for anything caused by the user's input or environment;
the CLI catches `CsError`, prints `error: <message>` and exits with `exit_code`.
"""


class CsError(Exception):
    """Base class: a failure we can explain in one line."""

    exit_code = 1


class UserInputError(CsError):
    """Bad input: missing/unreadable/malformed file, bad option value, refused pickle."""

    exit_code = 2


class UnsupportedModelError(UserInputError):
    """The model cannot be loaded or has no recognisable attention/FFN structure."""


class BundleError(UserInputError):
    """A bundle is missing, corrupt, tampered with, or from an incompatible version."""


class BuildError(CsError):
    """The build itself failed on valid input."""

    exit_code = 1
