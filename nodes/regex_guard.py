"""The regex operations of the string nodes, with a guard against catastrophic backtracking.

Patterns come from users and run on Python's `re`, as in ComfyUI. `re` backtracks: a pattern such as `(a+)+$` takes
time exponential in the length of a string it fails to match, and `re` can be neither interrupted nor given a time
limit (it holds the GIL for the whole match). The guard is cheap and static: a pattern whose parse tree has an
unbounded repetition inside another repetition (the shape of every classic exponential case) runs in a child
interpreter with a time limit instead of in-process. Other patterns run in-process at full speed. What the guard
does not catch: exponential cases without nested repetition (e.g. overlapping alternatives under one `*`, as in
`(a|a)*$`, or long chains of `.*`), which stay polynomial-or-worse in-process — a known, documented risk.

This module imports only the standard library: the child interpreter runs this very file (`python -I -S`), without
site-packages, reading one JSON request on stdin and writing one JSON reply on stdout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

# The modes of RegexExtract, in ComfyUI's combo order.
EXTRACT_MODES = ("First Match", "All Matches", "First Group", "All Groups")


class RegexTimeout(Exception):
    """A guarded pattern ran past its time limit."""


def regex_flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    flags = 0
    if case_insensitive:
        flags |= re.IGNORECASE
    if multiline:
        flags |= re.MULTILINE
    if dotall:
        flags |= re.DOTALL
    return flags


try:  # CPython's own regex parser (re._parser since 3.11); without it every pattern counts as risky
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parser  # type: ignore[attr-defined]

    _MAXREPEAT = _sre_constants.MAXREPEAT
    _REPEATS = {_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT, _sre_constants.POSSESSIVE_REPEAT}
except ImportError:  # pragma: no cover - other interpreters
    _sre_parser = None


def has_nested_repetition(pattern: str, flags: int = 0) -> bool:
    """True when an unbounded repetition (`*`, `+`, `{n,}`) sits inside another repetition. Possessive
    repetitions (`a++`) and atomic groups (`(?>...)`) never backtrack into their body and are not counted."""
    if _sre_parser is None:
        return True
    # Explicit stack of (subpattern items, number of enclosing repetitions); no recursion.
    stack: list[tuple[Any, int]] = [(_sre_parser.parse(pattern, flags), 0)]
    while stack:
        items, depth = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                if op == _sre_constants.POSSESSIVE_REPEAT:
                    stack.append((av[2], 0))  # no backtracking into it from outside; its inside still counts
                    continue
                if depth > 0 and av[1] == _MAXREPEAT:
                    return True
                if av[1] > 1:
                    stack.append((av[2], depth + 1))
                else:
                    stack.append((av[2], depth))
            elif op == _sre_constants.ATOMIC_GROUP:
                stack.append((av, 0))
            elif op == _sre_constants.SUBPATTERN:
                stack.append((av[-1], depth))
            elif op == _sre_constants.BRANCH:
                stack.extend((branch, depth) for branch in av[1])
            elif op in (_sre_constants.ASSERT, _sre_constants.ASSERT_NOT):
                stack.append((av[1], depth))
            elif op == _sre_constants.GROUPREF_EXISTS:
                stack.extend((branch, depth) for branch in av[1:] if branch is not None)
    return False


def run_regex(operation: str, pattern: str, flags: int, string: str, **options: Any) -> str | bool:
    """One operation of the string nodes, with ComfyUI's semantics:
    - "match": whether the pattern occurs anywhere (re.search);
    - "extract" with `mode` (EXTRACT_MODES) and `group_index`: the first match, all matches (re.findall: for a
      pattern with groups, the first group of each match), the given group of the first match, or the given
      group of every match, joined by newlines; a group index past the pattern's groups gives "", and so does
      a group that did not take part in the match (ComfyUI returns None there);
    - "replace" with `replace` and `count` (0 = all): re.sub.
    Raises re.error for an invalid pattern or replacement template."""
    compiled = re.compile(pattern, flags)
    if operation == "match":
        return compiled.search(string) is not None
    if operation == "replace":
        return compiled.sub(options["replace"], string, count=options.get("count", 0))
    if operation != "extract":
        raise ValueError(f"unknown regex operation {operation!r}")
    mode, group_index = options["mode"], options.get("group_index", 1)
    if mode == "First Match":
        match = compiled.search(string)
        return match.group(0) if match else ""
    if mode == "All Matches":
        found = compiled.findall(string)
        return "\n".join(item[0] if isinstance(item, tuple) else item for item in found)
    if mode == "First Group":
        match = compiled.search(string)
        if match is None or compiled.groups < group_index:
            return ""
        return match.group(group_index) or ""
    if mode == "All Groups":
        if compiled.groups == 0 or compiled.groups < group_index:
            return ""
        return "\n".join(match.group(group_index) or "" for match in compiled.finditer(string))
    raise ValueError(f"unknown extract mode {mode!r}")


def run_guarded(operation: str, pattern: str, flags: int, string: str, time_limit: float,
                **options: Any) -> str | bool:
    """`run_regex`, in a child interpreter with a time limit when the pattern has nested repetition.
    Raises re.error (invalid pattern or template) or RegexTimeout."""
    re.compile(pattern, flags)  # invalid patterns fail here, in-process, with re's own message
    if not has_nested_repetition(pattern, flags):
        return run_regex(operation, pattern, flags, string, **options)
    request = json.dumps({"operation": operation, "pattern": pattern, "flags": flags, "string": string,
                          "options": options})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", __file__], input=request, capture_output=True,
                              text=True, encoding="utf-8", timeout=time_limit, check=False)
    except subprocess.TimeoutExpired as timeout:
        raise RegexTimeout(f"took longer than {time_limit:g} s") from timeout
    if done.returncode != 0:
        raise RuntimeError(f"the regex worker failed: {done.stderr.strip()[-500:]}")
    reply = json.loads(done.stdout)
    if "error" in reply:
        raise re.error(reply["error"])
    return reply["result"]


def _serve_one_request() -> None:
    request = json.loads(sys.stdin.read())
    try:
        result = run_regex(request["operation"], request["pattern"], request["flags"], request["string"],
                           **request["options"])
        reply: dict[str, Any] = {"result": result}
    except re.error as error:
        reply = {"error": str(error)}
    sys.stdout.write(json.dumps(reply))


if __name__ == "__main__":
    _serve_one_request()
