"""ComfyUI's `comfy_api` package for V3 custom nodes: `comfy_api.latest` (and `comfy_api.v0_0_2`, the same API
under its versioned name)."""
