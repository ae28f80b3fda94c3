"""`comfy_api.latest` for V3 custom nodes: `io` (schemas, types, ComfyNode, NodeOutput), `ui` (previews) and
`ComfyExtension`, the object a pack's `comfy_entrypoint()` returns."""

from __future__ import annotations

from . import _io as io
from . import _ui as ui
from ._types import InputImpl, Types


class ComfyExtension:
    """What a V3 pack provides: `get_node_list()` (async) gives its ComfyNode classes."""

    async def on_load(self) -> None:
        """Called once, before get_node_list."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        raise NotImplementedError(f"{type(self).__name__} defines no get_node_list()")


comfy_io = io

__all__ = ["ComfyExtension", "InputImpl", "Types", "comfy_io", "io", "ui"]
