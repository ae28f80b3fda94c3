import ast
import itertools
import logging
import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402  (after the offline switches, which transformers reads at import)

# One torch thread for the whole session: the tiny test models are dominated by threading overhead (about 10x
# slower with more threads on a shared 2-core machine), and results do not depend on the machine's core count.
# Tests that need another count set it locally and restore it (test_bench_sd).
torch.set_num_threads(1)

# No DEBUG records reach pytest's log capture: torch's inductor logs thousands of DEBUG trace lines per compile,
# and its structured-trace logger ignores logging.disable, so it gets a filter of its own. (Done once here rather
# than with pytest's log_level, which resets the root logger's level around every test phase: a pass over all of
# transformers' and torch's loggers each time, seconds over the suite.)
logging.disable(logging.DEBUG)
logging.getLogger("torch.__trace").addFilter(lambda record: record.levelno > logging.DEBUG)


# Modules marked whole (a module-level `pytestmark`) that the -m expression deselects are not even imported:
# their imports (diffusers, Ray, Playwright, ...) were most of `make test-fast`'s collection time.
_EXPRESSION_WORDS = {"and", "or", "not"}


def module_marks(path: Path) -> set[str] | None:
    """Names of the marks in a test module's `pytestmark` statement, read from its source; None without one."""
    source = path.read_text(encoding="utf-8")
    if "pytestmark" not in source:
        return None
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "pytestmark" for target in statement.targets):
            return {node.attr for node in ast.walk(statement.value) if isinstance(node, ast.Attribute)
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "mark"}
    return None


def deselected_whole(marks: set[str], expression: str) -> bool:
    """True when no test of a module with `marks` can match the -m expression, whatever marks its tests add:
    the expression is false for the module's marks with every combination of the other names it mentions."""
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expression)
    others = sorted(set(re.findall(r"[A-Za-z_]\w*", expression)) - _EXPRESSION_WORDS - marks)
    for added in itertools.chain.from_iterable(itertools.combinations(others, n) for n in range(len(others) + 1)):
        present = marks | set(added)
        if compiled.evaluate(lambda name, present=present: name in present):
            return False
    return True


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    expression = config.getoption("markexpr")
    if not expression or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    marks = module_marks(collection_path)
    return True if marks and deselected_whole(marks, expression) else None
