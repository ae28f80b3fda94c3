"""Typed execution events. Their fields are those of ComfyUI's websocket messages, so a server only forwards
`event.type` and `event.data()`; binary previews travel as bytes on ProgressEvent.preview."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


def now_ms() -> int:
    return int(time.time() * 1000)


class Event(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    type: ClassVar[str] = "event"
    # Fields kept off the wire (e.g. raw preview bytes).
    internal: ClassVar[frozenset[str]] = frozenset()
    prompt_id: str

    def data(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(self.internal))


class ExecutionStart(Event):
    type: ClassVar[str] = "execution_start"
    timestamp: int = Field(default_factory=now_ms)


class ExecutionCached(Event):
    type: ClassVar[str] = "execution_cached"
    nodes: list[str]
    timestamp: int = Field(default_factory=now_ms)


class Executing(Event):
    type: ClassVar[str] = "executing"
    node: str | None
    display_node: str | None = None


class Progress(Event):
    type: ClassVar[str] = "progress"
    internal: ClassVar[frozenset[str]] = frozenset({"preview", "preview_type", "parent_node", "real_node"})
    value: int
    max: int
    node: str
    preview: bytes | None = None
    preview_type: str | None = None  # "image/jpeg" | "image/png"
    parent_node: str | None = None
    real_node: str | None = None


NodeState = Literal["pending", "running", "finished", "error"]


class NodeProgressState(BaseModel):
    value: float
    max: float
    state: NodeState
    node_id: str
    prompt_id: str
    display_node_id: str
    parent_node_id: str | None = None
    real_node_id: str


class ProgressState(Event):
    type: ClassVar[str] = "progress_state"
    nodes: dict[str, NodeProgressState]


class Executed(Event):
    type: ClassVar[str] = "executed"
    node: str
    display_node: str
    output: dict[str, Any] | None


class ExecutionSuccess(Event):
    type: ClassVar[str] = "execution_success"
    timestamp: int = Field(default_factory=now_ms)


class ExecutionError(Event):
    type: ClassVar[str] = "execution_error"
    node_id: str
    node_type: str
    executed: list[str]
    exception_message: str
    exception_type: str
    traceback: list[str]
    current_inputs: dict[str, Any] | list[Any]  # [] for a blocked node, as ComfyUI sends it
    current_outputs: list[str]
    timestamp: int = Field(default_factory=now_ms)


class ExecutionInterrupted(Event):
    type: ClassVar[str] = "execution_interrupted"
    node_id: str | None
    node_type: str | None
    executed: list[str]
    timestamp: int = Field(default_factory=now_ms)


class NodeWarning(Event):
    """Not a ComfyUI message: a warning raised by a node during the run (e.g. LoRA keys that matched nothing)."""

    type: ClassVar[str] = "latentloom.warning"
    node: str
    message: str


Listener = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out to listeners. A listener that raises is removed from this emit's result, not the run."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    @property
    def has_listeners(self) -> bool:
        return bool(self._listeners)

    def emit(self, event: Event) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)


class EventRecorder:
    """A listener that keeps every event (tests, the Python API)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def of(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]
