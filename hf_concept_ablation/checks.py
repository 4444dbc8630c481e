"""Checks of user-given settings that raise a ValueError naming the bad value."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Iterable, Mapping

import numpy as np
import torch


def check_names(given: Iterable[str], known: Iterable[str], what: str, where: str = "") -> None:
    """Raise a ValueError naming each of `given` that is not `known` (``unknown <what>(s) [...]<where>``), and the
    known ones."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}{where}; known: {known}")


def dataclass_from_settings(cls: type, settings: Mapping[str, Any], what: str) -> Any:
    """``cls(**settings)`` for a dataclass `cls`, after `check_names` of the settings against its fields."""
    check_names(settings, (f.name for f in dataclasses.fields(cls)), what)
    return cls(**settings)


def check_number(value: Any, what: str, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
    """Raise a ValueError naming `what` and `value` unless `value` is a finite number (an integer with `integer`, never
    a bool; numpy scalars and one-element tensors count as their number) from `low` to `high`, each end included unless
    it is open."""
    number = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(number, kind) and not isinstance(number, (bool, np.bool_)) and math.isfinite(number) \
        and (low < number if low_open else low <= number) and (number < high if high_open else number <= high)
    if not ok:
        where = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ValueError(f"{what} must be {'an integer' if integer else 'a number'} in {where}, got {value!r}")


def check_float_dtype(name: Any) -> None:
    """Raise a ValueError naming `name` unless it names a floating-point torch dtype."""
    dtype = getattr(torch, str(name), None)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be the name of a floating-point torch dtype such as 'float32' or 'bfloat16', "
                         f"got {name!r}")
