"""The string and regex utility nodes (ComfyUI's comfy_extras/nodes_string.py): every mode and option against
Python's own str / re results computed here another way, the regex error and backtracking guards, and one graph
through the engine."""

from __future__ import annotations

import re
import time
import unicodedata

import pytest
from node_context import run_node

from latentloom.engine.inputs import InputError
from latentloom.nodes import create_engine
from latentloom.nodes.regex_guard import has_nested_repetition, run_guarded, run_regex
from latentloom.nodes.utility import (
    CaseConverter,
    RegexExtract,
    RegexMatch,
    RegexReplace,
    StringCompare,
    StringContains,
    StringLength,
    StringReplace,
    StringSubstring,
    StringTrim,
)

TEXTS = ["", "hello world", "  Mixed CASE text\twith ÄÖÜ ß and ǅ  \n", "ﬁne straße İstanbul", "x\ny\nz"]


def out(node_cls, **inputs):
    (value,) = run_node(node_cls, **inputs)
    return value


# --- plain string nodes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("start, end", [(0, 0), (0, 5), (2, -1), (-3, 100), (7, 2), (-100, 3)])
def test_substring_is_python_slicing(text, start, end):
    expected = "".join(text[i] for i in range(*slice(start, end).indices(len(text))))
    assert out(StringSubstring, string=text, start=start, end=end) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_length_counts_code_points(text):
    assert out(StringLength, string=text) == sum(1 for _ in text)


def is_cased(char):
    return unicodedata.category(char) in ("Lu", "Ll", "Lt")


@pytest.mark.parametrize("text", TEXTS)
def test_case_modes(text):
    # Written from the Unicode rules the str methods follow, character by character (ß upper-cases to SS,
    # the ﬁ ligature title-cases to Fi, ǅ is already title case).
    assert out(CaseConverter, string=text, mode="UPPERCASE") == "".join(c.upper() for c in text)
    assert out(CaseConverter, string=text, mode="lowercase") == "".join(c.lower() for c in text)
    assert out(CaseConverter, string=text, mode="Capitalize") == text[:1].title() + "".join(
        c.lower() for c in text[1:])
    titled, after_cased = [], False
    for char in text:  # title case: a cased character after a cased one is lowered, any other is title-cased
        titled.append(char.lower() if after_cased else char.title())
        after_cased = is_cased(char)
    assert out(CaseConverter, string=text, mode="Title Case") == "".join(titled)


def test_case_modes_by_hand():
    assert out(CaseConverter, string="hello wORLD o'neil", mode="Title Case") == "Hello World O'Neil"
    assert out(CaseConverter, string="hello wORLD", mode="Capitalize") == "Hello world"
    assert out(CaseConverter, string="straße", mode="UPPERCASE") == "STRASSE"


@pytest.mark.parametrize("text", TEXTS)
def test_trim_modes_remove_unicode_whitespace(text):
    def left(s):
        i = 0
        while i < len(s) and s[i].isspace():
            i += 1
        return s[i:]

    def right(s):
        return left(s[::-1])[::-1]

    assert out(StringTrim, string=text, mode="Both") == left(right(text))
    assert out(StringTrim, string=text, mode="Left") == left(text)
    assert out(StringTrim, string=text, mode="Right") == right(text)


@pytest.mark.parametrize("text, find, replace", [("a-b-c", "-", "+"), ("aaa", "aa", "b"), ("abc", "", "|"),
                                                 ("abc", "x", "y"), ("", "", "z")])
def test_replace_is_every_non_overlapping_occurrence(text, find, replace):
    # An empty `find` matches between every two characters and at both ends.
    expected = replace.join(text.split(find)) if find else "".join(replace + c for c in text) + replace
    assert out(StringReplace, string=text, find=find, replace=replace) == expected


@pytest.mark.parametrize("text, sub", [("Hello World", "world"), ("Hello World", "World"), ("abc", ""),
                                       ("abc", "abcd"), ("STRASSE", "strasse")])
def test_contains_with_and_without_case(text, sub):
    def found(hay, needle):
        return any(hay[i:i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))

    assert out(StringContains, string=text, substring=sub, case_sensitive=True) is found(text, sub)
    assert out(StringContains, string=text, substring=sub, case_sensitive=False) is found(text.lower(), sub.lower())


@pytest.mark.parametrize("a, b", [("Hello World", "hello"), ("Hello World", "World"), ("abc", "abc"), ("abc", "ABC"),
                                  ("abc", ""), ("", "x")])
def test_compare_modes(a, b):
    for case_sensitive in (True, False):
        x, y = (a, b) if case_sensitive else (a.lower(), b.lower())
        assert out(StringCompare, string_a=a, string_b=b, mode="Equal", case_sensitive=case_sensitive) is (x == y)
        assert out(StringCompare, string_a=a, string_b=b, mode="Starts With",
                   case_sensitive=case_sensitive) is (x[:len(y)] == y)
        assert out(StringCompare, string_a=a, string_b=b, mode="Ends With",
                   case_sensitive=case_sensitive) is (x[len(x) - len(y):] == y if y else True)


# --- regex nodes ---------------------------------------------------------------------------------------------

FLAG_CASES = [dict(case_insensitive=c, multiline=m, dotall=d) for c in (True, False) for m in (True, False)
              for d in (True, False)]
SAMPLE = "Cat sat\nthe cat ran\nCAT.end"


def flags_of(options):
    return ((re.I if options["case_insensitive"] else 0) | (re.M if options["multiline"] else 0)
            | (re.S if options["dotall"] else 0))


@pytest.mark.parametrize("options", FLAG_CASES)
@pytest.mark.parametrize("pattern", ["cat", "^the", "t$", "sat.the", r"^c\w+"])
def test_regex_match_follows_each_flag(options, pattern):
    expected = any(True for _ in re.finditer(pattern, SAMPLE, flags_of(options)))
    assert out(RegexMatch, string=SAMPLE, regex_pattern=pattern, **options) is expected


def test_regex_match_flag_effects_are_visible():
    """Each flag changes the answer on a case built for it (so the flags are not ignored wholesale)."""
    base = dict(case_insensitive=False, multiline=False, dotall=False)
    assert out(RegexMatch, string="ABC", regex_pattern="abc", **base) is False
    assert out(RegexMatch, string="ABC", regex_pattern="abc", **{**base, "case_insensitive": True}) is True
    assert out(RegexMatch, string="a\nb", regex_pattern="^b", **base) is False
    assert out(RegexMatch, string="a\nb", regex_pattern="^b", **{**base, "multiline": True}) is True
    assert out(RegexMatch, string="a\nb", regex_pattern="a.b", **base) is False
    assert out(RegexMatch, string="a\nb", regex_pattern="a.b", **{**base, "dotall": True}) is True


def extract_reference(text, pattern, flags, mode, group_index):
    matches = list(re.finditer(pattern, text, flags))
    groups = re.compile(pattern, flags).groups
    if mode == "First Match":
        return matches[0].group(0) if matches else ""
    if mode == "All Matches":  # findall: the whole match without groups, else group 1
        return "\n".join(m.group(1 if groups else 0) or "" for m in matches)
    if mode == "First Group":
        if not matches or groups < group_index:
            return ""
        return matches[0].group(group_index) or ""
    if groups == 0 or groups < group_index:
        return ""
    return "\n".join(m.group(group_index) or "" for m in matches)


@pytest.mark.parametrize("mode", ["First Match", "All Matches", "First Group", "All Groups"])
@pytest.mark.parametrize("pattern", [r"\d+", r"(\w)(\d)", r"(?P<k>\w+)=(\w*)", r"(x)?y", "nothing"])
@pytest.mark.parametrize("group_index", [0, 1, 2, 3])
def test_regex_extract_modes(mode, pattern, group_index):
    text = "a1 b2 key=val other= 33 y y"
    expected = extract_reference(text, pattern, re.I, mode, group_index)
    assert out(RegexExtract, string=text, regex_pattern=pattern, mode=mode, case_insensitive=True, multiline=False,
               dotall=False, group_index=group_index) == expected


def test_regex_extract_examples_by_hand():
    args = dict(case_insensitive=True, multiline=False, dotall=False, group_index=1)
    text = "w=512, h=768"
    assert out(RegexExtract, string=text, regex_pattern=r"\d+", mode="First Match", **args) == "512"
    assert out(RegexExtract, string=text, regex_pattern=r"\d+", mode="All Matches", **args) == "512\n768"
    assert out(RegexExtract, string=text, regex_pattern=r"(\w)=(\d+)", mode="All Matches", **args) == "w\nh"
    assert out(RegexExtract, string=text, regex_pattern=r"(\w)=(\d+)", mode="First Group",
               **{**args, "group_index": 2}) == "512"
    assert out(RegexExtract, string=text, regex_pattern=r"(\w)=(\d+)", mode="All Groups",
               **{**args, "group_index": 2}) == "512\n768"
    assert out(RegexExtract, string="A1 a2", regex_pattern="a(\\d)", mode="All Groups",
               **{**args, "case_insensitive": False}) == "2"


@pytest.mark.parametrize("options", FLAG_CASES)
@pytest.mark.parametrize("count", [0, 1, 2, 100])
@pytest.mark.parametrize("pattern, replace", [("cat", "dog"), (r"(\w+) (\w+)", r"\2 \1"), ("^", "> "),
                                              (r"a.", "<\\g<0>>"), ("(?P<w>t)", "[\\g<w>]")])
def test_regex_replace_counts_and_templates(options, count, pattern, replace):
    flags = flags_of(options)
    pieces, done, position = [], 0, 0
    for match in re.finditer(pattern, SAMPLE, flags):
        if count and done == count:
            break
        pieces.append(SAMPLE[position:match.start()])
        pieces.append(match.expand(replace))
        position, done = match.end(), done + 1
    expected = "".join(pieces) + SAMPLE[position:]
    assert out(RegexReplace, string=SAMPLE, regex_pattern=pattern, replace=replace, count=count,
               **options) == expected


def test_regex_replace_optional_inputs_default_like_comfyui():
    # case_insensitive defaults to True, count to 0 (all).
    assert out(RegexReplace, string="Cat cat CAT", regex_pattern="cat", replace="x") == "x x x"


@pytest.mark.parametrize("node_cls, extra", [(RegexMatch, {}), (RegexExtract, {"mode": "First Match"}),
                                             (RegexReplace, {"replace": "x"})])
def test_invalid_pattern_is_an_input_error(node_cls, extra):
    with pytest.raises(InputError) as caught:
        run_node(node_cls, string="abc", regex_pattern="(unclosed", **extra)
    assert caught.value.input_name == "regex_pattern"
    assert "not a valid regular expression" in str(caught.value) and "missing )" in str(caught.value)
    assert str(caught.value).startswith(f"{node_cls.__name__} (#1): input 'regex_pattern'")


def test_invalid_replacement_template_names_the_replace_input():
    with pytest.raises(InputError) as caught:
        run_node(RegexReplace, string="abc", regex_pattern="b", replace=r"\3")
    assert caught.value.input_name == "replace" and "invalid group reference" in str(caught.value)


# --- the backtracking guard ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, nested", [
    ("(a+)+$", True), ("(a*)*b", True), (r"(\w+\s?)+$", True), (r"(?:x|(y+))+", True), ("((a+))+", True),
    (r"(?>(a+)+$)", True), ("abc", False), (r"\d+", False), ("(a{1,3})+", False), ("(a++)+", False),
    ("(?>a+)+", False), ("(a|b)*c", False), (r"\w+@\w+\.com", False)])
def test_nested_repetition_detection(pattern, nested):
    assert has_nested_repetition(pattern) is nested


class QuickRegexMatch(RegexMatch):
    time_limit_s = 1.0


def test_catastrophic_pattern_fails_within_the_time_limit_instead_of_hanging():
    text = "a" * 60 + "!"  # (a+)+$ needs ~2**60 steps to fail on this in re
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        run_node(QuickRegexMatch, string=text, regex_pattern="(a+)+$", case_insensitive=False, multiline=False,
                 dotall=False)
    assert time.monotonic() - started < 10
    assert caught.value.input_name == "regex_pattern" and "longer than 1 s" in str(caught.value)


def test_guarded_patterns_give_the_same_answers_in_the_child_interpreter():
    text = "one two  three\nfour"
    for operation, options in [("match", {}), ("extract", {"mode": "All Groups", "group_index": 1}),
                               ("extract", {"mode": "First Match", "group_index": 0}),
                               ("replace", {"replace": "<\\1>", "count": 2})]:
        pattern = r"(\w+\s?)+"
        assert has_nested_repetition(pattern)
        assert run_guarded(operation, pattern, re.M, text, 20.0, **options) == \
            run_regex(operation, pattern, re.M, text, **options)
    # Unicode text survives the round trip through the child's stdin/stdout.
    assert run_guarded("extract", r"(\w+ ?)+", 0, "grüße ǅ 日本", 20.0, mode="First Match") == "grüße ǅ 日本"


# --- one graph through the engine ---------------------------------------------------------------------------

def test_string_graph_through_the_engine(tmp_path):
    engine = create_engine(models_dir=tmp_path / "models", output_dir=tmp_path / "out", entry_points=False)
    prompt = {
        "1": {"class_type": "StringTrim", "inputs": {"string": "   width=512 height=768  ", "mode": "Both"}},
        "2": {"class_type": "CaseConverter", "inputs": {"string": ["1", 0], "mode": "UPPERCASE"}},
        "3": {"class_type": "RegexReplace", "inputs": {"string": ["2", 0], "regex_pattern": r"(\w+)=(\d+)",
                                                       "replace": r"\2:\1", "count": 1}},
        "4": {"class_type": "RegexExtract", "inputs": {"string": ["3", 0], "regex_pattern": r"\d+",
                                                       "mode": "All Matches", "case_insensitive": True,
                                                       "multiline": False, "dotall": False, "group_index": 1}},
        "5": {"class_type": "StringLength", "inputs": {"string": ["4", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
        "8": {"class_type": "RegexMatch", "inputs": {"string": ["2", 0], "regex_pattern": "^width",
                                                     "case_insensitive": True, "multiline": False,
                                                     "dotall": False}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    assert result.outputs["6"]["text"] == ["512:WIDTH HEIGHT=768"]
    assert result.outputs["7"]["text"] == [str(len("512\n768"))]
    assert result.outputs["9"]["text"] == ["true"]

    prompt["8"]["inputs"]["regex_pattern"] = "[unclosed"
    failed = engine.run(prompt)
    assert failed.status == "error"
    assert failed.error["exception_message"].startswith("RegexMatch (#8): input 'regex_pattern': is not a valid")
