"""The node base class.

A node is one pydantic class: its fields are its inputs (annotated with an InputSpec from engine.types), its
class variables describe it, and `run(ctx)` computes its outputs. The executor builds a fresh instance per call
with `model_construct`, so nodes keep no state between calls.

    class Add(Node):
        outputs = (Output(INT),)
        a: Annotated[int, Int()] = 0
        b: Annotated[int, Int()] = 0

        def run(self, ctx: RunContext):
            return (self.a + self.b,)

`run` returns a tuple (one value per output), a NodeOutput (values, ui data for the client, or a graph fragment
to expand), or may be `async def`. A bad input is reported with `raise InputError(name, what_is_wrong)`
(engine.inputs): the executor names the node. Linked socket values have passed the value checks registered for
their socket type (NodeRegistry.value_checks) before `run` is called.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from .types import InputSpec, Output

if TYPE_CHECKING:
    from .environment import Environment
    from .memory import ModelManager

ServiceT = TypeVar("ServiceT")


class ExecutionBlocker:
    """Placed in an output slot, it makes every consumer skip the calls that would receive it."""

    __slots__ = ("message",)

    def __init__(self, message: str | None = None):
        self.message = message

    def __repr__(self) -> str:
        return f"ExecutionBlocker({self.message!r})"


@dataclass
class NodeOutput:
    """A node's result: output values, optional UI data (e.g. {"images": [...]}) and an optional graph fragment.

    With `expand`, the fragment (API format) is added to the running graph and `values` may contain links
    ([fragment_node_id, slot]) into it; the node's outputs are the values of those links once they are computed.
    """

    values: tuple[Any, ...] = ()
    ui: dict[str, list[Any]] | None = None
    expand: dict[str, dict[str, Any]] | None = None


class RunContext(Protocol):
    """What a running node can see of the engine (implemented by engine.executor.NodeContext)."""

    node_id: str          # the node's id in the running graph (ephemeral ids for expanded nodes)
    display_node_id: str  # the id the client knows (the expanding parent for expanded nodes)
    class_type: str       # the node's type name, as in workflow files
    prompt_id: str
    prompt: dict[str, Any]      # the API-format graph as submitted
    extra_data: dict[str, Any]  # e.g. extra_pnginfo
    env: Environment      # folders: input_dir, output_dir, temp_dir, find_model, list_models

    @property
    def models(self) -> ModelManager:
        """The engine's model memory manager."""
        ...

    def service(self, kind: type[ServiceT]) -> ServiceT:
        """The registered service of that type (LookupError when none is)."""
        ...

    def find_service(self, kind: type[ServiceT]) -> ServiceT | None: ...
    def progress(self, value: int, maximum: int, preview: tuple[str, bytes] | None = None) -> None: ...
    def check_interrupt(self) -> None: ...
    def warn(self, message: str) -> None:
        """A warning for the run summary and the client; the engine names the node, the message need not."""
        ...


class Node(BaseModel):
    # defer_build: the executor builds nodes with model_construct, which needs no validator; building one for
    # each of the ~300 node classes at import would cost every process start a fifth of a second. A validated
    # construction (NodeClass(**inputs)) still works: pydantic builds the validator on first use.
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True, validate_assignment=False,
                              defer_build=True)

    # The class_type used in workflow files; defaults to the class name.
    type_name: ClassVar[str | None] = None
    display_name: ClassVar[str | None] = None
    category: ClassVar[str] = "latentloom"
    description: ClassVar[str] = ""
    # Part of every cache key: bump it when the node's behaviour changes.
    version: ClassVar[str] = "1"
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    # False: the result depends on more than the inputs (randomness, time): never served from the cache.
    deterministic: ClassVar[bool] = True
    # True: the node is called once with whole lists instead of once per list element.
    input_is_list: ClassVar[bool] = False
    deprecated: ClassVar[bool] = False
    experimental: ClassVar[bool] = False
    # The Python module shown in the catalogue (ComfyUI's python_module); set by the registry when loading plugins.
    python_module: ClassVar[str] = "nodes"

    def run(self, ctx: RunContext) -> Any:  # pragma: no cover - every node overrides it
        raise NotImplementedError

    # Optional hooks -------------------------------------------------------------------------------------------

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        """A value that changes when the outside world the node reads changes (e.g. a file's mtime and size).

        It is part of the cache key. Linked inputs are absent from `constants`. Return None when nothing outside
        matters (the default).
        """
        return None

    @classmethod
    def validate_inputs(cls, env: Environment, constants: dict[str, Any], input_types: dict[str, str]) -> bool | str:
        """Custom validation: return True, an error message, or {input name: message} so the client can show the
        error on the input. Linked inputs are absent from `constants`; `input_types` maps each linked input to
        the type its source produces."""
        return True

    # Set True when validate_inputs checks the linked types itself: the engine then skips its own type check.
    checks_input_types: ClassVar[bool] = False

    def inputs_needed(self, ctx: RunContext, available: set[str]) -> Iterable[str]:
        """For nodes with lazy inputs: the names of lazy inputs this call needs. Unevaluated lazy inputs are None
        on `self`; `available` names those already evaluated. Called again after each round of evaluation."""
        return ()

    # Introspection used by the registry, validator and executor ----------------------------------------------

    @classmethod
    def class_type(cls) -> str:
        return cls.type_name or cls.__name__

    @classmethod
    def input_specs(cls) -> dict[str, InputSpec]:
        cached: dict[str, InputSpec] | None = cls.__dict__.get("_input_specs_cache")
        if cached is not None:
            return cached
        specs: dict[str, InputSpec] = {}
        for name, info in cls.model_fields.items():
            spec = next((m for m in info.metadata if isinstance(m, InputSpec)), None)
            if spec is None:
                raise TypeError(f"{cls.__name__}.{name}: input fields need an InputSpec annotation")
            specs[name] = spec
        type.__setattr__(cls, "_input_specs_cache", specs)
        return specs

    @classmethod
    def input_default(cls, name: str) -> Any:
        info = cls.model_fields[name]
        return None if info.is_required() else info.default

    @classmethod
    def has_lazy_inputs(cls) -> bool:
        return any(spec.lazy for spec in cls.input_specs().values())

    @classmethod
    def is_async(cls) -> bool:
        return inspect.iscoroutinefunction(cls.run)
