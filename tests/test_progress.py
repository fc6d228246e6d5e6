"""cscompile.progress: drawn where someone watches (a terminal, not CI, no JSON), forced on or
off by CSCOMPILE_PROGRESS, and a bar that says done / total, elapsed and time left."""
import io
import sys

import pytest

from cscompile import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(progress.FORCE_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    return monkeypatch


@pytest.mark.parametrize("force, tty, ci, json_output, shown", [
    (None, True, None, False, True),      # a person at a terminal
    (None, False, None, False, False),    # piped or redirected
    (None, True, "true", False, False),   # CI, even with a terminal
    (None, True, None, True, False),      # the command writes JSON
    ("1", False, "true", True, True),     # forced on beats all of them
    ("0", True, None, False, False),      # forced off
])
def test_enabled(clean_env, force, tty, ci, json_output, shown):
    if force is not None:
        clean_env.setenv(progress.FORCE_ENV, force)
    if ci is not None:
        clean_env.setenv("CI", ci)
    clean_env.setattr(sys, "stderr", _Terminal() if tty else io.StringIO())
    assert progress.enabled(json_output=json_output) is shown


def test_forced_bar_shows_done_total_elapsed_and_time_left(clean_env, capsys):
    clean_env.setenv(progress.FORCE_ENV, "1")
    with progress.bar("scoring", 3, unit="rows") as advance:
        for _ in range(3):
            advance()
    err = capsys.readouterr().err
    assert "scoring" in err and "3/3 rows" in err and "0:00:0" in err and "left" in err


def test_quiet_bar_prints_nothing_and_still_counts(clean_env, capsys):
    with progress.bar("scoring", 2, show=True) as advance:  # not a terminal: quiet
        advance()
        advance(1, description="renamed")
    clean_env.setenv(progress.FORCE_ENV, "1")
    with progress.bar("scoring", 2, show=False) as advance:  # the caller asked for quiet
        advance()
    with progress.status("loading", show=False):
        pass
    assert capsys.readouterr().err == ""
