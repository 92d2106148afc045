"""JSON of usage events: numbers bounded before they are converted, and written back exactly.

Every entry point decodes with `decode_json` (the API's request bodies, the consumer's Kafka
messages, the CLI's files), so what one accepts the others store. The bounds exist because a
JSON number is cheap to send and can be expensive to convert: `1e600000` costs seconds of
CPU as an integer, `1e-999999999` a gigabyte as fixed-point text, and a 5,000-digit integer
cannot be written by `json.dumps` at all. So a number token is checked as text first (at
most `MAX_NUMBER_CHARS` characters, which makes converting it cheap), then as a number:

- at most `MAX_NUMBER_DIGITS` digits (significant ones and trailing zeros of the mantissa:
  `1000` has 4, `1e3` and `0.001` have 1), and
- zero, or a magnitude between 1e-308 and 1e308 (`MAX_EXPONENT`: what any JSON reader can
  hold as a double).

These are properties of the number, not of its spelling, so the text `dump_json` writes for
an accepted number is accepted again (the API re-serialises what the consumer re-reads).

A number outside them is not an error of the decoder: it decodes to an `OutOfRangeNumber`, so
the validator can name the field that holds it (`quantity`, `metadata.x.y`). Non-integer
numbers decode to `Decimal` and `dump_json` writes them back digit for digit, so a metadata
value such as 0.1 or 12345678901234567890.5 is stored exactly as it was sent.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from json.encoder import encode_basestring_ascii
from typing import Any

MAX_NUMBER_CHARS = 400  # room for 0.000...(308 zeros)...1 and a long exponent
MAX_NUMBER_DIGITS = 64
MAX_EXPONENT = 308
_ZERO = Decimal(0)


class OutOfRangeNumber:
    """A JSON number outside the bounds above, kept as (the start of) its text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else text[:20] + "..."

    def describe(self) -> str:
        return (
            f"the number {self.text} is out of range (at most {MAX_NUMBER_DIGITS} digits, "
            f"and zero or between 1e-{MAX_EXPONENT} and 1e{MAX_EXPONENT} in magnitude)"
        )

    def __repr__(self) -> str:
        return f"OutOfRangeNumber({self.text!r})"


_INT_LIMIT = 10**MAX_NUMBER_DIGITS


def int_out_of_range(value: int) -> OutOfRangeNumber | None:
    """Integers are decoded by Python's own parser (the common case, and the fastest: a hook
    per integer cost ~0.6 µs), which refuses more than 4,300 digits itself; the validator
    holds them to MAX_NUMBER_DIGITS with this."""
    if -_INT_LIMIT < value < _INT_LIMIT:
        return None
    return OutOfRangeNumber(str(value))


def _decimal(text: str) -> Decimal | OutOfRangeNumber:
    if len(text) > MAX_NUMBER_CHARS:
        return OutOfRangeNumber(text)
    try:
        number = Decimal(text)  # bounded text: cheap whatever the exponent says
    except InvalidOperation:  # an exponent beyond what Decimal can even represent
        return OutOfRangeNumber(text)
    if not number:
        return _ZERO  # "0e99999" would otherwise print as 99,999 zeros
    if abs(number.adjusted()) > MAX_EXPONENT:
        return OutOfRangeNumber(text)
    # a number has no more digits than its text has characters: count only for long ones
    if len(text) > MAX_NUMBER_DIGITS and len(number.as_tuple().digits) > MAX_NUMBER_DIGITS:
        return OutOfRangeNumber(text)
    return number


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (NaN and Infinity are not JSON)")


_DECODER = json.JSONDecoder(parse_float=_decimal, parse_constant=_refuse_constant)


def decode_json(text: str) -> Any:
    """Decode JSON text with bounded numbers (see the module docstring).

    Raises ValueError (malformed, NaN/Infinity, an integer of more than 4,300 digits) or
    RecursionError (nested too deep for the parser); nothing else for any text. Non-integer
    numbers out of range decode to `OutOfRangeNumber`; integers to `int` (see
    `int_out_of_range`).
    """
    return _DECODER.decode(text)


def dump_json(value: Any) -> str:
    """Compact ASCII JSON of a decoded value, numbers exactly as decoded.

    The common metadata (strings, whole numbers) goes through the C encoder; a Decimal
    anywhere switches to the exact writer below (the C encoder would need floats, which
    round). Raises TypeError for a value `decode_json` cannot produce.
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except TypeError:
        parts: list[str] = []
        _write_exact(value, parts)
        return "".join(parts)


def _write_exact(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is Decimal:
        out.append(str(value))  # e.g. 1.5, 1E+5, -0.25: all valid JSON numbers
    elif kind is str:
        out.append(encode_basestring_ascii(value))
    elif kind is int:
        out.append(int.__repr__(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is dict:
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if type(key) is not str:
                raise TypeError(f"JSON object keys are strings, not {type(key).__name__}")
            if index:
                out.append(",")
            out.append(encode_basestring_ascii(key))
            out.append(":")
            _write_exact(item, out)
        out.append("}")
    elif kind is list:
        out.append("[")
        for index, item in enumerate(value):
            if index:
                out.append(",")
            if type(item) is Decimal:
                out.append(str(item))
            else:
                _write_exact(item, out)
        out.append("]")
    else:
        raise TypeError(f"not JSON serialisable: {kind.__name__}")
