"""CLIP vision encoders (ComfyUI's CLIP_VISION / CLIP_VISION_OUTPUT) and the unCLIP image-embedding conditioning the
sampler derives from their output.

Files: ComfyUI's models/clip_vision files use transformers' CLIPVisionModelWithProjection names (`vision_model.*` +
`visual_projection.weight`); OpenCLIP files (`visual.*`, or `embedder.model.visual.*` inside SD2-unCLIP
checkpoints) are renamed to that layout. The configuration is read from the tensor shapes; what shapes cannot tell
(heads, activation) follows ComfyUI's bundled configs: 16 heads for every CLIP vision tower it ships, quick_gelu for
OpenAI's ViT-L (24 layers of width 1024), gelu for the OpenCLIP ViT-H / ViT-bigG.

unCLIP (ComfyUI's `unclip_adm` with CLIPEmbeddingNoiseAugmentation): each image embedding is noised to level
round(999 · noise_augmentation) of a squaredcos_cap_v2 schedule with noise seeded by `seed - 10`, the level's
sinusoidal embedding is appended, and the result is weighted by the strength; several embeddings are summed and
re-noised at the merge level (ComfyUI draws that last noise unseeded; here it is seeded by `seed - 9`). SDXL models
(Revision) use the first pooled-width values of that vector in place of the text encoder's pooled output;
SD2.1-unCLIP models take the whole vector as their class-embedding input (zeros without unCLIP conditioning).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import ModelFileError, _materialize, read_state_dict
from .offline import ensure_offline

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
COMFYUI_VISION_HEADS = 16
OPEN_CLIP_FILE_PREFIX = "visual."
# Where checkpoints carry a CLIP vision tower (ComfyUI's clip_vision_prefix of SD2.1-unCLIP and SVD).
CHECKPOINT_VISION_PREFIXES = ("embedder.model.visual.", "conditioner.embedders.0.open_clip.model.visual.")
UNCLIP_TIMESTEPS = 1000


@dataclass(eq=False)
class ClipVisionOutput:
    """ComfyUI's CLIP_VISION_OUTPUT: read as attributes or as items (`out.image_embeds`, `out["image_embeds"]`).
    last_hidden_state [B, tokens, width] (before the post layer norm), image_embeds [B, projection],
    penultimate_hidden_states [B, tokens, width] (the input of the last layer); float32 on the CPU."""

    last_hidden_state: torch.Tensor
    image_embeds: torch.Tensor
    penultimate_hidden_states: torch.Tensor
    mm_projected: torch.Tensor | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in {f.name for f in fields(self)}

    def cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.last_hidden_state, self.image_embeds,
                                                          self.penultimate_hidden_states, self.mm_projected)
                   if isinstance(t, torch.Tensor))


def clip_preprocess(image: torch.Tensor, size: int, mean: tuple[float, ...] = CLIP_IMAGE_MEAN,
                    std: tuple[float, ...] = CLIP_IMAGE_STD, crop: bool = True) -> torch.Tensor:
    """IMAGE [B, H, W, C] in 0..1 → normalised pixels [B, 3, size, size], as ComfyUI's clip_preprocess: with `crop`
    the short side is scaled to `size` (bicubic, antialiased) and the centre cut out, else the image is stretched;
    then the values are rounded to 8 bits and normalised with the CLIP mean and std."""
    pixels = image[..., :3].movedim(-1, 1).float()
    if pixels.shape[2:] != (size, size):
        if crop:
            scale = size / min(pixels.shape[2], pixels.shape[3])
            target = (round(scale * pixels.shape[2]), round(scale * pixels.shape[3]))
        else:
            target = (size, size)
        pixels = F.interpolate(pixels, size=target, mode="bicubic", antialias=True)
        top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
        pixels = pixels[:, :, top:top + size, left:left + size]
    pixels = torch.clip(255.0 * pixels, 0, 255).round() / 255.0
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(3, 1, 1)
    return (pixels - mean_t) / std_t


@dataclass(frozen=True, eq=False)
class ClipVisionModel:
    """What a CLIP_VISION link carries: a transformers CLIPVisionModelWithProjection and its preprocessing."""

    model: torch.nn.Module
    image_size: int
    image_mean: tuple[float, ...] = CLIP_IMAGE_MEAN
    image_std: tuple[float, ...] = CLIP_IMAGE_STD
    source: str = ""

    def cache_nbytes(self) -> int:
        return 0  # the weights are owned (and counted) by the model memory manager

    def encode_image(self, image: torch.Tensor, crop: bool = True, manager: Any = None) -> ClipVisionOutput:
        lease = manager.use(self.model) if manager is not None else contextlib.nullcontext(self.model)
        with torch.no_grad(), lease as model:
            parameter = next(model.parameters())
            pixels = clip_preprocess(image.to(parameter.device), self.image_size, self.image_mean, self.image_std,
                                     crop=crop)
            out = model(pixel_values=pixels.to(parameter.dtype), output_hidden_states=True)
        return ClipVisionOutput(
            last_hidden_state=out.last_hidden_state.float().cpu(),
            image_embeds=self.image_embeds_of(out).float().cpu(),
            penultimate_hidden_states=out.hidden_states[-2].float().cpu(),
        )

    def image_embeds_of(self, out: Any) -> torch.Tensor:
        """The `image_embeds` of a forward pass: CLIP's projected pooled embedding."""
        return out.image_embeds


# Files ----------------------------------------------------------------------------------------------------------

def _from_open_clip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP visual tower weights under `prefix` → transformers' CLIPVisionModelWithProjection names."""
    renames = {"class_embedding": "vision_model.embeddings.class_embedding",
               "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
               "positional_embedding": "vision_model.embeddings.position_embedding.weight",
               "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
               "ln_post.weight": "vision_model.post_layernorm.weight",
               "ln_post.bias": "vision_model.post_layernorm.bias"}
    layer_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in renames:
            out[renames[name]] = value
        elif name == "proj":  # OpenCLIP multiplies x @ proj; a Linear stores the transpose
            out["visual_projection.weight"] = value.transpose(0, 1).contiguous()
        elif name.startswith("transformer.resblocks."):
            index, _, rest = name[len("transformer.resblocks."):].partition(".")
            target = f"vision_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight | bias
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                    out[f"{target}self_attn.{part}.{kind}"] = chunk.contiguous()
                continue
            for old, new in layer_parts.items():
                if rest.startswith(old + "."):
                    out[target + new + rest[len(old):]] = value
                    break
    return out


def vision_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The CLIP vision weights of a file (or of a checkpoint under `prefix`) in transformers' names."""
    if f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in state:
        return _from_open_clip(state, prefix)
    if not prefix and "visual.transformer.resblocks.0.attn.in_proj_weight" in state:
        return _from_open_clip(state, OPEN_CLIP_FILE_PREFIX)
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    count = 0
    while f"vision_model.encoder.layers.{count}.layer_norm1.weight" in state:
        count += 1
    return count


def vision_config(state: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """CLIPVisionConfig keyword arguments read from the weights' shapes."""
    if any(key.startswith("encoder.layer.") and "layer_scale" in key for key in state):
        raise ModelFileError(f"{what}: DINOv2 image encoders are not supported (only CLIP vision models)")
    patch = state.get("vision_model.embeddings.patch_embedding.weight")
    if patch is None or _layer_count(state) == 0:
        raise ModelFileError(f"{what}: not a CLIP vision model (no vision_model.* or visual.* weights)")
    if "vision_model.pre_layrnorm.weight" not in state:
        raise ModelFileError(f"{what}: SigLIP vision models are not supported (only CLIP vision models)")
    projection = state.get("visual_projection.weight")
    if projection is None:
        raise ModelFileError(f"{what}: the CLIP vision model has no visual_projection (image embeds)")
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ModelFileError(f"{what}: {positions} position embeddings are not a square grid plus one")
    layers = _layer_count(state)
    heads = COMFYUI_VISION_HEADS if hidden % COMFYUI_VISION_HEADS == 0 else 1
    openai_vit_l = layers == 24 and hidden == 1024
    return {
        "hidden_size": hidden, "num_channels": channels, "patch_size": patch_size, "image_size": grid * patch_size,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "projection_dim": projection.shape[0], "hidden_act": "quick_gelu" if openai_vit_l else "gelu",
        "layer_norm_eps": 1e-5,
    }


def build_clip_vision(state: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str,
                      source: str = "") -> ClipVisionModel:
    """A ClipVisionModel from transformers-named weights; weights that are not part of the model (a text tower,
    position ids) are left out, missing ones are an error."""
    ensure_offline()
    from transformers.models.clip.configuration_clip import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionModelWithProjection

    settings = vision_config(state, what)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**settings))
    own = set(model.state_dict())
    weights = {key: value for key, value in state.items() if key in own}
    return ClipVisionModel(model=_materialize(model, weights, dtype, what), image_size=int(settings["image_size"]),
                           source=source)


def load_clip_vision_file(path: str | Path, manager: Any = None) -> Any:
    """A ClipVisionModel, or for a SigLIP file (Flux Redux's) a nodes.diffusion.siglip_vision.SiglipVision."""
    path = Path(path)
    dtype = manager.dtype_for("text_encoder") if manager is not None else torch.float32
    state = read_state_dict(path)
    from . import siglip_vision  # here: siglip_vision builds on this module's ClipVisionModel

    if siglip_vision.is_siglip(state):
        return siglip_vision.build_siglip_vision(state, dtype, path.name, str(path))
    return build_clip_vision(vision_state(state), dtype, path.name, str(path))


def checkpoint_vision_prefix(path: str | Path) -> str | None:
    """The prefix under which a checkpoint file carries a CLIP vision tower, if it carries one."""
    keys = _file_keys(Path(path))
    for prefix in CHECKPOINT_VISION_PREFIXES:
        if f"{prefix}transformer.resblocks.0.attn.in_proj_weight" in keys or \
                f"{prefix}vision_model.encoder.layers.0.layer_norm1.weight" in keys:
            return prefix
    return None


def load_checkpoint_clip_vision(path: str | Path, prefix: str, manager: Any = None) -> ClipVisionModel:
    path = Path(path)
    dtype = manager.dtype_for("text_encoder") if manager is not None else torch.float32
    state = _read_prefixed(path, prefix)
    return build_clip_vision(vision_state(state, prefix), dtype, f"{path.name} (CLIP vision)", str(path))


def _file_keys(path: Path) -> set[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    return set(read_state_dict(path))


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Only the tensors under `prefix` (a safetensors file is read selectively)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    return {key: value for key, value in read_state_dict(path).items() if key.startswith(prefix)}


# unCLIP conditioning -------------------------------------------------------------------------------------------

def squaredcos_alphas_cumprod(timesteps: int = UNCLIP_TIMESTEPS) -> torch.Tensor:
    """ᾱ of the "squaredcos_cap_v2" schedule: β_i = min(1 − ā((i+1)/T) / ā(i/T), 0.999) with
    ā(t) = cos²((t + 0.008) / 1.008 · π/2), computed in float64 like the reference, returned as float32."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), 0.999)
                          for i in range(timesteps)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).float()


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The LDM sinusoidal embedding: [cos(t·f), sin(t·f)] with f_k = max_period^(−k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def _noise_augment(embeds: torch.Tensor, level: int, alphas_cumprod: torch.Tensor, level_dim: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """One embedding [1, D] noised to `level` (data statistics are mean 0 / std 1), with the level's embedding
    appended: [1, D + level_dim]."""
    noise = torch.randn(embeds.shape, dtype=embeds.dtype, generator=generator).to(embeds.device)
    alpha = alphas_cumprod[level].to(embeds.device)
    noised = alpha.sqrt() * embeds + (1 - alpha).sqrt() * noise
    level_embedding = timestep_embedding(torch.tensor([level], device=embeds.device), level_dim)
    return torch.cat((noised, level_embedding.to(noised.dtype)), dim=1)


def unclip_embedding(unclip_conditioning: list[dict], seed: int, level_dim: int, device: torch.device,
                     merge_augmentation: float = 0.0) -> torch.Tensor:
    """ComfyUI's unclip_adm: [1, D + level_dim] from every image embedding of every unCLIPConditioning entry."""
    alphas_cumprod = squaredcos_alphas_cumprod()
    parts = []
    for entry in unclip_conditioning:
        output = entry["clip_vision_output"]
        embeds = output["image_embeds"] if isinstance(output, dict) else output.image_embeds
        strength, augmentation = float(entry["strength"]), float(entry["noise_augmentation"])
        level = round((UNCLIP_TIMESTEPS - 1) * augmentation)
        for row in embeds:
            generator = torch.Generator().manual_seed(seed)  # every embedding gets the same noise, as ComfyUI
            parts.append(_noise_augment(row.reshape(1, -1).to(device, torch.float32), level, alphas_cumprod,
                                        level_dim, generator) * strength)
    if not parts:
        raise ValueError("unCLIP conditioning without image embeddings")
    if len(parts) == 1:
        return parts[0]
    summed = torch.stack(parts).sum(0)
    width = summed.shape[1] - level_dim
    level = round((UNCLIP_TIMESTEPS - 1) * merge_augmentation)
    # ComfyUI draws this noise unseeded; a seeded draw keeps the result reproducible.
    generator = torch.Generator().manual_seed(seed + 1)
    return _noise_augment(summed[:, :width], level, alphas_cumprod, level_dim, generator)


def revision_pooled(unclip_conditioning: list[dict], seed: int | None, pooled_width: int,
                    device: torch.device) -> torch.Tensor:
    """SDXL's pooled vector when unCLIP conditioning is present (ComfyUI's sdxl_pooled): the first `pooled_width`
    values of the unCLIP embedding, whose level embedding has the pooled width (1280 for SDXL)."""
    embedding = unclip_embedding(unclip_conditioning, (0 if seed is None else seed) - 10, pooled_width, device)
    if embedding.shape[1] - pooled_width != pooled_width:
        raise ValueError(f"the CLIP vision image embeds have width {embedding.shape[1] - pooled_width}, this SDXL "
                         f"model's pooled conditioning has width {pooled_width} (SDXL Revision needs a CLIP vision "
                         f"model with that projection width, e.g. clip_vision_g)")
    return embedding[:, :pooled_width]


def unclip_class_labels(unclip_conditioning: list[dict] | None, seed: int | None, adm_width: int,
                        merge_augmentation: float, device: torch.device) -> torch.Tensor:
    """SD2.1-unCLIP's class embedding input (ComfyUI's SD21UNCLIP.encode_adm): zeros without unCLIP conditioning,
    else the unCLIP embedding, whose noise-level embedding is as wide as the image embeds (half the input)."""
    if not unclip_conditioning:
        return torch.zeros((1, adm_width), device=device)
    level_dim = adm_width // 2
    embedding = unclip_embedding(unclip_conditioning, (0 if seed is None else seed) - 10, level_dim, device,
                                 merge_augmentation)
    if embedding.shape[1] != adm_width:
        raise ValueError(f"the CLIP vision image embeds have width {embedding.shape[1] - level_dim}, this unCLIP "
                         f"model takes image embeds of width {level_dim}")
    return embedding
