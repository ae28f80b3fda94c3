"""`comfy_extras.chainner_models.model_loading.load_state_dict`: an upscale model from its state dict, through
spandrel as our UpscaleModelLoader builds it (an ImageModelDescriptor: `.scale`, `.to()`, `.eval()`, callable on
[B,C,H,W]), so packs that load upscale models themselves get the value an UPSCALE_MODEL link carries."""

from __future__ import annotations

from typing import Any


def load_state_dict(state_dict: dict[str, Any]) -> Any:
    from spandrel import ImageModelDescriptor, ModelLoader

    descriptor = ModelLoader().load_from_state_dict(state_dict)
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValueError(f"a {descriptor.architecture.name} model takes more than an image; an upscale model must be "
                         "a single-image model")
    return descriptor.eval()
