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


def friendly_errors(fn):
    """CLI decorator: CsError becomes one line on stderr and its exit code, never a traceback."""
    import functools
    import os
    import sys

    import click

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CsError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # a bug of ours: one line unless debugging
            if os.environ.get("CSCOMPILE_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"internal error: {type(e).__name__}: {first} "
                       f"(set CSCOMPILE_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper
