"""Loading a user's callable named ``package.module:attribute`` (``mtmm train --model`` and
``--data``), with errors that name the argument."""

from __future__ import annotations

import importlib
from typing import Callable

__all__ = ["is_spec", "load_callable"]


def is_spec(text: str) -> bool:
    """Whether ``text`` has the ``module:attribute`` form (built-in names have no colon)."""
    module, sep, attribute = text.partition(":")
    return bool(sep and module and attribute)


def load_callable(spec: str, argument: str) -> Callable:
    """The callable ``attribute`` (dotted paths allowed) of the importable ``module``."""
    if not isinstance(spec, str) or not is_spec(spec):
        raise ValueError(f"{argument}: expected 'package.module:callable', got {spec!r}")
    module_name, _, path = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{argument}: cannot import {module_name!r} ({e})") from e
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{argument}: {module_name!r} has no attribute {path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{argument}: {spec!r} is not callable (a {type(obj).__name__})")
    return obj
