"""A pack whose import fails: it is reported with this error and the other packs still load."""

import comfy.not_provided_here  # noqa: F401

NODE_CLASS_MAPPINGS = {}
