"""Decoding an untrusted JSON body: standard numbers only, bounded nesting, strings of valid Unicode."""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than any chat request; deeper values would make later comparisons and reprs recurse without bound.
MAX_DEPTH = 64
# JSON's \ud800-style escapes can decode to a lone surrogate, which no UTF-8 encoder (protobuf's included) accepts.
_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonBodyError(ValueError):
    """A body that is refused, with the request field at fault ("body" for the whole)."""

    def __init__(self, param: str, problem: str):
        super().__init__(f"{param}: {problem}")
        self.param, self.problem = param, problem


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is beyond the range of a float")
    return value


def decode(raw: bytes) -> Any:
    """The decoded body; raises JsonBodyError naming the field that is malformed, too deep or not valid Unicode."""
    try:
        value = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonBodyError("body", f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as err:  # UnicodeDecodeError and the integer digit limit are ValueErrors too
        raise JsonBodyError("body", f"not valid JSON ({err})") from None
    check_decoded(value)
    return value


def is_unicode(text: str) -> bool:
    """Whether text is made of Unicode scalar values only (no lone surrogate), i.e. encodes to UTF-8."""
    return text.isascii() or _SURROGATE.search(text) is None


def check_decoded(value: Any) -> None:
    """Raises JsonBodyError naming a container nested deeper than MAX_DEPTH or a string that is not Unicode."""
    stack = [(value, "body", 0)]
    while stack:  # iterative: the depth is what is being checked
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                raise JsonBodyError(where, "not valid Unicode (a lone surrogate escape)")
            continue
        if isinstance(item, dict):
            children = item.items()
        elif isinstance(item, list):
            children = enumerate(item)
        else:
            continue
        if depth == MAX_DEPTH:
            raise JsonBodyError(where, f"nested deeper than {MAX_DEPTH} levels")
        for key, child in children:
            if isinstance(key, str) and not is_unicode(key):
                raise JsonBodyError(where, "a key is not valid Unicode (a lone surrogate escape)")
            stack.append((child, _child_name(where, key), depth + 1))


def _child_name(where: str, key: str | int) -> str:
    """Field names as the other refusals write them: messages[0].content, with the body's own keys bare."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return key if where == "body" else f"{where}.{key}"
