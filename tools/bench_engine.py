"""Engine benchmark: validate and run chains and wide fans of trivial nodes; prints one JSON object.

    python tools/bench_engine.py --nodes 10000 [--shape chain|fan]

Figures: validate_s (API prompt -> typed graph), run_s (first run), rerun_s (unchanged graph, all cached;
validation included, as for every later figure),
one_change_s (one constant changed near the end of a chain / in one branch of a fan), peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Annotated, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latentloom.engine.api import Engine  # noqa: E402
from latentloom.engine.environment import Environment  # noqa: E402
from latentloom.engine.node import Node, NodeOutput  # noqa: E402
from latentloom.engine.registry import NodeRegistry  # noqa: E402
from latentloom.engine.types import FLOAT, Float, Output, Socket  # noqa: E402


class Value(Node):
    outputs = (Output(FLOAT),)
    value: Annotated[float, Float()] = 0.0

    def run(self, ctx):
        return (self.value,)


class Increment(Node):
    outputs = (Output(FLOAT),)
    x: Annotated[Any, Socket(FLOAT)]
    by: Annotated[float, Float()] = 1.0

    def run(self, ctx):
        return (self.x + self.by,)


class Sink(Node):
    output_node = True
    x: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx):
        return NodeOutput(ui={"value": [self.x]})


def chain(n: int) -> dict:
    prompt = {"0": {"class_type": "Value", "inputs": {"value": 0.0}}}
    for i in range(1, n - 1):
        prompt[str(i)] = {"class_type": "Increment", "inputs": {"x": [str(i - 1), 0], "by": 1.0}}
    prompt["sink"] = {"class_type": "Sink", "inputs": {"x": [str(n - 2), 0]}}
    return prompt


def fan(n: int) -> dict:
    """One source feeding (n-1)/2 branches, each ending in its own output node."""
    prompt = {"src": {"class_type": "Value", "inputs": {"value": 0.0}}}
    for i in range((n - 1) // 2):
        prompt[f"b{i}"] = {"class_type": "Increment", "inputs": {"x": ["src", 0], "by": float(i)}}
        prompt[f"o{i}"] = {"class_type": "Sink", "inputs": {"x": [f"b{i}", 0]}}
    return prompt


def measure(nodes: int, shape: str) -> dict:
    engine = Engine(NodeRegistry([Value, Increment, Sink]), Environment.create())
    prompt = chain(nodes) if shape == "chain" else fan(nodes)

    started = time.perf_counter()
    checked = engine.validate(prompt)
    validate_s = time.perf_counter() - started
    assert checked.ok, checked.error

    started = time.perf_counter()
    first = engine.executor.run(checked.graph)
    run_s = time.perf_counter() - started
    assert first.ok, first.error

    started = time.perf_counter()
    again = engine.run(prompt)
    rerun_s = time.perf_counter() - started
    assert again.ok and not again.executed

    changed_id = str(nodes - 3) if shape == "chain" else "b0"
    prompt[changed_id]["inputs"]["by"] = 0.5  # a value no other node has (keys are content)
    started = time.perf_counter()
    changed = engine.run(prompt)
    one_change_s = time.perf_counter() - started
    assert changed.ok

    return {
        "shape": shape, "nodes": len(prompt), "validate_s": round(validate_s, 4), "run_s": round(run_s, 4),
        "rerun_s": round(rerun_s, 4), "one_change_s": round(one_change_s, 4),
        "one_change_executed": len(changed.executed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=10000)
    parser.add_argument("--shape", choices=("chain", "fan"), default="chain")
    args = parser.parse_args()
    print(json.dumps(measure(args.nodes, args.shape)))


if __name__ == "__main__":
    main()
