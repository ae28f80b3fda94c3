"""One good V1 node whose input names clash with Node attributes, one whose INPUT_TYPES is broken."""


class PackClashingNames:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"description": ("STRING", {"default": "d"}), "version": ("INT", {"default": 1}),
                             "run": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "join"

    def join(self, description, version, run):
        return (f"{description}-{version}-{run}",)


class PackBrokenInputs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": 42}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "go"

    def go(self, value):
        return (value,)


NODE_CLASS_MAPPINGS = {"PackClashingNames": PackClashingNames, "PackBrokenInputs": PackBrokenInputs}
