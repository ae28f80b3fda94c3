"""What a run is given and gives back: the interrupt token a caller sets from any thread, and the RunResult.
Kept apart from the executor so that callers (the server's workers, the ComfyUI compatibility layer) import these
without the scheduler."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

UiData = dict[str, Any]  # a node's data for the client ({"images": [...]}), as sent in `executed`


class Interrupted(Exception):
    """Raised inside a run when its interrupt token is set."""


class InterruptToken:
    """Cooperative interrupt for one run (or one worker): set from any thread, checked by the run."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def request(self) -> None:
        self._flag.set()

    def clear(self) -> None:
        self._flag.clear()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def check(self) -> None:
        if self._flag.is_set():
            raise Interrupted("interrupted")


@dataclass
class RunResult:
    prompt_id: str
    status: str  # "success" | "error" | "interrupted" | "invalid" (the graph failed validation; nothing ran)
    outputs: dict[str, UiData] = field(default_factory=dict)  # UI data by display node id (history "outputs")
    values: dict[str, list[list[Any]]] = field(default_factory=dict)  # output nodes' values (Python API)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # the execution_error / execution_interrupted data, or the validation error
    # per-node validation errors (status "invalid")
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "success"


def format_input_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)[:200]


def exception_type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__name__}"
