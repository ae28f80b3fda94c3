"""`comfy_extras.chainner_models`: the old upscale-model loader module, over spandrel (as our UpscaleModelLoader)."""
