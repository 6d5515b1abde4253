"""What a config value may be: one :class:`Check` style for every key of a run (the run spec's fields,
a model's options, a dataset's fields), and the one-line error that names a bad value.

No torch here: the command line checks values before anything heavy is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming it and what is allowed."""


@dataclass(frozen=True)
class Check:
    """What a config value may be: ``accepts(value)``, and ``allowed``, the words that say it."""

    accepts: Callable[[Any], bool]
    allowed: str

    def __call__(self, key: str, value: Any) -> Any:
        """``value`` when accepted, else :class:`ConfigError` naming ``key``, the value and what is allowed."""
        if not self.accepts(value):
            raise ConfigError(f"{key}={value!r} is invalid; allowed: {self.allowed}")
        return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None, allowed: str | None = None) -> Check:
    words = allowed or (f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")
    return Check(lambda value: is_int(value) and low <= value and (high is None or value <= high), words)


def number(low: float, *, inclusive: bool = False) -> Check:
    return Check(lambda value: is_number(value) and (value >= low if inclusive else value > low),
                 f"a number {'>=' if inclusive else '>'} {low:g}")


def fraction(allowed: str = "a number in [0, 1)") -> Check:
    """A number in [0, 1) (a dropout probability, a budget)."""
    return Check(lambda value: is_number(value) and 0 <= value < 1, allowed)


def _same(value: Any, option: Any) -> bool:
    """``value == option``, except that a boolean matches only itself (``1 == True``, yet 1 is no switch)."""
    return value is option if isinstance(value, bool) or isinstance(option, bool) else value == option


def choice(*options: Any) -> Check:
    return Check(lambda value: any(_same(value, option) for option in options),
                 ", ".join(str(option).lower() if isinstance(option, bool) else str(option) for option in options))


def or_null(check: Check, allowed: str | None = None) -> Check:
    return Check(lambda value: value is None or check.accepts(value), allowed or f"{check.allowed}, or null")


SWITCH = choice(True, False)
POSITIVE_INT = integer(1)
