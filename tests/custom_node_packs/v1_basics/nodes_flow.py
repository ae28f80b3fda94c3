from comfy_execution.graph_utils import GraphBuilder

from .constants import CATEGORY


class PackLazySwitch:
    """Evaluates only the branch it selects."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"use_first": ("BOOLEAN", {"default": True}),
                             "first": ("FLOAT", {"lazy": True, "forceInput": True}),
                             "second": ("FLOAT", {"lazy": True, "forceInput": True})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "switch"
    CATEGORY = CATEGORY

    def check_lazy_status(self, use_first, first=None, second=None):
        wanted = "first" if use_first else "second"
        return [wanted] if (first if use_first else second) is None else []

    def switch(self, use_first, first=None, second=None):
        return (first if use_first else second,)


class PackAsyncDouble:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"forceInput": True})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "double"
    CATEGORY = CATEGORY

    async def double(self, value):
        return (value * 2,)


class PackScaleTwice:
    """Expands into two PackScale nodes (node expansion with ComfyUI's GraphBuilder)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0}), "factor": ("INT", {"default": 2})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "expand"
    CATEGORY = CATEGORY

    def expand(self, value, factor):
        graph = GraphBuilder()
        first = graph.node("PackScale", value=value, factor=factor)
        second = graph.node("PackScale", value=first.out(0), factor=factor)
        return {"result": (second.out(0),), "expand": graph.finalize()}


NODE_CLASS_MAPPINGS = {"PackLazySwitch": PackLazySwitch, "PackAsyncDouble": PackAsyncDouble,
                       "PackScaleTwice": PackScaleTwice}
