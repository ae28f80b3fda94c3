"""HiDream nodes with ComfyUI's names and signatures (comfy_extras/nodes_hidream.py): QuadrupleCLIPLoader and
CLIPTextEncodeHiDream.

The model call is nodes.diffusion.dit_hidream, the four text encoders nodes.diffusion.hidream_text (+ llama_text);
CLIPLoader / DualCLIPLoader take the type "hidream" too (nodes.loaders).
"""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.environment import Environment
from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, Combo, Output, Socket, String

from .conditioning import _encode, _tokenize
from .diffusion import checkpoint
from .diffusion.hidream_text import HiDreamClip
from .model_files import (
    file_identity,
    find_model_file,
    load_model,
    locate_model,
    model_choices,
    model_key,
    times_dropped,
)

CLIP_NAMES = ("clip_name1", "clip_name2", "clip_name3", "clip_name4")


class QuadrupleCLIPLoader(Node):
    display_name = "QuadrupleCLIPLoader"
    category = "advanced/loaders"
    description = ("hidream: a long CLIP-L, a long CLIP-G, a T5-XXL and a Llama-3.1-8B-Instruct file, in any "
                   "order.")
    outputs = (Output(CLIP),)
    clip_name1: Annotated[str, Combo(model_choices("clip"))]
    clip_name2: Annotated[str, Combo(model_choices("clip"))]
    clip_name3: Annotated[str, Combo(model_choices("clip"))]
    clip_name4: Annotated[str, Combo(model_choices("clip"))]

    @classmethod
    def fingerprint(cls, env: Environment, constants: dict[str, Any]) -> Any:
        found = [find_model_file(env, "clip", constants.get(name)) for name in CLIP_NAMES]
        if any(path is None for path in found):
            return None
        identity = tuple(part for path in found if path is not None for part in file_identity(path))
        return [identity, times_dropped(env, model_key("quadruple_clip", identity))]

    def run(self, ctx: RunContext):
        names = (self.clip_name1, self.clip_name2, self.clip_name3, self.clip_name4)
        paths = [locate_model(ctx, input_name, "clip", name) for input_name, name in zip(CLIP_NAMES, names,
                                                                                          strict=True)]
        manager = ctx.models
        key = model_key("quadruple_clip", tuple(part for path in paths for part in file_identity(path)))
        clip = load_model(ctx, "/".join(CLIP_NAMES), ", ".join(names), key,
                          lambda: checkpoint.load_clip_files(list(paths), "hidream", manager))
        return (clip,)


class CLIPTextEncodeHiDream(Node):
    category = "advanced/conditioning"
    description = ("Encodes a prompt per HiDream text encoder (CLIP-L, CLIP-G, T5-XXL, Llama) into one "
                   "conditioning.")
    outputs = (Output(CONDITIONING),)
    clip: Annotated[Any, Socket(CLIP)]
    clip_l: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    clip_g: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    t5xxl: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    llama: Annotated[str, String(multiline=True, dynamicPrompts=True)]

    def run(self, ctx: RunContext):
        if not isinstance(self.clip, HiDreamClip):
            raise InputError("clip", "is not a HiDream CLIP: load its text encoders with QuadrupleCLIPLoader (or "
                                     "CLIPLoader / DualCLIPLoader type hidream)")
        texts = {"g": self.clip_g, "l": self.clip_l, "t5xxl": self.t5xxl, "llama": self.llama}
        tokens: dict[str, Any] = {}
        for slot, text in texts.items():  # each encoder reads its own prompt (only the loaded ones tokenize)
            if slot in self.clip.encoders:
                tokens[slot] = _tokenize(ctx, self.clip, text)[slot]
        return (_encode(ctx, self.clip, tokens),)


NODES = [QuadrupleCLIPLoader, CLIPTextEncodeHiDream]
