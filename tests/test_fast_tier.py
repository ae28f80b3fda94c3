"""The fast tier's collection shortcut (conftest): a module is skipped unimported only when no test in it could
match the -m expression, and every module marked whole is recognised from its source."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import deselected_whole, module_marks

TESTS = Path(__file__).resolve().parent
FAST = "not slow and not browser and not ray and not toy"


@pytest.mark.parametrize("marks, expression, deselected", [
    ({"slow"}, FAST, True),
    ({"toy", "slow"}, "not slow", True),
    ({"slow"}, "toy", False),             # a test inside may add the toy mark
    ({"ray"}, "slow or not ray", False),  # ... or the slow mark
    ({"browser"}, "browser", False),
    ({"skipif"}, FAST, False),
])
def test_a_module_is_skipped_only_when_none_of_its_tests_can_match(marks, expression, deselected):
    assert deselected_whole(marks, expression) is deselected


def test_module_marks_are_read_from_the_source():
    assert module_marks(TESTS / "test_server_browser.py") >= {"browser", "skipif"}
    assert module_marks(TESTS / "test_bench_compare.py") == {"slow"}
    assert module_marks(Path(__file__)) is None  # this module has no pytestmark


def test_every_module_marked_slow_is_recognised():
    marked = [path.name for path in TESTS.glob("test_*.py")
              if path.name != Path(__file__).name and "pytestmark = pytest.mark.slow" in path.read_text()]
    assert len(marked) > 20
    assert all("slow" in (module_marks(TESTS / name) or set()) for name in marked)
