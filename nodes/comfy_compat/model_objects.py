"""MODEL / CLIP / VAE as ComfyUI's objects (ModelPatcher, CLIP, VAE) for pack code, over our model-patch API.

ComfyUI's objects change in place: a pack writes `m = model.clone(); m.set_model_attn1_patch(fn); return (m,)`.
Ours are immutable (every patching method returns a new model, nodes.diffusion.patches). So a pack node gets a
small mutable view of each MODEL / CLIP / VAE input (`pack_view`): its patching methods replace the immutable
object it holds, and its results are turned back into the immutable objects (`engine_value`) before they reach
the graph, the cache and the value checks. Calls into our core nodes from pack code (`nodes.X`) unwrap the views
on the way in and wrap the results on the way out. Work that needs the model memory manager (encoding, decoding)
uses the running node's (context.py).

Not covered: LoRA-style patch tuples in `add_patches` (plain diffs only), `model_patches_to`, `patch_model` /
`unpatch_model`, ModelPatcher hooks and wrappers / callbacks registries, CLIP `add_patches` / `load_model` /
`get_sd`, VAE `get_sd` and video / audio VAEs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..diffusion.clip import ClipModel
from ..diffusion.models import DiffusionModel
from ..diffusion.vae import DOWNSCALE, VAEModel, crop_to_multiple
from .context import current_node

# ComfyUI's ModelPatcher patch setters -> ours (each returns a new model; the view keeps it).
MODEL_SETTERS = {
    "set_model_sampler_cfg_function": "set_sampler_cfg_function",
    "set_model_sampler_pre_cfg_function": "add_sampler_pre_cfg_function",
    "set_model_sampler_post_cfg_function": "add_sampler_post_cfg_function",
    **{name: name for name in (
        "set_model_unet_function_wrapper", "set_model_denoise_mask_function", "set_model_patch",
        "set_model_patch_replace", "set_model_attn1_patch", "set_model_attn2_patch", "set_model_attn1_output_patch",
        "set_model_attn2_output_patch", "set_model_attn1_replace", "set_model_attn2_replace",
        "set_model_input_block_patch", "set_model_input_block_patch_after_skip", "set_model_output_block_patch")},
}


def _refuse_private(name: str) -> None:
    """Dunder and own names are never forwarded (copy / pickle probe them before __init__ ran)."""
    if name.startswith("__") or name.startswith("latentloom_"):
        raise AttributeError(name)


def _manager() -> Any:
    ctx = current_node()
    return ctx.models if ctx is not None else None


class BaseModelView:
    """`model.model` (ComfyUI's BaseModel): the parts packs read."""

    def __init__(self, model: DiffusionModel):
        self.diffusion_model = model.unet
        self.latent_format = model.latent_format
        self.model_sampling = _model_sampling(model)

    def get_dtype(self) -> torch.dtype:
        return next(self.diffusion_model.parameters()).dtype


def _model_sampling(model: DiffusionModel) -> Any:
    from ..diffusion.schedules import schedule_for

    return schedule_for(model.sampling)


class ModelPatcher:
    """A MODEL as pack code sees it: ComfyUI's ModelPatcher methods, changing this view in place."""

    def __init__(self, model: DiffusionModel):
        self.latentloom_model = model

    def clone(self) -> ModelPatcher:
        return ModelPatcher(self.latentloom_model.clone())

    def is_clone(self, other: Any) -> bool:
        return isinstance(other, ModelPatcher) and other.latentloom_model.unet is self.latentloom_model.unet

    @property
    def model_options(self) -> dict[str, Any]:
        # This view's own copy (clone() copies it level by level), so in-place edits after clone() stay here.
        return self.latentloom_model.options

    @model_options.setter
    def model_options(self, options: dict[str, Any]) -> None:
        self.latentloom_model = self.latentloom_model.clone(options=dict(options))

    @property
    def model(self) -> BaseModelView:
        return BaseModelView(self.latentloom_model)

    @property
    def model_sampling(self) -> Any:
        return _model_sampling(self.latentloom_model)

    def get_model_object(self, name: str) -> Any:
        """ComfyUI's lookup by attribute path: "model_sampling", "latent_format", "diffusion_model" or an attribute
        path inside the network ("diffusion_model.input_blocks...": diffusers names)."""
        view = self.model
        head, _, rest = name.partition(".")
        if not hasattr(view, head):
            raise AttributeError(f"MODEL has no object '{name}' (model_sampling, latent_format, diffusion_model)")
        found = getattr(view, head)
        for part in rest.split(".") if rest else ():
            found = getattr(found, part)
        return found

    def model_dtype(self) -> torch.dtype:
        return self.model.get_dtype()

    def add_patches(self, patches: dict[str, Any], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Plain weight diffs by ComfyUI key ("diffusion_model.<LDM name>") or diffusers parameter name; returns
        the keys applied, as ComfyUI does (others, e.g. LoRA tuples, are left out)."""
        names = _unet_parameter_names(self.latentloom_model)
        diffs: dict[str, torch.Tensor | None] = {}
        applied: list[str] = []
        for key, value in patches.items():
            target = names.get(key) if isinstance(key, str) else None
            diff = _plain_diff(value)
            if target is None or diff is None:
                continue
            diffs[target] = diff
            applied.append(key)
        if diffs:
            self.latentloom_model = self.latentloom_model.add_patches(diffs, strength_patch, strength_model)
        return applied

    def __getattr__(self, name: str) -> Any:
        _refuse_private(name)
        ours = MODEL_SETTERS.get(name)
        if ours is None:
            return getattr(self.latentloom_model, name)
        method = getattr(self.latentloom_model, ours)

        def set_in_place(*args: Any, **kwargs: Any) -> None:
            self.latentloom_model = method(*args, **kwargs)
        return set_in_place


def _unet_parameter_names(model: DiffusionModel) -> dict[str, str]:
    """ComfyUI key (and diffusers name) -> diffusers parameter name."""
    from ..diffusion import convert

    params = [name for name, _ in model.unet.named_parameters()]
    ldm = convert.unet_to_ldm({name: name for name in params},
                              convert.diffusers_config(model.unet).layers_per_block)
    return {**{f"diffusion_model.{key}": name for key, name in ldm.items()}, **{name: name for name in params}}


def _plain_diff(value: Any) -> torch.Tensor | None:
    """A tensor, ("diff", (tensor,)) or (tensor,): ComfyUI's plain diff forms."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff" and isinstance(value[1], tuple):
        value = value[1]
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


class PackClip:
    """A CLIP as pack code sees it: tokenize / encode_from_tokens(_scheduled), clone + clip_layer in place."""

    def __init__(self, clip: ClipModel):
        self.latentloom_clip = clip

    def clone(self) -> PackClip:
        return PackClip(self.latentloom_clip)  # immutable: changes replace it, so sharing is safe

    def clip_layer(self, layer_idx: int) -> None:
        self.latentloom_clip = self.latentloom_clip.clone_with_layer(layer_idx)

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
        from ..diffusion.embeddings import EmbeddingLibrary

        ctx = current_node()
        library = ctx.find_service(EmbeddingLibrary) if ctx is not None else None
        return self.latentloom_clip.tokenize(text, resolve_embedding=library,
                                             warn=ctx.warn if ctx is not None else None)

    def encode_from_tokens(self, tokens: Any, return_pooled: bool | str = False, return_dict: bool = False) -> Any:
        cond, pooled = self.latentloom_clip.encode_tokens(tokens, manager=_manager(),
                                                          projected_pooled=return_pooled != "unprojected")
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: Any, unprojected_pooled: bool = False,
                                     add_dict: dict[str, Any] | None = None) -> list[list[Any]]:
        """CONDITIONING: [[cond, {"pooled_output": pooled, **add_dict}]]."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected_pooled else True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]

    def encode(self, text: str) -> torch.Tensor:
        return self.encode_from_tokens(self.tokenize(text))

    def __getattr__(self, name: str) -> Any:
        _refuse_private(name)
        return getattr(self.latentloom_clip, name)


class PackVAE:
    """A VAE as pack code sees it: IMAGE [B,H,W,C] <-> unscaled latents, as ComfyUI's VAE."""

    downscale_ratio = upscale_ratio = DOWNSCALE

    def __init__(self, vae: VAEModel):
        self.latentloom_vae = vae

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.latentloom_vae.encode(pixels[..., :3], manager=_manager())

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.latentloom_vae.decode(samples, manager=_manager())

    def encode_tiled(self, pixels: torch.Tensor, tile_x: int = 512, tile_y: int = 512, overlap: int = 64,
                     **kwargs: Any) -> torch.Tensor:
        return self.latentloom_vae.encode_tiled(pixels[..., :3], (tile_x, tile_y), overlap, manager=_manager())

    def decode_tiled(self, samples: torch.Tensor, tile_x: int = 64, tile_y: int = 64, overlap: int = 16,
                     **kwargs: Any) -> torch.Tensor:
        return self.latentloom_vae.decode_tiled(samples, (tile_x, tile_y), overlap, manager=_manager())

    def spacial_compression_encode(self) -> int:
        return DOWNSCALE

    def spacial_compression_decode(self) -> int:
        return DOWNSCALE

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return crop_to_multiple(pixels)

    @property
    def latent_channels(self) -> int:
        return self.latentloom_vae.latent_channels

    def __getattr__(self, name: str) -> Any:
        _refuse_private(name)
        return getattr(self.latentloom_vae, name)


def pack_view(value: Any) -> Any:
    """The object pack code gets for a value (lists of them too, for INPUT_IS_LIST)."""
    if isinstance(value, DiffusionModel):
        return ModelPatcher(value)
    if isinstance(value, ClipModel):
        return PackClip(value)
    if isinstance(value, VAEModel):
        return PackVAE(value)
    if isinstance(value, list) and any(isinstance(v, (DiffusionModel, ClipModel, VAEModel)) for v in value):
        return [pack_view(v) for v in value]
    return value


def engine_value(value: Any) -> Any:
    """The value the graph gets for what pack code returned (lists of views too, for OUTPUT_IS_LIST)."""
    if isinstance(value, ModelPatcher):
        return value.latentloom_model
    if isinstance(value, PackClip):
        return value.latentloom_clip
    if isinstance(value, PackVAE):
        return value.latentloom_vae
    if isinstance(value, list) and any(isinstance(v, (ModelPatcher, PackClip, PackVAE)) for v in value):
        return [engine_value(v) for v in value]
    return value


__all__ = ["ModelPatcher", "PackClip", "PackVAE", "engine_value", "pack_view"]
