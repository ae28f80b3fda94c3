"""`comfy_api.latest.Types` / `InputImpl`: the video container and codec choices V3 schemas list (real enums, so
the schema builds), and stand-ins for ComfyUI's video objects, which latentloom does not have (they fail when
used; see internals.py)."""

from __future__ import annotations

import enum
from typing import Any

from ...internals import InternalsModule


class VideoContainer(enum.StrEnum):
    AUTO = "auto"
    MP4 = "mp4"

    @classmethod
    def as_input(cls) -> list[str]:
        return [member.value for member in cls]

    @classmethod
    def get_extension(cls, value: Any) -> str:
        member = cls(value)
        return "mp4" if member is cls.AUTO else member.value


class VideoCodec(enum.StrEnum):
    AUTO = "auto"
    H264 = "h264"

    @classmethod
    def as_input(cls) -> list[str]:
        return [member.value for member in cls]


class _TypesModule(InternalsModule):
    VideoContainer = VideoContainer
    VideoCodec = VideoCodec


Types = _TypesModule("comfy_api.latest.Types")
InputImpl = InternalsModule("comfy_api.latest.InputImpl")
