"""Loading the scripts in tools/ (not a package) as modules, and running a benchmark's main() for its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module; tools/ goes on sys.path for the scripts that import each other."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_json(tool: ModuleType, capsys: Any, *argv: str) -> dict:
    """The JSON report `tool.main(argv)` prints; the benchmarks set torch's thread count, which is restored."""
    threads = torch.get_num_threads()
    try:
        assert tool.main(list(argv)) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)
