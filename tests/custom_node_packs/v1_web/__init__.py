"""A V1 pack with a web extension: WEB_DIRECTORY's scripts are imported by the editor at boot."""

WEB_DIRECTORY = "./web"


class PackWebGreeting:
    CATEGORY = "pack/web"
    FUNCTION = "greet"
    RETURN_TYPES = ("STRING",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "world"})}}

    def greet(self, name):
        return (f"hello {name}",)


NODE_CLASS_MAPPINGS = {"PackWebGreeting": PackWebGreeting}
NODE_DISPLAY_NAME_MAPPINGS = {"PackWebGreeting": "Web Greeting (pack)"}
