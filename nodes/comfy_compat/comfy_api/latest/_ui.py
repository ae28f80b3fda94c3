"""`comfy_api.latest.ui`: the UI data a V3 node returns in `NodeOutput(ui=...)`. Previews are written by our own
PreviewImage node, in the running node's context (its temp folder and numbering)."""

from __future__ import annotations

from typing import Any

from ._io import FolderType, _UIOutput


class SavedResult(dict):
    """One file the editor can fetch from /view."""

    def __init__(self, filename: str, subfolder: str, type: FolderType | str):
        super().__init__(filename=filename, subfolder=subfolder, type=FolderType(type).value)

    @property
    def filename(self) -> str:
        return str(self["filename"])

    @property
    def subfolder(self) -> str:
        return str(self["subfolder"])

    @property
    def type(self) -> FolderType:
        return FolderType(self["type"])


class SavedImages(_UIOutput):
    def __init__(self, results: list[Any], is_animated: bool = False):
        self.results = list(results)
        self.is_animated = is_animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.results, **({"animated": (True,)} if self.is_animated else {})}


def _preview_files(images: Any) -> list[Any]:
    from ...core_nodes import NODE_CLASS_MAPPINGS

    saved = NODE_CLASS_MAPPINGS["PreviewImage"]().save_images(images)
    return list(saved["ui"]["images"]) if isinstance(saved, dict) and saved.get("ui") else []


class PreviewImage(_UIOutput):
    """A batch of images written to the temp folder and shown on the node."""

    def __init__(self, image: Any, animated: bool = False, cls: Any = None, **kwargs: Any):
        self.values = _preview_files(image)
        self.animated = animated

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.values, "animated": (self.animated,)}


class PreviewMask(PreviewImage):
    """A mask batch shown as grey images."""

    def __init__(self, mask: Any, animated: bool = False, cls: Any = None, **kwargs: Any):
        grey = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)
        super().__init__(grey, animated, cls, **kwargs)


class PreviewText(_UIOutput):
    def __init__(self, value: str, **kwargs: Any):
        self.value = value

    def as_dict(self) -> dict[str, Any]:
        return {"text": (self.value,)}


__all__ = ["PreviewImage", "PreviewMask", "PreviewText", "SavedImages", "SavedResult"]
