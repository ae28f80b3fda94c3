"""`comfy.comfy_types.node_typing`: the socket type names as a string enum (`IO.IMAGE == "IMAGE"`, `IO.ANY` is
"*"), and the base classes / dict types V1 packs annotate with. Only names: the V1 adapter reads the strings."""

from __future__ import annotations

import enum
from typing import Any


class IO(enum.StrEnum):
    """Socket type names. Comparing with `!=` treats "*" as matching anything and comma lists ("FLOAT,INT") as
    matching any type they share a subset with, as ComfyUI's validation does."""

    def __ne__(self, other: object) -> bool:
        if self.value == "*" or other == "*":
            return False
        if not isinstance(other, str):
            return True
        mine, theirs = frozenset(self.value.split(",")), frozenset(other.split(","))
        return not (mine <= theirs or theirs <= mine)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)

    __hash__ = str.__hash__

    STRING = "STRING"
    IMAGE = "IMAGE"
    MASK = "MASK"
    LATENT = "LATENT"
    BOOLEAN = "BOOLEAN"
    INT = "INT"
    FLOAT = "FLOAT"
    COMBO = "COMBO"
    CONDITIONING = "CONDITIONING"
    SAMPLER = "SAMPLER"
    SIGMAS = "SIGMAS"
    GUIDER = "GUIDER"
    NOISE = "NOISE"
    CLIP = "CLIP"
    CONTROL_NET = "CONTROL_NET"
    VAE = "VAE"
    MODEL = "MODEL"
    LORA_MODEL = "LORA_MODEL"
    LOSS_MAP = "LOSS_MAP"
    CLIP_VISION = "CLIP_VISION"
    CLIP_VISION_OUTPUT = "CLIP_VISION_OUTPUT"
    STYLE_MODEL = "STYLE_MODEL"
    GLIGEN = "GLIGEN"
    UPSCALE_MODEL = "UPSCALE_MODEL"
    AUDIO = "AUDIO"
    WEBCAM = "WEBCAM"
    POINT = "POINT"
    FACE_ANALYSIS = "FACE_ANALYSIS"
    BBOX = "BBOX"
    SEGS = "SEGS"
    VIDEO = "VIDEO"
    ANY = "*"
    NUMBER = "FLOAT,INT"
    PRIMITIVE = "STRING,FLOAT,INT,BOOLEAN"


# Typed-dict names packs use in annotations only.
InputTypeDict = dict[str, Any]
InputTypeOptions = dict[str, Any]
FileLocator = dict[str, Any]


class ComfyNodeABC:
    """Base class some V1 nodes derive from; it adds nothing the adapter needs."""

    DESCRIPTION = ""
    CATEGORY = "sd"


class CheckLazyMixin:
    """Default check_lazy_status: every lazy input that is still None is needed."""

    def check_lazy_status(self, **kwargs: Any) -> list[str]:
        return [name for name, value in kwargs.items() if value is None]
