"""One way to read JSON from outside (HTTP bodies, workflow files, PNG text chunks, the queue database) and one
way to write JSON that can always be read and served back.

Python's `json` accepts what cannot be served again: `NaN`/`Infinity` (and `1e400`, which becomes inf) are not
JSON, a lone UTF-16 surrogate ("\\ud800") cannot be encoded as UTF-8, a 5000-deep body exhausts the recursion
limit, and a 400-digit integer overflows `float()`. `loads` refuses all of these with a JsonInputError naming
where in the document the value sits; `to_plain` makes any value storable (non-finite numbers become null, lone
surrogates U+FFFD); `dumps` is `json.dumps` of that. The checks walk the parsed value with an explicit stack.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal

MAX_DEPTH = 128                 # UI workflows with nested subgraphs stay below 30
MAX_INT_BITS = 332              # about 10**100: far beyond any seed, size or step count, far below float overflow
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
# What a refused value can look like in JSON text (a match inside a string only costs a needless walk):
# NaN/Infinity, exponents of three digits (1e400 -> inf), integers of 100+ digits, escaped surrogates.
# Separate simple searches: one alternation of them all is several times slower.
SUSPICIOUS = ("NaN", "Infinity", r"[eE][+-]?[0-9]{3}", r"[0-9]{100}", r"\\u[dD][89a-fA-F]")
SUSPICIOUS_TEXT = tuple(re.compile(pattern) for pattern in SUSPICIOUS)
SUSPICIOUS_BYTES = tuple(re.compile(pattern.encode()) for pattern in SUSPICIOUS)
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonInputError(ValueError):
    """A JSON document we refuse; the message says what and where ('extra_data.x[2]')."""


class MalformedJsonError(JsonInputError):
    """Text that is not JSON at all (rather than JSON holding a value we refuse): a caller may take it as text."""


def _where(path: tuple[Any, ...]) -> str:
    text = ""
    if len(path) > 12:
        path = (*path[:6], "…", *path[-4:])
    for part in path:
        if part == "…":
            text += part
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the document"


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH,
          surrogates: Literal["refuse", "replace"] = "refuse") -> Any:
    """Parse and check. Raises JsonInputError (a ValueError) for malformed JSON and for values that could not be
    served back. With surrogates="replace", lone surrogates become U+FFFD instead of an error."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonInputError(f"JSON nested more than {max_depth} levels deep") from None
    except UnicodeDecodeError as exc:
        raise MalformedJsonError(f"not UTF-8 text: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, and int() of more than 4300 digits
        raise MalformedJsonError(f"malformed JSON: {exc}") from None
    if _may_need_checks(text, max_depth):
        return check(value, max_depth=max_depth, surrogates=surrogates)
    return value


def _nesting_depth_above(text: str | bytes, limit: int) -> bool:
    """Whether the (valid) JSON text nests containers more than `limit` deep: strip the strings, keep the
    brackets, then peel the innermost pairs off level by level (all in C; at most `limit` passes)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    brackets = NOT_BRACKET.sub("", JSON_STRING.sub("", text))
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace("[]", "").replace("{}", "")
    return bool(brackets)


def _may_need_checks(text: str | bytes, max_depth: int) -> bool:
    """A cheap screen of the text: only documents that might hold a refused value get the full walk."""
    if isinstance(text, str):
        if not text.isascii() and LONE_SURROGATE.search(text):
            return True
        suspicious = any(pattern.search(text) for pattern in SUSPICIOUS_TEXT)
        opened = text.count("[") + text.count("{")
    else:
        suspicious = any(pattern.search(text) for pattern in SUSPICIOUS_BYTES)
        opened = text.count(b"[") + text.count(b"{")
    return suspicious or (opened > max_depth and _nesting_depth_above(text, max_depth))


def _checked_string(text: str, path: tuple[Any, ...], surrogates: str) -> str:
    if text.isascii() or not LONE_SURROGATE.search(text):
        return text
    if surrogates == "replace":
        return LONE_SURROGATE.sub(REPLACEMENT, text)
    raise JsonInputError(f"{_where(path)}: a lone UTF-16 surrogate is not valid text")


def _checked_scalar(value: Any, path: tuple[Any, ...], surrogates: str) -> Any:
    if isinstance(value, str):
        return _checked_string(value, path, surrogates)
    if isinstance(value, float) and not math.isfinite(value):
        raise JsonInputError(f"{_where(path)}: {value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise JsonInputError(f"{_where(path)}: an integer of {len(str(abs(value)))} digits is too large")
    return value


def check(value: Any, *, max_depth: int = MAX_DEPTH, surrogates: Literal["refuse", "replace"] = "refuse") -> Any:
    """The checks of `loads` on an already parsed value; returns it (with surrogates replaced when asked)."""
    if not isinstance(value, (dict, list)):
        return _checked_scalar(value, (), surrogates)
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        container, path = stack.pop()
        if len(path) >= max_depth:
            raise JsonInputError(f"JSON nested more than {max_depth} levels deep (at {_where(path)})")
        if isinstance(container, dict):
            for key in list(container):
                item = container[key]
                clean_key = _checked_string(key, (*path, key), surrogates) if isinstance(key, str) else key
                if clean_key is not key:
                    del container[key]
                    container[clean_key] = item
                if isinstance(item, (dict, list)):
                    stack.append((item, (*path, clean_key)))
                else:
                    container[clean_key] = _checked_scalar(item, (*path, clean_key), surrogates)
        else:
            for index, item in enumerate(container):
                if isinstance(item, (dict, list)):
                    stack.append((item, (*path, index)))
                else:
                    container[index] = _checked_scalar(item, (*path, index), surrogates)
    return value


def _plain_scalar(value: Any) -> Any:
    if isinstance(value, str):
        return value if value.isascii() else LONE_SURROGATE.sub(REPLACEMENT, value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int)):
        return value
    return str(value)


def to_plain(value: Any, max_depth: int = MAX_DEPTH) -> Any:
    """A copy of `value` that `dumps` can always write and `loads` can always read back: dicts with string keys,
    lists (tuples become lists), finite numbers (NaN/inf -> None), text without lone surrogates; anything else
    becomes its str(). Containers nested deeper than `max_depth` are cut off as None."""
    if not isinstance(value, (dict, list, tuple)):
        return _plain_scalar(value)
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, (dict, list, tuple)):
                child: Any = None
                if depth < max_depth:
                    child = {} if isinstance(item, dict) else []
                    stack.append((item, child, depth + 1))
            else:
                child = _plain_scalar(item)
            if isinstance(target, dict):
                target[_plain_scalar(key) if isinstance(key, str) else str(_plain_scalar(key))] = child
            else:
                target.append(child)
    return root


def dumps(value: Any, **kwargs: Any) -> str:
    """JSON text that `loads` reads back: plain values as they are, anything else through `to_plain`. (UTF-8
    text by default: with ensure_ascii=False a lone surrogate shows up as an encoding error here.)"""
    kwargs.setdefault("ensure_ascii", False)
    try:
        text = json.dumps(value, allow_nan=False, **kwargs)
        text.encode("utf-8")
        return text
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError):
        return json.dumps(to_plain(value), allow_nan=False, **kwargs)


def loads_lenient(text: str | bytes, max_depth: int = 4 * MAX_DEPTH) -> Any:
    """Read back JSON we stored ourselves, perhaps with an older version that let NaN or lone surrogates in:
    whatever parses comes back servable (as `to_plain` makes it). Raises JsonInputError only for text that is
    not JSON at all (a corrupt row)."""
    try:
        return loads(text, max_depth=max_depth, surrogates="replace")
    except JsonInputError as refused:
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise refused from None
        return to_plain(value, max_depth)
