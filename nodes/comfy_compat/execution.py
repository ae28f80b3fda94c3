"""ComfyUI's `execution` module as packs import it. Its prompt executor is ComfyUI's own (ours is
latentloom.engine.executor); packs import the module at load time and use only these names."""

from __future__ import annotations

import enum

from latentloom.engine.run_state import Interrupted

from .comfy_execution.graph import ExecutionBlocker


class ExecutionResult(enum.Enum):
    SUCCESS = 0
    FAILURE = 1
    PENDING = 2


InterruptProcessingException = Interrupted

__all__ = ["ExecutionBlocker", "ExecutionResult", "InterruptProcessingException"]
