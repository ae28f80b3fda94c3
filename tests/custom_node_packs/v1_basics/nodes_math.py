import os

import folder_paths

from .constants import CATEGORY
from .util import shout


class AnyType(str):
    """The usual wildcard trick of V1 packs."""

    def __ne__(self, other):
        return False


ANY = AnyType("*")


class PackScale:
    DESCRIPTION = "Multiplies a number."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.5}),
                             "factor": ("INT", {"default": 2, "min": 1, "max": 10})},
                "optional": {"offset": ("FLOAT", {"default": 0.0, "forceInput": True})}}

    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("scaled",)
    FUNCTION = "scale"
    CATEGORY = CATEGORY

    def scale(self, value, factor, offset=0.0):
        return (value * factor + offset,)


class PackShout:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hello", "multiline": True}),
                             "mode": (["shout", "keep"], {"default": "shout"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, text, mode):
        return (shout(text) if mode == "shout" else text,)


class PackRange:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 1, "max": 100})}}

    RETURN_TYPES = ("INT", "STRING")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, count):
        return (list(range(count)), f"{count} items")


class PackSum:
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": (ANY,), "start": ("INT", {"default": 0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "total"
    CATEGORY = CATEGORY

    def total(self, values, start):
        return (float(sum(values) + start[0]),)


class PackEven:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"number": ("INT", {"default": 2, "min": 0, "max": 10})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "check"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, number):
        # Naming `number` here turns off ComfyUI's own min/max check for it.
        return True if number % 2 == 0 else f"{number} is odd"

    def check(self, number):
        return (number,)


class PackReadFile:
    """Reads a file of the input folder; IS_CHANGED (its modification time) invalidates the cache."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "note.txt"})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "read"
    CATEGORY = CATEGORY

    @classmethod
    def IS_CHANGED(cls, name):
        path = os.path.join(folder_paths.get_input_directory(), name)
        return os.path.getmtime(path) if os.path.exists(path) else float("nan")

    def read(self, name):
        with open(os.path.join(folder_paths.get_input_directory(), name)) as handle:
            return (handle.read(),)


class PackShowText:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"forceInput": True})},
                "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ("STRING",)
    OUTPUT_NODE = True
    FUNCTION = "show"
    CATEGORY = CATEGORY

    def show(self, text, unique_id=None, prompt=None, extra_pnginfo=None):
        seen = f"{text} #{unique_id} {prompt[unique_id]['class_type']}"
        return {"ui": {"text": [seen]}, "result": (seen,)}


class PackFail:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"forceInput": True})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "fail"
    CATEGORY = CATEGORY

    def fail(self, value):
        raise ValueError(f"cannot handle {value}")


NODE_CLASS_MAPPINGS = {"PackScale": PackScale, "PackShout": PackShout, "PackRange": PackRange, "PackSum": PackSum,
                       "PackEven": PackEven, "PackReadFile": PackReadFile, "PackShowText": PackShowText,
                       "PackFail": PackFail}
NODE_DISPLAY_NAME_MAPPINGS = {"PackScale": "Scale (pack)"}
