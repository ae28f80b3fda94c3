"""A V3 node that a V1-style pack lists in NODE_CLASS_MAPPINGS (KJNodes does): MatchType sockets, an input marked
`advanced`, and a combo from comfy_api's Types."""

import torch
from comfy_api.latest import InputImpl, Types, io  # noqa: F401


class SurfaceMatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        template = io.MatchType.Template("T", allowed_types=[io.Image, io.Mask])
        return io.Schema(
            node_id="SurfaceMatchSchemaId", category="surface",
            inputs=[io.MatchType.Input("value", template=template),
                    io.Int.Input("repeat", default=1, min=1, max=4, advanced=True),
                    io.Combo.Input("container", options=Types.VideoContainer.as_input())],
            outputs=[io.MatchType.Output(template=template, display_name="value"), io.BBOX.Output()],
        )

    @classmethod
    def execute(cls, value, repeat, container):
        return io.NodeOutput(value.repeat((repeat,) + (1,) * (value.ndim - 1)), {"container": container})


class SurfaceStack(io.ComfyNode):
    """`accept_all_inputs`: the editor adds image_2 ... image_N beyond the one declared input (KJNodes' style)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="SurfaceStack", category="surface", accept_all_inputs=True,
                         inputs=[io.Image.Input("image_1")], outputs=[io.Image.Output()])

    @classmethod
    def execute(cls, image_1, **more):
        extra = [more[name] for name in sorted(more, key=lambda name: int(name.split("_")[1]))]
        return io.NodeOutput(torch.cat([image_1, *extra]))
