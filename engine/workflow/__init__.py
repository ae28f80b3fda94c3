"""Workflow documents: the editor's UI (LiteGraph) format, the API prompt format, and workflows inside PNGs.

Everything here is driven by a node catalogue in ComfyUI's `/object_info` shape and knows nothing of
diffusion or HTTP.
"""

from engine.workflow.catalogue import WorkflowFormatError
from engine.workflow.ui_to_api import MissingNodeTypesError, ui_to_api

__all__ = ["MissingNodeTypesError", "WorkflowFormatError", "ui_to_api"]
