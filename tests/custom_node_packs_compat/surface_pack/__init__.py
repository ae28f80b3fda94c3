"""A V1 pack written the way popular packs are (KJNodes, WAS, Comfyroll, essentials, rgthree): at module level it
imports many of ComfyUI's modules, model internals included, subclasses one of them, reads core node class
attributes and ComfyUI's folders, prints a banner and adds a static route through `PromptServer.instance.app`;
its nodes then use the module surface (comfy_extras composite, tiled_scale, prepare_noise, prepare_callback,
save/load_torch_file, the old upscale-model loader)."""

import os

import comfy.diffusers_convert  # noqa: F401
import comfy.ops
import comfy.sample
import comfy.sd  # noqa: F401
import comfy.utils
import execution  # noqa: F401
import folder_paths
import latent_preview
import torch
from aiohttp import web
from comfy.cli_args import args
from comfy.comfy_types.node_typing import IO
from comfy.ldm.modules.attention import optimized_attention
from comfy.patcher_extension import CallbacksMP  # noqa: F401
from comfy.samplers import sampling_function  # noqa: F401
from comfy_api import feature_flags
from comfy_extras.chainner_models import model_loading
from comfy_extras.nodes_latent import LatentBatch
from comfy_extras.nodes_mask import composite

from nodes import ImageScale, ImageUpscaleWithModel
from server import PromptServer

from .v3_in_mappings import SurfaceMatch, SurfaceStack

print("surface_pack: loaded")  # packs print banners at import; `latentloom nodes --json` must stay JSON

CUSTOM_NODES_DIR = folder_paths.folder_names_and_paths["custom_nodes"][0][0]
OUTPUT_FILES_AT_IMPORT = os.listdir(folder_paths.get_output_directory())  # ComfyUI creates the folder at start

if not PromptServer.instance.app.router.frozen:
    PromptServer.instance.app.add_routes([web.static("/surface_static", os.path.dirname(__file__))])


class PatchedLinear(comfy.ops.disable_weight_init.Linear):
    """Subclassing a model-internal class at import must work (using it need not)."""


class SurfaceComposite:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"destination": (IO.IMAGE,), "source": (IO.IMAGE,), "x": ("INT", {"default": 0}),
                             "y": ("INT", {"default": 0})}}

    RETURN_TYPES = (IO.IMAGE,)
    FUNCTION = "paste"
    CATEGORY = "surface"

    def paste(self, destination, source, x, y):
        out = composite(destination.movedim(-1, 1), source.movedim(-1, 1), x, y, None, 1, False)
        return (out.movedim(1, -1),)


class SurfaceTiledDouble:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "upscale_method": (ImageScale.upscale_methods,),
                             "crop": (ImageScale.crop_methods,)}}

    RETURN_TYPES = (IO.ANY, "INT")
    RETURN_NAMES = ("image", "tiles")
    FUNCTION = "double"
    CATEGORY = "surface"

    def double(self, image, upscale_method, crop):
        samples = image.movedim(-1, 1)
        steps = comfy.utils.get_tiled_scale_steps(samples.shape[3], samples.shape[2], 16, 16, 4)
        pbar = comfy.utils.ProgressBar(steps)
        out = comfy.utils.tiled_scale(samples, lambda tile: tile.repeat_interleave(2, -1).repeat_interleave(2, -2),
                                      tile_x=16, tile_y=16, overlap=4, upscale_amount=2, out_channels=3, pbar=pbar)
        return (out.movedim(1, -1), steps)


class SurfaceNoise:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "noise"
    CATEGORY = "surface"

    def noise(self, samples, seed):
        noise = comfy.sample.prepare_noise(samples["samples"], seed, samples.get("batch_index"))
        callback = latent_preview.prepare_callback(None, 3)
        for step in range(3):
            callback(step, noise, noise, 3)
        return ({"samples": noise},)


class SurfaceStateDict:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"filename": ("STRING", {"default": "weights.safetensors"})}}

    RETURN_TYPES = ("STRING", "FLOAT")
    FUNCTION = "roundtrip"
    CATEGORY = "surface"

    def roundtrip(self, filename):
        path = os.path.join(folder_paths.get_temp_directory(), filename)
        comfy.utils.save_torch_file({"model.a.weight": torch.arange(6.0).reshape(2, 3)}, path,
                                    metadata={"by": "surface"})
        state, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
        renamed = comfy.utils.state_dict_prefix_replace(state, {"model.": "diffusion_model."})
        (key,) = renamed
        return (f"{key} {metadata['by']}", float(renamed[key].sum()))


class SurfaceUpscale:
    """Loads an upscale model the old way (state dict -> chainner model_loading), runs nodes.ImageUpscaleWithModel."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",),
                             "model_name": (folder_paths.get_filename_list("upscale_models"),)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "surface"

    def upscale(self, image, model_name):
        state = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("upscale_models", model_name))
        model = model_loading.load_state_dict(state).eval()
        return ImageUpscaleWithModel().upscale(model, image)


class SurfaceInternals:
    """Calls a model-internal function: fails with a clear error when run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "attend"
    CATEGORY = "surface"

    def attend(self, value):
        return (optimized_attention(value, value, value, heads=1),)


class SurfaceInfo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("STRING", "BOOLEAN", "BOOLEAN", "STRING")
    FUNCTION = "info"
    CATEGORY = "surface"

    def info(self):
        return (CUSTOM_NODES_DIR, bool(args.disable_metadata), feature_flags.supports_feature({}, "sid", "x"),
                type(LatentBatch).__name__ + ":" + LatentBatch.__name__)


NODE_CLASS_MAPPINGS = {
    "SurfaceComposite": SurfaceComposite, "SurfaceTiledDouble": SurfaceTiledDouble, "SurfaceNoise": SurfaceNoise,
    "SurfaceStateDict": SurfaceStateDict, "SurfaceUpscale": SurfaceUpscale, "SurfaceInternals": SurfaceInternals,
    "SurfaceInfo": SurfaceInfo,
    "SurfaceMatchKey": SurfaceMatch,  # a V3 class among V1 ones, registered under its mapping key
    "SurfaceStack": SurfaceStack,
}
NODE_DISPLAY_NAME_MAPPINGS = {"SurfaceMatchKey": "Surface Match"}
