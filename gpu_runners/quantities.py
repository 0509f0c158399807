"""Parsing of the sizes and durations users type: Kubernetes quantities and `30m`-style times.

Quantities are checked here, before any API call, because the API server's rejection of a
malformed quantity ("quantities must match the regular expression ...") arrives only after a
runner registration has been minted, and does not name the option the user typed.
"""

from __future__ import annotations

import re
from decimal import Decimal

from gpu_runners.errors import UsageError

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
# The Kubernetes quantity grammar, minus signs: a size or a CPU count is never negative here.
_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_DURATION = re.compile(r"^(?P<number>[0-9]+)(?P<unit>[smh]?)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "": 60}

QUANTITY_HELP = (
    "a Kubernetes quantity: a number with an optional suffix Ki, Mi, Gi, Ti (powers of 1024), "
    "k, M, G, T (powers of 1000) or m (thousandths), e.g. 16Gi or 500m"
)


def parse_quantity(text: str, option: str) -> Decimal:
    """Returns the value of a Kubernetes quantity such as `16Gi`, `1.5`, `500m` or `2e3`.

    Args:
        text: What the user typed.
        option: The option name, for the error message.

    Returns:
        The quantity's value in base units (bytes, or cores for CPU).

    Raises:
        UsageError: The text is not a quantity, or is zero.
    """
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise UsageError(f"{option}: {text!r} is not {QUANTITY_HELP}")
    number = Decimal(match.group("number"))
    suffix = match.group("suffix") or ""
    if suffix in _BINARY_SUFFIXES:
        value = number * _BINARY_SUFFIXES[suffix]
    elif suffix in _DECIMAL_SUFFIXES:
        value = number * _DECIMAL_SUFFIXES[suffix]
    else:  # an exponent such as e3
        value = number * Decimal(10) ** int(suffix[1:])
    if value <= 0:
        raise UsageError(f"{option}: {text!r} must be greater than zero")
    return value


def parse_duration_seconds(text: str, option: str) -> int:
    """Returns the seconds in a duration such as `90s`, `20m`, `6h`; a bare number is minutes.

    Args:
        text: What the user typed.
        option: The option name, for the error message.

    Returns:
        The duration in whole seconds, at least 1.

    Raises:
        UsageError: The text is not a positive duration in s, m or h.
    """
    match = _DURATION.match(text.strip())
    if match is None or int(match.group("number")) == 0:
        raise UsageError(
            f"{option}: {text!r} is not a positive duration; use a whole number with s, m or h "
            "(a bare number means minutes), e.g. 90s, 20m, 6h"
        )
    return int(match.group("number")) * _DURATION_UNITS[match.group("unit")]
