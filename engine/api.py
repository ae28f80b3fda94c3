"""The Python API: one object bundling registry, environment, cache, event bus and executor.

    engine = nodes.create_engine(models_dir="models")
    prompt = engine.load("graphs/txt2img.json")          # API JSON, UI JSON or a PNG with a workflow
    prompt = set_input(prompt, "3.seed", 42)
    result = engine.run(prompt)                         # RunResult: status, outputs (UI data), values, error
    if result.status == "invalid": print(result.error, result.node_errors)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import jsonsafe
from .cache import DEFAULT_CACHE_BYTES, DEFAULT_KEEP_PROMPTS, OutputCache
from .environment import Environment
from .events import Event, EventBus
from .executor import Executor
from .registry import NodeRegistry
from .run_state import InterruptToken, RunResult
from .validation import ValidationResult, make_error, validate_prompt


class WorkflowLoadError(Exception):
    """A file that is not a workflow we can read (message says why)."""


class OverrideError(ValueError):
    pass


def parse_literal(text: str, target: str = "value") -> Any:
    """Command-line values: JSON when it parses (numbers, booleans, quoted strings), else the raw string. JSON
    that every other entry point refuses (NaN, Infinity, 5000-deep lists, 400-digit numbers; engine.jsonsafe) is
    an OverrideError naming `target`, not a value that fails later or a RecursionError."""
    try:
        return jsonsafe.loads(text)
    except jsonsafe.MalformedJsonError:
        return text
    except jsonsafe.JsonInputError as refused:
        reason = str(refused).removeprefix("the document: ")
        raise OverrideError(f"override '{target}': {reason} (quote it as a JSON string to pass text)") from None


def set_input(prompt: dict[str, Any], target: str, value: Any) -> dict[str, Any]:
    """Return a copy of `prompt` with input `NODE_ID.INPUT` set to `value` (the original is left untouched)."""
    node_id, sep, input_name = target.partition(".")
    if not sep or not input_name:
        raise OverrideError(f"override '{target}' must look like NODE_ID.INPUT=VALUE")
    if node_id not in prompt:
        raise OverrideError(f"override '{target}': no node with id '{node_id}' in the graph")
    updated = dict(prompt)
    body = copy.deepcopy(prompt[node_id])
    body.setdefault("inputs", {})[input_name] = {"__value__": value} if isinstance(value, list) else value
    updated[node_id] = body
    return updated


class Engine:
    def __init__(self, registry: NodeRegistry, env: Environment | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cache_prompts: int | None = DEFAULT_KEEP_PROMPTS):
        self.registry = registry
        self.env = env or Environment.create()
        self.cache = OutputCache(cache_bytes, cache_prompts)
        self.bus = EventBus()
        self.executor = Executor(registry, self.env, self.cache, self.bus)

    # Loading ----------------------------------------------------------------------------------------------------

    def catalogue(self) -> dict[str, dict[str, Any]]:
        return self.registry.object_info(self.env)

    def load(self, source: str | Path | dict[str, Any] | bytes) -> dict[str, Any]:
        """An API-format prompt from a file path, raw bytes, or a parsed document in any supported format."""
        prompt, _, _ = self.load_with_format(source)
        return prompt

    def load_with_format(
        self, source: str | Path | dict[str, Any] | bytes
    ) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        """(API prompt, UI workflow or None, detected format: api_json | ui_json | png_prompt | png_workflow)."""
        from .workflow import WorkflowFormatError, load_workflow

        try:
            return load_workflow(source, self.catalogue())
        except WorkflowFormatError as exc:
            raise WorkflowLoadError(str(exc)) from exc

    # Running ----------------------------------------------------------------------------------------------------

    def validate(self, prompt: Any, targets: Iterable[str] | None = None) -> ValidationResult:
        try:
            return validate_prompt(prompt, self.registry, self.env, targets)
        except Exception as exc:  # validation must never crash the caller
            return ValidationResult(None, make_error("exception_during_validation", "Exception when validating",
                                                     f"{type(exc).__name__}: {exc}"))

    def run(self, prompt: dict[str, Any], *, prompt_id: str | None = None, extra_data: dict[str, Any] | None = None,
            targets: Iterable[str] | None = None, interrupt: InterruptToken | None = None,
            listener: Callable[[Event], None] | None = None) -> RunResult:
        """Validate and run; always a RunResult. Its status is "success", "error" (a node failed: `error` holds
        the execution_error data), "interrupted", or "invalid": the graph failed validation and nothing ran;
        `error` and `node_errors` then hold the validation error and the per-node errors (ComfyUI's 400 body).
        A graph with some invalid outputs runs the valid ones; `node_errors` then names the dropped ones."""
        checked = self.validate(prompt, targets)
        if checked.graph is None:
            return RunResult(prompt_id or "", "invalid", error=checked.error, node_errors=checked.node_errors)
        unsubscribe = self.bus.subscribe(listener) if listener else None
        try:
            result = self.executor.run(checked.graph, prompt_id, extra_data, interrupt)
        finally:
            if unsubscribe:
                unsubscribe()
        result.node_errors = checked.node_errors  # outputs dropped as invalid while the rest ran
        return result

    def free(self) -> None:
        """Drop cached outputs and unload models."""
        self.cache.clear()
        from .memory import ModelManager

        manager = self.env.find_service(ModelManager)
        if manager is not None:
            manager.free_all()
