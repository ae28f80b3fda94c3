"""CONDITIONING lists turned into what the denoiser evaluates at each step (ComfyUI's `process_conds`).

A CONDITIONING value is a list of `[context, options]` pairs; see docs/comfyui-reference.md#values-between-nodes.
Preparation resolves percentage areas and masks to latent cells, start/end percents to sigma thresholds, builds
SDXL's added conditioning, gives every positive area entry a negative twin with the same area (so CFG compares like
with like), and copies ControlNets marked `control_apply_to_uncond` onto the negative entries. """

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import dit_calls
from .schedules import ModelSampling

# Area tuples are (height, width, y, x) in latent cells.
Area = tuple[int, int, int, int]


@dataclass
class CondEntry:
    context: torch.Tensor                   # [n, tokens, dim] float32 on the sampling device
    area: Area | None = None
    strength: float = 1.0
    mask: torch.Tensor | None = None        # [n, h, w] at latent resolution
    mask_strength: float = 1.0
    sigma_start: float | None = None        # inactive while sigma > sigma_start
    sigma_end: float | None = None          # inactive while sigma < sigma_end
    control: Any = None
    control_apply_to_uncond: bool = False
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL text_embeds / time_ids, [n, ...]
    concat: torch.Tensor | None = None      # inpainting models: [mask, masked latent] added to the UNet input
    control_context: torch.Tensor | None = None  # CLIPTextEncodeControlnet's text: what the ControlNets read
    hooks: Any = None                       # a HookGroup (nodes.diffusion.hooks): weights only this entry sees
    default: bool = False                   # ComfyUI's "default" cond: fills where the other entries leave room
    # UNet patches of this entry alone, built per model call: `unet_patches.patches_for(input_shape, device)` ->
    # {transformer patch point: [patch, ...]} (GLIGEN's boxes: options["gligen"], nodes.diffusion.gligen)
    unet_patches: Any = None

    def active_at(self, sigma: float) -> bool:
        if self.sigma_start is not None and sigma > self.sigma_start:
            return False
        if self.sigma_end is not None and sigma < self.sigma_end:
            return False
        return True


def _resolve_area(area: Any, height: int, width: int) -> Area:
    if area[0] == "percentage":
        h, w, y, x = area[1:]
        return (max(1, round(h * height)), max(1, round(w * width)), round(y * height), round(x * width))
    return tuple(int(v) for v in area)  # type: ignore[return-value]


def _mask_bounds(mask: torch.Tensor) -> Area:
    """set_area_to_bounds: the box around the mask's non-zero cells (at least 8×8)."""
    rows, cols = torch.nonzero(mask.abs().amax(dim=0), as_tuple=True)
    if rows.numel() == 0:
        return (8, 8, 0, 0)
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
    return (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)


def _sdxl_added(options: dict, latent_shape: torch.Size, unet_config: Any, refiner: bool, negative: bool,
                device: torch.device, seed: int | None = None) -> dict[str, torch.Tensor]:
    """diffusers' added_cond_kwargs: text_embeds = pooled output (or, with unCLIP conditioning, the image
    embedding: SDXL Revision), time_ids = ComfyUI's size conditioning."""
    width = options.get("width", latent_shape[3] * 8)
    height = options.get("height", latent_shape[2] * 8)
    crop_w, crop_h = options.get("crop_w", 0), options.get("crop_h", 0)
    if refiner:
        score = options.get("aesthetic_score", 2.5 if negative else 6.0)
        values = [height, width, crop_h, crop_w, score]
    else:
        values = [height, width, crop_h, crop_w, options.get("target_height", height),
                  options.get("target_width", width)]
    time_ids = torch.tensor([values], dtype=torch.float32, device=device)
    pooled = options.get("pooled_output")
    pooled_width = unet_config.projection_class_embeddings_input_dim - len(values) * unet_config.addition_time_embed_dim
    if options.get("unclip_conditioning"):
        from .clip_vision import revision_pooled

        pooled = revision_pooled(options["unclip_conditioning"], seed, pooled_width, device)
    elif pooled is None:
        pooled = torch.zeros((1, pooled_width))
    return {"text_embeds": pooled.to(device=device, dtype=torch.float32).reshape(pooled.shape[0], -1),
            "time_ids": time_ids}


def _prepare_entry(pair: Any, latent_shape: torch.Size, schedule: ModelSampling, device: torch.device,
                   unet_config: Any, family: str, negative: bool, concat_fn: Any, seed: int | None = None) \
        -> CondEntry:
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[1], dict):
        raise ValueError("conditioning entries must be [tensor, dict] pairs")
    context, options = pair
    height, width = latent_shape[2], latent_shape[3]
    entry = CondEntry(context=context.to(device=device, dtype=torch.float32),
                      strength=float(options.get("strength", 1.0)),
                      mask_strength=float(options.get("mask_strength", 1.0)),
                      control=options.get("control"),
                      control_apply_to_uncond=bool(options.get("control_apply_to_uncond", False)),
                      hooks=options.get("hooks"), default="default" in options)
    if options.get("area") is not None:
        entry.area = _resolve_area(options["area"], height, width)
    if options.get("mask") is not None:
        mask = options["mask"].to(device=device, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.shape[1:] != (height, width):
            mask = F.interpolate(mask.unsqueeze(1), size=(height, width), mode="bilinear",
                                 align_corners=False).squeeze(1)
        if options.get("set_area_to_bounds", False):
            entry.area = _mask_bounds(mask)
        entry.mask = mask
    if "clip_start_percent" in options:  # one range of a scheduled CLIP hook encoding, within the cond's own
        entry.sigma_start = schedule.percent_to_sigma(max(float(options["clip_start_percent"]),
                                                          float(options.get("start_percent", 0.0))))
        entry.sigma_end = schedule.percent_to_sigma(min(float(options["clip_end_percent"]),
                                                        float(options.get("end_percent", 1.0))))
    else:
        if "start_percent" in options:
            entry.sigma_start = schedule.percent_to_sigma(float(options["start_percent"]))
        if "end_percent" in options:
            entry.sigma_end = schedule.percent_to_sigma(float(options["end_percent"]))
    dit = dit_calls.module_for(family)
    if dit is not None:  # a transformer family: its own extra inputs (pooled projections, guidance, ...)
        entry.added = dit.conditioning(options, latent_shape, device)
    elif getattr(unet_config, "addition_embed_type", None) == "text_time":
        entry.added = _sdxl_added(options, latent_shape, unet_config, family == "sdxl_refiner", negative, device,
                                  seed)
    elif getattr(unet_config, "class_embed_type", None) == "projection":  # SD2.1-unCLIP
        from .clip_vision import unclip_class_labels

        entry.added = {"class_labels": unclip_class_labels(options.get("unclip_conditioning"), seed,
                                                           unet_config.projection_class_embeddings_input_dim,
                                                           float(options.get("unclip_noise_augment_merge", 0.05)),
                                                           device)}
    if concat_fn is not None:
        entry.concat = concat_fn(options)
    if options.get("cross_attn_controlnet") is not None:
        entry.control_context = options["cross_attn_controlnet"].to(device=device, dtype=torch.float32)
    if options.get("gligen") is not None:
        from .gligen import boxes_from_option

        entry.unet_patches = boxes_from_option(options["gligen"])
    return entry


def _area_inside(inner: Area, outer: Area) -> bool:
    return (inner[2] >= outer[2] and inner[3] >= outer[3]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def _add_twin_with_same_area(others: list[CondEntry], entry: CondEntry) -> None:
    """Give `others` an entry with entry's area, using the prompt of the smallest of them that covers it."""
    if entry.area is None:
        return
    smallest = None
    for other in others:
        if other.area is None:
            smallest = smallest or other
        elif _area_inside(entry.area, other.area):
            if smallest is None or smallest.area is None or \
                    smallest.area[0] * smallest.area[1] > other.area[0] * other.area[1]:
                smallest = other
    if smallest is None or smallest.area == entry.area:
        return
    others.append(dataclasses.replace(entry, context=smallest.context, added=smallest.added,
                                      concat=smallest.concat))


def _copy_controls_to_uncond(positive: list[CondEntry], negative: list[CondEntry]) -> None:
    """ControlNetApply puts its net on the positive only, asking for the same net on the negative too."""
    controls = [e.control for e in positive if e.area is None and e.control is not None
                and e.control_apply_to_uncond]
    if any(e.area is None and e.control is not None for e in negative):
        return
    plain = [(e, i) for i, e in enumerate(negative) if e.area is None and e.control is None]
    if not plain:
        return
    for n, control in enumerate(controls):
        entry, index = plain[n % len(plain)]
        negative[index] = dataclasses.replace(entry, control=control)


def prepare_conditioning(conds: dict[str, list | None], latent_shape: torch.Size, schedule: ModelSampling,
                         device: torch.device, unet_config: Any, family: str,
                         concat_fn: Any = None, seed: int | None = None) -> dict[str, list[CondEntry]]:
    """All CONDITIONING lists of one sampling run ("positive", optionally "negative" and others) → CondEntry lists.
    `concat_fn(options)`, for inpainting models, gives each entry its extra UNet input channels; `seed` (the
    sampling seed) seeds the noise augmentation of unCLIP image embeddings."""
    prepared = {
        # An entry may say which prompt it is ("prompt_type", as guiders with extra negatives set it).
        kind: [_prepare_entry(pair, latent_shape, schedule, device, unet_config, family,
                              pair[1].get("prompt_type", kind) == "negative", concat_fn, seed)
               for pair in pairs]
        for kind, pairs in conds.items() if pairs is not None
    }
    kinds = list(prepared)
    for kind in kinds:
        for entry in list(prepared[kind]):
            for other in kinds:
                if other != kind:
                    _add_twin_with_same_area(prepared[other], entry)
    if "positive" in prepared:
        for kind in kinds:
            if kind != "positive":
                _copy_controls_to_uncond(prepared["positive"], prepared[kind])
                _copy_gligen_to_uncond(prepared["positive"], prepared[kind])
    return prepared


def _copy_gligen_to_uncond(positive: list[CondEntry], negative: list[CondEntry]) -> None:
    """ComfyUI gives the negative prompt the positive's GLIGEN boxes too (apply_empty_x_to_equal_area with
    'gligen'): each area-less positive entry's boxes go, round robin, to the area-less negatives without boxes,
    unless a negative has boxes of its own."""
    boxes = [e.unet_patches for e in positive if e.area is None and e.unet_patches is not None]
    if any(e.area is None and e.unet_patches is not None for e in negative):
        return
    plain = [(e, i) for i, e in enumerate(negative) if e.area is None and e.unet_patches is None]
    if not plain:
        return
    for n, source in enumerate(boxes):
        entry, index = plain[n % len(plain)]
        negative[index] = dataclasses.replace(entry, unet_patches=source)


# The SD inpainting UNet's "masked image" channels for an all-black picture (no image given), per latent channel.
_BLANK_INPAINT_LATENT = (0.8223, -0.6876, 0.6364, 0.1380)


def resize_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's resize_to_batch_size: pick evenly spread items (repeat when growing)."""
    count = tensor.shape[0]
    if count == batch:
        return tensor
    if batch <= 1:
        return tensor[:batch]
    if batch < count:
        scale = (count - 1) / (batch - 1)
        picks = [min(round(i * scale), count - 1) for i in range(batch)]
    else:
        scale = count / batch
        picks = [min(int((i + 0.5) * scale), count - 1) for i in range(batch)]
    return tensor[picks]


def inpaint_concat(options: dict, noise_shape: torch.Size, latent: torch.Tensor, denoise_mask: torch.Tensor | None,
                   process_in: Any) -> torch.Tensor:
    """The extra UNet input channels of SD inpainting models (ComfyUI's concat_cond): the rounded mask, then the
    masked image's latent (conditioning's concat_latent_image, else the sampled latent itself); without a mask
    an all-ones mask and a blank picture."""
    from .resize import common_upscale

    batch, height, width = noise_shape[0], noise_shape[2], noise_shape[3]
    mask = options.get("concat_mask", denoise_mask)
    image = options.get("concat_latent_image")
    image = latent if image is None else process_in(image.to(latent.device, torch.float32))
    if image.shape[1:] != noise_shape[1:]:
        image = common_upscale(image, width, height, "bilinear", "center")
    image = resize_to_batch(image, batch)
    if mask is None:
        blank = torch.tensor(_BLANK_INPAINT_LATENT, device=latent.device).reshape(1, -1, 1, 1)
        return torch.cat([torch.ones_like(latent[:, :1]).expand(batch, 1, height, width),
                          torch.ones((batch,) + tuple(noise_shape[1:]), device=latent.device) * blank], dim=1)
    mask = mask.to(latent.device, torch.float32)
    if mask.ndim == len(noise_shape):
        mask = mask[:, :1]
    mask = mask.reshape((-1, 1) + tuple(mask.shape[-2:]))
    if mask.shape[-2:] != (height, width):
        mask = common_upscale(mask, width, height, "bilinear", "center")
    return torch.cat([resize_to_batch(mask.round(), batch), image], dim=1)


def ip2p_concat(options: dict, noise_shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The extra UNet input channels of InstructPix2Pix models (ComfyUI's IP2P.concat_cond): the conditioning's
    concat_latent_image as the VAE gave it (not scaled), bilinear to the latent size; zeros without one."""
    from .resize import common_upscale

    image = options.get("concat_latent_image")
    if image is None:
        return torch.zeros(tuple(noise_shape), device=device)
    image = image.to(device=device, dtype=torch.float32)
    if image.shape[1:] != noise_shape[1:]:
        image = common_upscale(image, noise_shape[3], noise_shape[2], "bilinear", "center")
    return resize_to_batch(image, noise_shape[0])


def repeat_to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] > batch:
        return tensor[:batch]
    if tensor.shape[0] < batch:
        reps = -(-batch // tensor.shape[0])
        return tensor.repeat([reps] + [1] * (tensor.ndim - 1))[:batch]
    return tensor
