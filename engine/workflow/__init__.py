"""Workflow documents: the editor's UI (LiteGraph) format, the API prompt format, and workflows inside PNGs.

Everything here is driven by a node catalogue in ComfyUI's `/object_info` shape and knows nothing of
diffusion or HTTP.
"""

from latentloom.engine.workflow.api_to_ui import api_to_ui
from latentloom.engine.workflow.catalogue import WorkflowFormatError
from latentloom.engine.workflow.formats import convert_workflow, detect_format, load_workflow, read_png_text_chunks
from latentloom.engine.workflow.ui_to_api import MissingNodeTypesError, ui_to_api

__all__ = [
    "MissingNodeTypesError",
    "WorkflowFormatError",
    "api_to_ui",
    "convert_workflow",
    "detect_format",
    "load_workflow",
    "read_png_text_chunks",
    "ui_to_api",
]
