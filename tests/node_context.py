"""The one stub of engine.node.RunContext for tests that call nodes directly (helpers, not tests), and
`run_node`, which calls a node the way the executor does: socket value checks first, then `run`, with input
errors named after the node."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError, node_label
from latentloom.engine.memory import ModelManager
from latentloom.engine.node import Node
from latentloom.nodes.socket_values import value_checkers

ServiceT = TypeVar("ServiceT")


@dataclass
class StubContext:
    """engine.node.RunContext over a real Environment; records progress reports and warnings."""

    env: Environment = field(default_factory=Environment)
    node_id: str = "1"
    display_node_id: str = "1"
    class_type: str = "Node"
    prompt_id: str = "test"
    prompt: dict = field(default_factory=dict)
    extra_data: dict = field(default_factory=dict)
    reports: list[tuple] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def models(self) -> ModelManager:
        return self.env.models

    def service(self, kind: type[ServiceT]) -> ServiceT:
        return self.env.service(kind)

    def find_service(self, kind: type[ServiceT]) -> ServiceT | None:
        return self.env.find_service(kind)

    def progress(self, value: int, maximum: int, preview: tuple[str, bytes] | None = None) -> None:
        self.reports.append((value, maximum, preview))

    def check_interrupt(self) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)


class CountingManager(ModelManager):
    """A CPU model memory manager that counts the modules it is asked to put to use."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.used: list = []

    @contextlib.contextmanager
    def use(self, module, changes=()):
        self.used.append(module)
        with super().use(module, changes) as placed:
            yield placed


def make_env(root: Path | None = None, models_dir: Path | None = None, manager: ModelManager | None = None) \
        -> Environment:
    """An Environment with input/output/temp folders under `root` (created), model folders under `models_dir`,
    and a CPU model memory manager."""
    if root is None:
        env = Environment.create(models_dir=models_dir)
    else:
        env = Environment.create(models_dir=models_dir, input_dir=root / "input", output_dir=root / "output",
                                 temp_dir=root / "temp")
        for folder in (env.input_dir, env.output_dir, env.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
    env.register(manager or ModelManager(device="cpu"))
    return env


def make_context(root: Path | None = None, **kwargs: Any) -> StubContext:
    return StubContext(env=make_env(root), **kwargs)


def run_node(node_cls: type[Node], ctx: StubContext | None = None, **inputs: Any) -> Any:
    """Call `node_cls` with `inputs` as the executor would: every socket input given gets its type's value check,
    and an InputError comes out named "<ClassType> (#id): input '<name>': ..."."""
    ctx = ctx or StubContext()
    ctx.class_type = node_cls.class_type()
    specs = node_cls.input_specs()
    sockets = {name: spec.type for name, spec in specs.items() if name in inputs and not spec.is_widget}
    try:
        value_checkers().check_call(sockets, inputs, node_cls.input_is_list)
        return node_cls.model_construct(**inputs).run(ctx)
    except InputError as error:
        raise error.for_node(node_label(ctx.class_type, ctx.display_node_id)) from error
