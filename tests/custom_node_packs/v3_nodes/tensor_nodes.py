"""V3 nodes on images: a preview in the ui, lazy inputs with an async execute, and a schema that is broken."""

import torch
from comfy_api.latest import io, ui


class V3Blend(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3Blend", display_name="Blend (V3)", category="pack/v3",
            inputs=[io.Image.Input("image_a"), io.Image.Input("image_b"),
                    io.Float.Input("factor", default=0.5, min=0.0, max=1.0, step=0.05,
                                   display_mode=io.NumberDisplay.slider),
                    io.Mask.Input("mask", optional=True)],
            outputs=[io.Image.Output(display_name="blended"), io.Mask.Output()])

    @classmethod
    def execute(cls, image_a, image_b, factor, mask=None):
        blended = image_a * (1.0 - factor) + image_b * factor
        if mask is None:
            mask = torch.ones(blended.shape[:3])
        return io.NodeOutput(blended, mask, ui=ui.PreviewImage(blended, cls=cls))


class V3LazyPick(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3LazyPick", category="pack/v3",
            inputs=[io.Boolean.Input("use_first", default=True),
                    io.MultiType.Input(io.Float.Input("first", lazy=True, force_input=True), types=[io.Int]),
                    io.AnyType.Input("second", lazy=True)],
            outputs=[io.AnyType.Output()])

    @classmethod
    def check_lazy_status(cls, use_first, first=None, second=None):
        return ["first"] if use_first else ["second"]

    @classmethod
    async def execute(cls, use_first, first=None, second=None):
        return io.NodeOutput(first if use_first else second)


class V3Broken(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Broken", inputs=[io.Int.Input("same")], outputs=[io.Int.Output("same")])

    @classmethod
    def execute(cls, same):
        return io.NodeOutput(same)
