"""Input errors and socket value checks: the one place where "<ClassType> (#id): input '<name>': ..." is written.

A node reports a bad input with `raise InputError("samples", "must have 4 channels for this model")`; the executor
knows which node was running and names it. Value checkers are registered per socket type name (LATENT, IMAGE, ...)
by whoever knows what those values look like (the nodes package, at engine creation); the executor runs them on
linked socket inputs before calling `run`, so a node receives values of the shape its socket type promises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .types import ANY, type_set

# A value check returns None when the value is fine, else what is wrong with it ("must be a LATENT (...)").
ValueCheck = Callable[[Any], str | None]


def node_label(class_type: str, display_id: str) -> str:
    return f"{class_type} (#{display_id})"


class InputError(ValueError):
    """A problem with one input of the running node. The executor adds the node's name and id to the message."""

    def __init__(self, input_name: str, detail: str, node: str | None = None):
        super().__init__(input_name, detail, node)
        self.input_name = input_name
        self.detail = detail
        self.node = node

    def __str__(self) -> str:
        where = f"input '{self.input_name}': {self.detail}"
        return f"{self.node}: {where}" if self.node else where

    def for_node(self, label: str) -> InputError:
        """This error named after the node that raised it (unchanged when a node is named already)."""
        if self.node is not None:
            return self
        located = type(self)(self.input_name, self.detail, label).with_traceback(self.__traceback__)
        located.__cause__ = self.__cause__
        return located

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str, str | None]]:
        # keep the fields when pickled (Ray workers send errors back)
        return type(self), (self.input_name, self.detail, self.node)


class MissingInputFile(InputError, FileNotFoundError):
    """An input names a file that is not there (also a FileNotFoundError, for callers that catch those)."""


class ValueCheckers:
    """Socket type name -> value check. One per node registry, so two engines in a process stay apart."""

    def __init__(self) -> None:
        self._checks: dict[str, ValueCheck] = {}

    def register(self, type_name: str, check: ValueCheck) -> None:
        self._checks[type_name] = check

    def registered(self) -> list[str]:
        return sorted(self._checks)

    def problem(self, type_name: str, value: Any) -> str | None:
        """What is wrong with `value` for a socket of `type_name` (a union accepts a value any member accepts)."""
        found = [self._checks.get(part) for part in type_set(type_name) if part != ANY]
        checks = [check for check in found if check is not None]
        if not found or len(checks) < len(found):
            return None  # a wildcard or a type nobody registered a check for: nothing to say
        problems = [check(value) for check in checks]
        return None if any(problem is None for problem in problems) else problems[0]

    def check_call(self, socket_types: Mapping[str, str], values: Mapping[str, Any], list_inputs: bool) -> None:
        """Raise InputError for the first input whose value its socket type rejects. `socket_types` names the
        inputs to check; with `list_inputs` each value is the whole list a list-input node receives."""
        for name, type_name in socket_types.items():
            if name not in values:
                continue
            items: Iterable[Any] = values[name] if list_inputs and isinstance(values[name], list) else [values[name]]
            for item in items:
                problem = self.problem(type_name, item)
                if problem is not None:
                    raise InputError(name, problem)
