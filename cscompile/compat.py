"""Differences between the transformers versions we support, in one place."""

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
