"""Nodes the compat tests use around the pack under test: a deterministic image source and a capture node that
saves a value with torch.save (so a test compares what really flowed through the graph)."""

import torch


class SurfaceImageSource:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "height": ("INT", {"default": 24}),
                             "width": ("INT", {"default": 32})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    CATEGORY = "surface"

    def make(self, seed, height, width):
        return (torch.rand((1, height, width, 3), generator=torch.Generator().manual_seed(seed)),)


class SaveCapture:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",), "path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "surface"

    def save(self, value, path):
        torch.save(value, path)
        return {}


NODE_CLASS_MAPPINGS = {"SurfaceImageSource": SurfaceImageSource, "SaveCapture": SaveCapture}
