"""transformers' mask builders, called with the argument name the installed version expects (`cache` since the
5.x series deprecated `past_key_values` there: passing the old name prints a FutureWarning in every process)."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable


@functools.lru_cache(maxsize=None)
def _cache_argument(builder: Callable) -> str:
    parameters = inspect.signature(inspect.unwrap(builder)).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def build_mask(builder: Callable, cache: Any = None, **kwargs: Any) -> Any:
    """`builder(**kwargs)` (e.g. create_causal_mask) with `cache` (None: none) under the argument's current name."""
    return builder(**kwargs, **{_cache_argument(builder): cache})
