"""Small test nodes for the engine conformance suite (scalars instead of images; same graph shapes as ComfyUI's
execution tests). Each node records its calls in the per-test CallLog service (env.register(CallLog()))."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

from latentloom.engine.inputs import InputError
from latentloom.engine.node import ExecutionBlocker, Node, NodeOutput, RunContext
from latentloom.engine.types import ANY, FLOAT, INT, STRING, Boolean, Combo, Float, Int, Output, Socket, String


class CallLog(list):
    """The ids of the nodes called, in call order (a service: one per test engine)."""


class BlobRefs(list):
    """Weak references to the Blobs made so far (a service, created by the first MakeBlob)."""


def _log(ctx: RunContext, node_id_suffix: str = "") -> None:
    calls = ctx.find_service(CallLog)
    if calls is not None:
        calls.append(ctx.node_id + node_id_suffix)


class Const(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[float, Float(min=-1000.0, max=1000.0)] = 0.0

    def run(self, ctx: RunContext):
        _log(ctx)
        return (self.value,)


class IntConst(Node):
    category = "test"
    outputs = (Output(INT),)
    value: Annotated[int, Int(min=0, max=100)] = 0

    def run(self, ctx: RunContext):
        _log(ctx)
        return (self.value,)


class Add(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    a: Annotated[float, Socket(FLOAT)]
    b: Annotated[float, Float(min=-1000.0, max=1000.0)] = 0.0

    def run(self, ctx: RunContext):
        _log(ctx)
        return (self.a + self.b,)


class Mix(Node):
    """Lazy: needs `first` only when mask < 1 and `second` only when mask > 0 (ComfyUI's LazyMix)."""

    category = "test"
    outputs = (Output(FLOAT),)
    first: Annotated[Any, Socket(FLOAT, lazy=True)] = None
    second: Annotated[Any, Socket(FLOAT, lazy=True)] = None
    mask: Annotated[float, Float(min=0.0, max=1.0)] = 0.5

    def inputs_needed(self, ctx: RunContext, available):
        needed = []
        if self.mask < 1.0 and self.first is None:
            needed.append("first")
        if self.mask > 0.0 and self.second is None:
            needed.append("second")
        return needed

    def run(self, ctx: RunContext):
        _log(ctx)
        first = self.first if self.mask < 1.0 else 0.0
        second = self.second if self.mask > 0.0 else 0.0
        return (first * (1 - self.mask) + second * self.mask,)


class Collect(Node):
    """Output node: reports the values it received as UI data."""

    category = "test"
    output_node = True
    value: Annotated[Any, Socket(ANY)]

    def run(self, ctx: RunContext):
        _log(ctx)
        return NodeOutput(ui={"values": [self.value]})


class Passthrough(Node):
    """An output node that also has a socket output (ComfyUI tests P3/P4)."""

    category = "test"
    output_node = True
    outputs = (Output(FLOAT),)
    value: Annotated[float, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        _log(ctx)
        return NodeOutput(values=(self.value,), ui={"values": [self.value]})


class Sleep(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[float, Socket(FLOAT)]
    seconds: Annotated[float, Float(min=0.0, max=10.0)] = 0.1

    async def run(self, ctx: RunContext):
        _log(ctx)
        await asyncio.sleep(self.seconds)
        return (self.value,)


class Fail(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[float, Socket(FLOAT)]
    message: Annotated[str, String()] = "boom"

    def run(self, ctx: RunContext):
        _log(ctx)
        raise RuntimeError(self.message)


class AsyncFail(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[float, Socket(FLOAT)]
    seconds: Annotated[float, Float(min=0.0, max=10.0)] = 0.1

    async def run(self, ctx: RunContext):
        _log(ctx)
        await asyncio.sleep(self.seconds)
        raise ValueError("async failure")


class MakeList(Node):
    category = "test"
    outputs = (Output(FLOAT, is_list=True),)
    input_is_list = True
    a: Annotated[Any, Socket(FLOAT)]
    b: Annotated[Any, Socket(FLOAT, optional=True)] = None
    c: Annotated[Any, Socket(FLOAT, optional=True)] = None

    def run(self, ctx: RunContext):
        _log(ctx)
        items = []
        for values in (self.a, self.b, self.c):
            items.extend(values or [])
        return (items,)


class Sum(Node):
    """input_is_list: receives whole lists."""

    category = "test"
    input_is_list = True
    outputs = (Output(FLOAT),)
    values: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        _log(ctx)
        return (sum(v for v in self.values if not isinstance(v, ExecutionBlocker)),)


class Pair(Node):
    """Mapped over two lists: records the pairs it was called with."""

    category = "test"
    outputs = (Output(STRING),)
    a: Annotated[Any, Socket(FLOAT)]
    b: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        _log(ctx)
        return (f"{self.a}/{self.b}",)


class Gate(Node):
    """Blocks its output when `block` is true."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    block: Annotated[bool, Boolean()] = False
    message: Annotated[str, String(optional=True)] = ""

    def run(self, ctx: RunContext):
        _log(ctx)
        return (ExecutionBlocker(self.message or None) if self.block else self.value,)


class BlockEqual(Node):
    """Blocks the calls whose value equals `blocked` (per list element)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    blocked: Annotated[float, Float()] = 0.0

    def run(self, ctx: RunContext):
        _log(ctx)
        return (ExecutionBlocker(None) if self.value == self.blocked else self.value,)


class Repeat(Node):
    """Expands into a chain of `times` Add nodes (each adds `step`)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    times: Annotated[int, Int(min=0, max=1000)] = 3
    step: Annotated[float, Float(min=-1000.0, max=1000.0)] = 1.0

    def run(self, ctx: RunContext):
        _log(ctx)
        if self.times == 0:
            return (self.value,)
        fragment = {}
        for i in range(self.times):
            fragment[f"add{i}"] = {"class_type": "Add", "inputs": {
                "a": self.value if i == 0 else [f"add{i - 1}", 0], "b": self.step}}
        return NodeOutput(values=([f"add{self.times - 1}", 0],), expand=fragment)


class CyclicExpand(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        fragment = {"x": {"class_type": "Add", "inputs": {"a": ["y", 0], "b": 1.0}},
                    "y": {"class_type": "Add", "inputs": {"a": ["x", 0], "b": 1.0}}}
        return NodeOutput(values=(["x", 0],), expand=fragment)


class ReadFile(Node):
    """Reads a number from a file; its fingerprint is the file's content, so a changed file re-runs."""

    category = "test"
    outputs = (Output(FLOAT),)
    path: Annotated[str, String()] = ""

    @classmethod
    def fingerprint(cls, env, constants):
        path = Path(constants.get("path", ""))
        return path.read_text() if path.exists() else None

    def run(self, ctx: RunContext):
        _log(ctx)
        return (float(Path(self.path).read_text()),)


class Random(Node):
    category = "test"
    deterministic = False
    outputs = (Output(FLOAT),)
    scale: Annotated[float, Float()] = 1.0

    def run(self, ctx: RunContext):
        _log(ctx)
        return (time.perf_counter_ns() % 1000 * self.scale,)


class EvenOnly(Node):
    """A custom validator: the value must be even."""

    category = "test"
    outputs = (Output(INT),)
    value: Annotated[int, Int(min=0, max=100)] = 0

    @classmethod
    def validate_inputs(cls, env, constants, input_types):
        if "value" in constants and constants["value"] % 2:
            return {"value": f"{constants['value']} is odd"}
        return True

    def run(self, ctx: RunContext):
        _log(ctx)
        return (self.value,)


class FloatOnly(Node):
    """Checks linked input types itself (ComfyUI's input_types validators)."""

    category = "test"
    checks_input_types = True
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket("IMAGE,FLOAT")]

    @classmethod
    def validate_inputs(cls, env, constants, input_types):
        if input_types.get("value", "FLOAT") != "FLOAT":
            return f"needs a FLOAT source, got {input_types['value']}"
        if "value" in constants and not isinstance(constants["value"], float):
            return "needs a float literal"
        return True

    def run(self, ctx: RunContext):
        _log(ctx)
        return (self.value,)


class Pick(Node):
    category = "test"
    outputs = (Output(STRING),)
    choice: Annotated[str, Combo(["red", "green", "blue"])] = "red"
    flag: Annotated[bool, Boolean()] = False

    def run(self, ctx: RunContext):
        _log(ctx)
        return (f"{self.choice}:{self.flag}",)


class Steps(Node):
    """Reports progress `steps` times, sleeping `pause` seconds between steps (interrupt tests)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]
    steps: Annotated[int, Int(min=1, max=10000)] = 10
    pause: Annotated[float, Float(min=0.0, max=10.0)] = 0.01

    def run(self, ctx: RunContext):
        _log(ctx)
        for step in range(self.steps):
            time.sleep(self.pause)
            ctx.progress(step + 1, self.steps)
        return (self.value,)


class Variadic(Node):
    """Sums its declared input and any undeclared linked inputs (ComfyUI test X2)."""

    category = "test"
    outputs = (Output(FLOAT),)
    first: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        _log(ctx)
        extra = [v for k, v in (self.model_extra or {}).items()]
        return (self.first + sum(extra),)


class Positive(Node):
    """Passes a positive value on; reports any other as an InputError (which the engine names after the node)."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[float, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        _log(ctx)
        if self.value <= 0:
            raise InputError("value", f"must be positive, got {self.value}")
        return (self.value,)


class Blob:
    """A value whose lifetime tests can watch (weak references in the BlobRefs service)."""

    def cache_nbytes(self) -> int:
        return 10**15  # too big for any cache: only the run holds it


class MakeBlob(Node):
    category = "test"
    outputs = (Output("BLOB"),)
    seed: Annotated[int, Int(min=0, max=100)] = 0

    def run(self, ctx: RunContext):
        import weakref

        _log(ctx)
        blob = Blob()
        if ctx.find_service(BlobRefs) is None:
            ctx.env.register(BlobRefs())
        ctx.service(BlobRefs).append(weakref.ref(blob))
        return (blob,)


class UseBlob(Node):
    category = "test"
    outputs = (Output(FLOAT),)
    blob: Annotated[Any, Socket("BLOB")]

    def run(self, ctx: RunContext):
        _log(ctx)
        return (1.0,)


class LiveBlobs(Node):
    """Reports how many blobs are still alive when it runs."""

    category = "test"
    outputs = (Output(FLOAT),)
    value: Annotated[Any, Socket(FLOAT)]

    def run(self, ctx: RunContext):
        import gc

        _log(ctx)
        gc.collect()
        return (float(sum(ref() is not None for ref in ctx.find_service(BlobRefs) or [])),)


NODES = [MakeBlob, UseBlob, LiveBlobs, Const, IntConst, Add, Mix, Collect, Passthrough, Sleep, Fail, AsyncFail,
         MakeList, Sum, Pair, Gate, BlockEqual, Repeat, CyclicExpand, ReadFile, Random, EvenOnly, FloatOnly, Pick,
         Steps, Variadic, Positive]
