"""Argument checks shared by the planner's configuration classes: each raises a ValueError that
names the argument, says what was expected and what came."""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(name: str, value: Any) -> None:
    """ValueError unless ``value`` is an int >= 1 (a bool is not an int here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
