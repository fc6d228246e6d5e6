"""Third-party libraries in one place: differences between the transformers versions we
support, and keeping their warnings off the user's terminal."""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_arg(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x


def cache_kwargs(model, cache) -> dict:
    """{"cache": cache} where the model's forward takes `cache` (newer transformers, which
    warn on every call given `past_key_values`), else {"past_key_values": cache}."""
    return {_cache_arg(type(model).forward): cache}


def hide_third_party_warnings(command):
    """CLI decorator: the command runs with Python warnings and transformers' log warnings
    off (a FutureWarning from a library says nothing the user can act on), unless it is
    given verbose=True (its --verbose flag, consumed here). cscompile itself never warns
    through `warnings`: its notices are printed lines, which stay."""
    import functools
    import warnings

    @functools.wraps(command)
    def wrapper(*args, verbose: bool = False, **kwargs):
        if verbose:
            return command(*args, **kwargs)
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        finally:
            hf_logging.set_verbosity(level)

    return wrapper
