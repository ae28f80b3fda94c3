"""GLIGEN nodes, with ComfyUI's class names, inputs and semantics.

GLIGENLoader reads a models/gligen file through the model memory manager; GLIGENTextBoxApply encodes a phrase
with the CLIP (its unprojected pooled output) and appends its box, in latent cells, to every conditioning entry's
options["gligen"] = ("position", gligen, [(pooled, height // 8, width // 8, y // 8, x // 8), ...]). The sampler
turns that into gated self-attention inside the UNet (nodes.diffusion.gligen).
"""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, Combo, Int, Output, Socket, String

from .conditioning import MAX_RESOLUTION, _tokenize
from .diffusion.gligen import MAX_OBJECTS, Gligen, load_gligen
from .model_files import file_identity, load_model, locate_model, model_choices, model_fingerprint, model_key

GLIGEN = "GLIGEN"
BOX_SIZE = Int(min=8, max=MAX_RESOLUTION, step=8)
BOX_OFFSET = Int(min=0, max=MAX_RESOLUTION, step=8)


class GLIGENLoader(Node):
    category = "loaders"
    outputs = (Output(GLIGEN),)

    gligen_name: Annotated[str, Combo(model_choices("gligen"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        return model_fingerprint(env, "gligen", constants.get("gligen_name"), "gligen")

    def run(self, ctx: RunContext):
        path = locate_model(ctx, "gligen_name", "gligen", self.gligen_name)
        manager = ctx.models
        key = model_key("gligen", file_identity(path))
        return (load_model(ctx, "gligen_name", self.gligen_name, key, lambda: load_gligen(path, manager)),)


class GLIGENTextBoxApply(Node):
    category = "conditioning/gligen"
    outputs = (Output(CONDITIONING),)

    conditioning_to: Annotated[Any, Socket(CONDITIONING)]
    clip: Annotated[Any, Socket(CLIP)]
    gligen_textbox_model: Annotated[Any, Socket(GLIGEN)]
    text: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    width: Annotated[int, BOX_SIZE] = 64
    height: Annotated[int, BOX_SIZE] = 64
    x: Annotated[int, BOX_OFFSET] = 0
    y: Annotated[int, BOX_OFFSET] = 0

    def run(self, ctx: RunContext):
        gligen = self.gligen_textbox_model
        if not isinstance(gligen, Gligen):
            raise InputError("gligen_textbox_model", f"must be a GLIGEN model (from GLIGENLoader), got "
                                                     f"{type(gligen).__name__}")
        _, pooled = self.clip.encode_tokens(_tokenize(ctx, self.clip, self.text), manager=ctx.models,
                                            projected_pooled=False)
        if pooled.shape[-1] != gligen.phrase_width:
            raise InputError("clip", f"gives {pooled.shape[-1]}-wide pooled text embeddings; this GLIGEN model "
                                     f"takes {gligen.phrase_width}-wide ones (it is for another model family)")
        box = (pooled, self.height // 8, self.width // 8, self.y // 8, self.x // 8)
        result = []
        for cond, options in self.conditioning_to:
            previous = options["gligen"][2] if options.get("gligen") is not None else []
            if len(previous) >= MAX_OBJECTS:
                raise InputError("conditioning_to", f"already has {len(previous)} GLIGEN boxes, the most a GLIGEN "
                                                    f"model takes")
            result.append([cond, {**options, "gligen": ("position", gligen, [*previous, box])}])
        return (result,)


NODES = [GLIGENLoader, GLIGENTextBoxApply]
