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


class OutputWriteError(UserInputError, OSError):
    """The output cannot be written (disk full, read-only, not a directory, ...).

    Also an OSError, so callers that handle I/O failures generically still catch it.
    """


class BuildError(CsError):
    """The build itself failed on valid input."""

    exit_code = 1


MAX_MESSAGE_CHARS = 1000  # a message quoting a 5000-character path stays readable


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Collapse a message onto one line and cap its length."""
    text = " ".join(str(text).split("\n")).replace("\r", " ").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def friendly_errors(fn):
    """CLI decorator: CsError becomes one line on stderr and its exit code, never a traceback.

    An OSError that escapes (a path too long, permission denied, a full disk) comes from the
    user's environment: it is reported the same way, with exit code 2.
    """
    import functools
    import os
    import sys

    import click

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CsError as e:
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:
            if os.environ.get("CSCOMPILE_DEBUG"):
                raise
            what = e.strerror or str(e) or type(e).__name__
            name = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {one_line(f'{what}{name}', 300)}", err=True)
            sys.exit(UserInputError.exit_code)
        except Exception as e:  # a bug of ours: one line unless debugging
            if os.environ.get("CSCOMPILE_DEBUG"):
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"internal error: {type(e).__name__}: {one_line(first, 300)} "
                       f"(set CSCOMPILE_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)

    return wrapper
