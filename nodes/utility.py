"""General-purpose nodes that need no model: strings, regular expressions and a text preview output.

The string nodes are ComfyUI's `comfy_extras/nodes_string.py` (Python's str methods and `re`), with two
deliberate differences: an invalid pattern or replacement template is an error naming the input (ComfyUI's
RegexMatch / RegexExtract quietly return False / ""), and patterns that can backtrack catastrophically run under
a time limit (see regex_guard.py for what is and is not guarded).
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, NodeOutput, RunContext
from latentloom.engine.types import ANY, BOOLEAN, INT, STRING, Boolean, Combo, Int, Output, Socket, String

from .regex_guard import EXTRACT_MODES, RegexTimeout, regex_flags, run_guarded

TEXT = String(multiline=True)


class StringConcatenate(Node):
    category = "utils/string"
    display_name = "Concatenate"
    outputs = (Output(STRING),)
    string_a: Annotated[str, String(multiline=True)] = ""
    string_b: Annotated[str, String(multiline=True)] = ""
    delimiter: Annotated[str, String()] = ""

    def run(self, ctx: RunContext):
        return (f"{self.string_a}{self.delimiter}{self.string_b}",)


class PreviewAny(Node):
    """Shows any value as text in the client (and in the CLI's output)."""

    category = "utils"
    display_name = "Preview Any"
    output_node = True
    source: Annotated[Any, Socket(ANY)]

    def run(self, ctx: RunContext):
        value = self.source
        if isinstance(value, (dict, list, int, float, bool)) or value is None:
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        return NodeOutput(values=(), ui={"text": [text]})


class StringSubstring(Node):
    category = "utils/string"
    display_name = "Substring"
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    start: Annotated[int, Int()] = 0
    end: Annotated[int, Int()] = 0

    def run(self, ctx: RunContext):
        return (self.string[self.start:self.end],)  # Python slicing: negative indices count from the end


class StringLength(Node):
    category = "utils/string"
    display_name = "Length"
    outputs = (Output(INT, name="length"),)
    string: Annotated[str, TEXT] = ""

    def run(self, ctx: RunContext):
        return (len(self.string),)


CASE_MODES = ("UPPERCASE", "lowercase", "Capitalize", "Title Case")


class CaseConverter(Node):
    category = "utils/string"
    display_name = "Case Converter"
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    mode: Annotated[str, Combo(CASE_MODES)] = "UPPERCASE"

    def run(self, ctx: RunContext):
        convert = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
                   "Title Case": str.title}[self.mode]
        return (convert(self.string),)


TRIM_MODES = ("Both", "Left", "Right")


class StringTrim(Node):
    category = "utils/string"
    display_name = "Trim"
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    mode: Annotated[str, Combo(TRIM_MODES)] = "Both"

    def run(self, ctx: RunContext):
        trim = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}[self.mode]
        return (trim(self.string),)


class StringReplace(Node):
    category = "utils/string"
    display_name = "Replace"
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    find: Annotated[str, TEXT] = ""
    replace: Annotated[str, TEXT] = ""

    def run(self, ctx: RunContext):
        return (self.string.replace(self.find, self.replace),)


class StringContains(Node):
    category = "utils/string"
    display_name = "Contains"
    outputs = (Output(BOOLEAN, name="contains"),)
    string: Annotated[str, TEXT] = ""
    substring: Annotated[str, TEXT] = ""
    case_sensitive: Annotated[bool, Boolean()] = True

    def run(self, ctx: RunContext):
        if self.case_sensitive:
            return (self.substring in self.string,)
        return (self.substring.lower() in self.string.lower(),)


COMPARE_MODES = ("Starts With", "Ends With", "Equal")


class StringCompare(Node):
    category = "utils/string"
    display_name = "Compare"
    outputs = (Output(BOOLEAN),)
    string_a: Annotated[str, TEXT] = ""
    string_b: Annotated[str, TEXT] = ""
    mode: Annotated[str, Combo(COMPARE_MODES)] = "Starts With"
    case_sensitive: Annotated[bool, Boolean()] = True

    def run(self, ctx: RunContext):
        a, b = self.string_a, self.string_b
        if not self.case_sensitive:  # str.lower, as ComfyUI (not casefold)
            a, b = a.lower(), b.lower()
        if self.mode == "Equal":
            return (a == b,)
        return (a.startswith(b) if self.mode == "Starts With" else a.endswith(b),)


class _RegexNode(Node):
    """Shared by the three regex nodes: flags, pattern errors and the backtracking guard."""

    # How long a pattern with nested repetition may run (in a child interpreter) before the node fails.
    time_limit_s: ClassVar[float] = 10.0

    def _run_regex(self, operation: str, string: str, pattern: str, flags: int, **options: Any) -> Any:
        try:
            re.compile(pattern, flags)
        except re.error as error:
            raise InputError("regex_pattern", f"is not a valid regular expression: {error}") from error
        try:
            return run_guarded(operation, pattern, flags, string, self.time_limit_s, **options)
        except RegexTimeout as timeout:
            raise InputError("regex_pattern", f"{timeout}: it has nested repetition (like (a+)+) and backtracks "
                                              "catastrophically on this text; use an atomic group (?>...) or a "
                                              "possessive quantifier (a++)") from timeout
        except re.error as error:  # the pattern compiled, so this is the replacement template
            raise InputError("replace", f"is not a valid replacement template: {error}") from error


class RegexMatch(_RegexNode):
    category = "utils/string"
    display_name = "Regex Match"
    outputs = (Output(BOOLEAN, name="matches"),)
    string: Annotated[str, TEXT] = ""
    regex_pattern: Annotated[str, TEXT] = ""
    case_insensitive: Annotated[bool, Boolean()] = True
    multiline: Annotated[bool, Boolean()] = False
    dotall: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        flags = regex_flags(self.case_insensitive, self.multiline, self.dotall)
        return (self._run_regex("match", self.string, self.regex_pattern, flags),)


class RegexExtract(_RegexNode):
    category = "utils/string"
    display_name = "Regex Extract"
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    regex_pattern: Annotated[str, TEXT] = ""
    mode: Annotated[str, Combo(EXTRACT_MODES)] = "First Match"
    case_insensitive: Annotated[bool, Boolean()] = True
    multiline: Annotated[bool, Boolean()] = False
    dotall: Annotated[bool, Boolean()] = False
    group_index: Annotated[int, Int(min=0, max=100)] = 1

    def run(self, ctx: RunContext):
        flags = regex_flags(self.case_insensitive, self.multiline, self.dotall)
        return (self._run_regex("extract", self.string, self.regex_pattern, flags, mode=self.mode,
                                group_index=self.group_index),)


class RegexReplace(_RegexNode):
    category = "utils/string"
    display_name = "Regex Replace"
    description = "Find and replace text using regex patterns."
    outputs = (Output(STRING),)
    string: Annotated[str, TEXT] = ""
    regex_pattern: Annotated[str, TEXT] = ""
    replace: Annotated[str, TEXT] = ""
    case_insensitive: Annotated[bool, Boolean(optional=True)] = True
    multiline: Annotated[bool, Boolean(optional=True)] = False
    dotall: Annotated[bool, Boolean(optional=True, tooltip="When enabled, the dot (.) also matches newlines.")] = False
    count: Annotated[int, Int(min=0, max=100, optional=True,
                              tooltip="The most replacements to make; 0 replaces every occurrence.")] = 0

    def run(self, ctx: RunContext):
        flags = regex_flags(self.case_insensitive, self.multiline, self.dotall)
        return (self._run_regex("replace", self.string, self.regex_pattern, flags, replace=self.replace,
                                count=self.count),)


NODES = [StringConcatenate, StringSubstring, StringLength, CaseConverter, StringTrim, StringReplace, StringContains,
         StringCompare, RegexMatch, RegexExtract, RegexReplace, PreviewAny]
