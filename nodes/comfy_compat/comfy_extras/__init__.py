"""ComfyUI's `comfy_extras` package: `nodes_mask.composite` is real; its other modules are stand-ins (internals.py)
whose node classes are our built-in nodes' V1-style classes."""
