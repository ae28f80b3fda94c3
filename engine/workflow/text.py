"""Text transformations the editor applies to widget values when it exports a prompt."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any


def process_dynamic_prompt(text: str, rng: random.Random) -> str:
    """The editor's `{a|b}` choice syntax and C-style comment stripping on dynamicPrompts text widgets."""
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    frames: list[tuple[list[str], list[str]]] = []  # (finished options, current option chars) per open brace
    top: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        index += 1
        buffer = frames[-1][1] if frames else top
        if char == "\\":
            buffer.append("\\" + (text[index] if index < len(text) else ""))
            index += 1
        elif char == "{":
            frames.append(([], []))
        elif char == "|" and frames:
            frames[-1][0].append("".join(frames[-1][1]))
            frames[-1][1].clear()
        elif char == "}" and frames:
            options, current = frames.pop()
            options.append("".join(current))
            (frames[-1][1] if frames else top).append(rng.choice(options))
        else:
            buffer.append(char)
    while frames:  # an unclosed brace still chooses among what it collected
        options, current = frames.pop()
        options.append("".join(current))
        (frames[-1][1] if frames else top).append(rng.choice(options))
    return re.sub(r"\\([{}|])", r"\1", "".join(top))


# Node types whose filename_prefix widget the editor runs through its search-and-replace on export.
SAVE_NODE_TYPES = frozenset(
    {
        "SaveImage", "SaveImageAdvanced", "SaveSVGNode", "SaveVideo", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio",
        "SaveAudioMP3", "SaveAudioOpus", "SaveAudioAdvanced", "SaveGLB", "Save3DAdvanced", "SaveGaussianSplat",
        "SavePointCloud", "SaveAnimatedPNG", "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent",
    }
)
_DATE_TOKEN = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")
_UNSAFE_FILENAME_CHARS = re.compile(r'[/?<>\\:*|"\x00-\x1f\x7f]')


def format_date(pattern: str, moment: datetime) -> str:
    """The editor's small date formatter: d, M, h, m, s (doubled = zero-padded), yy and yyyy."""
    fields = {"d": moment.day, "M": moment.month, "h": moment.hour, "m": moment.minute, "s": moment.second}

    def token(match: re.Match[str]) -> str:
        text: str = match.group(0)
        if text == "yy":
            return str(moment.year)[2:]
        if text == "yyyy":
            return str(moment.year)
        if text[0] in fields:
            return str(fields[text[0]]).zfill(len(text))
        return text

    return _DATE_TOKEN.sub(token, pattern)


def js_string(value: Any) -> str:
    """`String(value ?? '')` as JavaScript writes it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def apply_text_replacements(text: str, widget_value: Callable[[str, str], Any], moment: datetime) -> str:
    """Expand `%date:FORMAT%` and `%Node.widget%` (a node by its "Node name for S&R" or title).

    `widget_value(node, widget)` returns the widget's value, or MISSING when there is no such node or widget;
    then the pattern is left as written, like the editor does.
    """

    def replace(match: re.Match[str]) -> str:
        whole: str = match.group(0)
        parts = match.group(1).split(".")
        if len(parts) != 2:
            return format_date(parts[0][5:], moment) if parts[0].startswith("date:") else whole
        value = widget_value(parts[0], parts[1])
        if value is MISSING:
            return whole
        return _UNSAFE_FILENAME_CHARS.sub("_", js_string(value))

    return re.sub(r"%([^%]+)%", replace, text)


MISSING = object()
