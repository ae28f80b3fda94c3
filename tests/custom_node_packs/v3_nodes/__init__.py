"""A V3 pack: comfy_entrypoint() -> ComfyExtension, io.ComfyNode classes with schemas, NodeOutput with ui."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .tensor_nodes import V3Blend, V3Broken, V3LazyPick
from .text_nodes import V3Describe, V3ReadText, V3Words


class PackV3Extension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [V3Blend, V3Describe, V3Words, V3ReadText, V3LazyPick, V3Broken]


async def comfy_entrypoint() -> PackV3Extension:
    return PackV3Extension()
