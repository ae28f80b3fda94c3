"""A V3 pack with ComfyUI's dynamic inputs: a DynamicCombo whose two options bring different inputs (and declare
`level` with different ranges), an Autogrow of images, a BoundingBox widget; a node validating a combo; and a
node subclassing one of ComfyUI's own V3 nodes (as KJNodes' LTXVAddGuideMulti does)."""

import torch
from comfy_api.latest import ComfyExtension, io
from comfy_extras.nodes_lt import LTXVAddGuide


class V3ShapedSolid(io.ComfyNode):
    """A grey image whose size comes from the selected shape's own inputs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3ShapedSolid", display_name="Shaped Solid (V3)", category="pack/v3",
            inputs=[io.DynamicCombo.Input("shape", tooltip="square or rectangle", options=[
                        io.DynamicCombo.Option("square", [
                            io.Int.Input("side", default=2, min=1, max=16),
                            io.Float.Input("level", default=0.5, min=0.0, max=1.0)]),
                        io.DynamicCombo.Option("rect", [
                            io.Int.Input("width", default=3, min=1, max=16),
                            io.Int.Input("height", default=2, min=1, max=16),
                            io.Float.Input("level", default=0.25, min=0.0, max=0.5),
                            io.String.Input("note", optional=True)])]),
                    io.Int.Input("batch", default=1, min=1, max=4)],
            outputs=[io.Image.Output(display_name="image"), io.String.Output(display_name="received")])

    @classmethod
    def execute(cls, shape, batch):
        if shape["shape"] == "square":
            height = width = shape["side"]
        else:
            height, width = shape["height"], shape["width"]
        image = torch.full((batch, height, width, 3), float(shape["level"]))
        received = ", ".join(f"{key}={shape[key]}" for key in sorted(shape))
        return io.NodeOutput(image, received)


class V3StackImages(io.ComfyNode):
    """Stacks however many images the editor's Autogrow slots carry."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3StackImages", category="pack/v3",
            inputs=[io.Autogrow.Input("images", template=io.Autogrow.TemplatePrefix(
                        io.Image.Input("image"), prefix="image", min=1, max=4))],
            outputs=[io.Image.Output(), io.String.Output(display_name="slots")])

    @classmethod
    def execute(cls, images):
        names = sorted(images)
        return io.NodeOutput(torch.cat([images[name] for name in names]), ",".join(names))


class V3CropBox(io.ComfyNode):
    """Crops an image to a BoundingBox widget's rectangle."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3CropBox", category="pack/v3",
            inputs=[io.Image.Input("image"),
                    io.BoundingBox.Input("box", default={"x": 1, "y": 0, "width": 2, "height": 2})],
            outputs=[io.Image.Output(), io.BoundingBox.Output()])

    @classmethod
    def execute(cls, image, box):
        cropped = image[:, box["y"]:box["y"] + box["height"], box["x"]:box["x"] + box["width"], :]
        return io.NodeOutput(cropped, box)


class V3PickMode(io.ComfyNode):
    """A DynamicCombo read by the node's own validate_inputs (which gets it as the dict execute gets)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="V3PickMode", category="pack/v3",
            inputs=[io.DynamicCombo.Input("mode", options=[
                io.DynamicCombo.Option("fixed", [io.Int.Input("value", default=1, min=0, max=100)]),
                io.DynamicCombo.Option("off", [])])],
            outputs=[io.Int.Output()])

    @classmethod
    def validate_inputs(cls, mode):
        if mode["mode"] == "fixed" and mode["value"] == 13:
            return "13 is unlucky"
        return True

    @classmethod
    def execute(cls, mode):
        return io.NodeOutput(mode.get("value") or 0)


class V3GuideSubclass(LTXVAddGuide):
    """Its own schema, the parent's helpers (ComfyUI's video model code) when it runs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3GuideSubclass", category="pack/v3", inputs=[io.Image.Input("image")],
                         outputs=[io.Latent.Output()])

    @classmethod
    def execute(cls, image):
        return io.NodeOutput(cls.encode(None, 8, 8, image, None))


class DynamicExtension(ComfyExtension):
    async def get_node_list(self):
        return [V3ShapedSolid, V3StackImages, V3CropBox, V3PickMode, V3GuideSubclass]


async def comfy_entrypoint():
    return DynamicExtension()
