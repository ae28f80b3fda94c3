"""Lumina 2 nodes with ComfyUI's names and signatures: CLIPTextEncodeLumina2 (comfy_extras/nodes_lumina2.py).

The model call is nodes.diffusion.dit_lumina2, the Gemma 2 text encoder nodes.diffusion.gemma_text; RenormCFG
(Lumina 2's renormalised CFG) lives in nodes.model_families.
"""

from __future__ import annotations

from typing import Annotated, Any

from latentloom.engine.inputs import InputError
from latentloom.engine.node import Node, RunContext
from latentloom.engine.types import CLIP, CONDITIONING, Combo, Output, Socket, String

from .conditioning import _encode, _tokenize
from .diffusion.gemma_text import ENCODER_KEY, attention_mask

# The two system prompts Lumina 2 was trained with (ComfyUI's SYSTEM_PROMPT table): the text put before
# "<Prompt Start>" and the user's prompt.
SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text "
                "alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
                 "image-text alignment based on textual prompts.",
}


def lumina2_prompt(system_prompt: str, user_prompt: str) -> str:
    return f"{SYSTEM_PROMPTS[system_prompt]} <Prompt Start> {user_prompt}"


class CLIPTextEncodeLumina2(Node):
    display_name = "CLIP Text Encode for Lumina2"
    category = "conditioning"
    description = ("Encodes the user prompt after one of Lumina 2's two system prompts with its Gemma 2 text "
                   "encoder into conditioning.")
    outputs = (Output(CONDITIONING),)
    system_prompt: Annotated[str, Combo(list(SYSTEM_PROMPTS))] = "superior"
    user_prompt: Annotated[str, String(multiline=True, dynamicPrompts=True)]
    clip: Annotated[Any, Socket(CLIP)]

    def run(self, ctx: RunContext):
        if self.clip is None:
            raise InputError("clip", "is empty: the checkpoint loader's file has no text encoder; load Gemma 2 with "
                                     "CLIPLoader (type lumina2)")
        tokens = _tokenize(ctx, self.clip, lumina2_prompt(self.system_prompt, self.user_prompt))
        extra = {"attention_mask": attention_mask(tokens[ENCODER_KEY])} if ENCODER_KEY in tokens else {}
        return (_encode(ctx, self.clip, tokens, extra),)


NODES = [CLIPTextEncodeLumina2]
