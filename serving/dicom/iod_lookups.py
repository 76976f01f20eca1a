"""highdicom's two IOD table lookups, each answered once per argument set.

Why: building a study's SR and presentation states asks highdicom, ~15 times for a two-image
study, whether an attribute is part of an IOD (``is_attribute_in_iod``: ``SOPClass`` checks
ContentDate and ContentTime for its own class; every referenced image is checked for pixel
data and frames, ``does_iod_have_pixel_data``). Each call walks every attribute of every module
of the IOD in the standard's tables, for an answer that depends only on its arguments and
tables loaded once. Answered once, a two-image study's objects took 21.7-22.4 ms to build and
write instead of 27.4-29.1 (``send_back_bundle_ms`` of ``python -m benchmarks.pacs_bench``;
docs/benchmarks.md, "highdicom's IOD lookups, once per argument set").

highdicom has no cache of its own for them, and its modules import the two functions by name,
so :func:`memoize_highdicom_lookups` puts the memoized versions under those names in every
highdicom module that holds them (its ``_standard_utils`` too, so a module imported later gets
them as well). Hand-written because no library offers it; the answers are the functions' own
(``tests/unit/serving/test_iod_lookups.py`` holds them equal).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import highdicom._standard_utils as _standard_utils

#: The distinct (attribute, SOP class) questions kept; the SOP classes we build or reference
#: are a handful, so this only bounds a process that sees unusual ones.
CACHE_SIZE = 1024

_NAMES = ("is_attribute_in_iod", "does_iod_have_pixel_data")


def _hashable(value: Any) -> Any:
    """A sequence of path elements as a tuple, a UID as its plain str (the same question), None as is."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return None if value is None else str(value)


def _memoized(original: Callable[..., bool]) -> Callable[..., bool]:
    """``original`` answering each set of arguments once (however passed); its errors are not cached."""
    signature = inspect.signature(original)

    @functools.lru_cache(maxsize=CACHE_SIZE)
    def cached(key: tuple[tuple[str, Any], ...]) -> bool:
        return original(**{name: list(value) if isinstance(value, tuple) else value for name, value in key})

    @functools.wraps(original)
    def lookup(*args: Any, **kwargs: Any) -> bool:
        bound = signature.bind(*args, **kwargs)
        return cached(tuple((name, _hashable(value)) for name, value in bound.arguments.items()))

    lookup.cache_info = cached.cache_info  # type: ignore[attr-defined]
    lookup.__wrapped_original__ = original  # type: ignore[attr-defined]
    return lookup


def memoize_highdicom_lookups() -> dict[str, Callable[..., bool]]:
    """Install the memoized lookups (once per process; later calls find them installed)."""
    installed: dict[str, Callable[..., bool]] = {}
    for name in _NAMES:
        current = getattr(_standard_utils, name)
        original = getattr(current, "__wrapped_original__", current)
        memo = current if original is not current else _memoized(original)
        installed[name] = memo
        for module_name, module in list(sys.modules.items()):
            if module_name.split(".")[0] == "highdicom" and getattr(module, name, None) is original:
                setattr(module, name, memo)
    return installed
