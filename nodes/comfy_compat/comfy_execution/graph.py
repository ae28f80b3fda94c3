"""`comfy_execution.graph`: ExecutionBlocker is the engine's own; DynamicPrompt is the hidden DYNPROMPT view."""

from latentloom.engine.node import ExecutionBlocker

from ..v1 import DynamicPromptView as DynamicPrompt

__all__ = ["DynamicPrompt", "ExecutionBlocker"]
