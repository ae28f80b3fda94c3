"""Train the bundled toy latent-diffusion family ("toy-shapes") from scratch, in SD1.5's architectures.

Parts (run in order; each reads the previous parts' results from work-training/):
  vae         AutoencoderKL (4 latent channels, /8), on random 32x32 crops then whole 64x64 images; the latent is
              then re-normalised (folded into quant_conv/post_quant_conv) so that latent * 0.18215 has unit
              variance and zero mean, as the engine's SD1 latent format expects.
  unet        CLIPTextModel (real CLIP token ids, trained from scratch) + UNet2DConditionModel with cross-attention,
              eps-prediction on SD's scaled-linear schedule, 10 % caption dropout so classifier-free guidance works.
  controlnet  ControlNetModel.from_unet(unet), hint = the shape's silhouette mask (white on black), base frozen.
  lora        rank-8 LoRA on the UNet attention projections that draws outlined shapes instead of filled ones.
  decoder     more VAE-decoder training with the encoder frozen (optional, after the others; the latents the
              UNet learnt stay valid). Not part of the shipped recipe.
  all         vae, unet, controlnet, lora in order: with the defaults, the recipe of the shipped files.

Usage: .venv/bin/python tools/train_toy.py --part all [--device cpu] [--threads 2]
Every part is seeded; the results do not depend on the device (a GPU only makes it faster). Times go to
work-training/times.json. tools/pack_toy.py writes the shipped files from work-training/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_dataset  # noqa: E402
from toy_common import (  # noqa: E402
    WORK_DIR,
    build_text_encoder,
    build_unet,
    build_vae,
    encode_prompts,
    inject_lora,
    kohya_state_dict,
    load_tokenizer,
    sd_alphas_cumprod,
    tokenize,
)

LATENT_SCALE = 0.18215
CAPTION_DROPOUT = 0.1


def _log(part: str, step: int, total: int, loss: float, started: float) -> None:
    print(f"[{part}] step {step}/{total} loss {loss:.4f} ({time.time() - started:.0f} s)", flush=True)


def _stop_requested(part: str) -> bool:
    """`touch work-training/STOP_<part>` ends that part's loop early (it still saves); for a contended machine."""
    flag = WORK_DIR / f"STOP_{part}"
    if flag.exists():
        flag.unlink()
        print(f"[{part}] stop requested: finishing early", flush=True)
        return True
    return False


def _optimiser_step(loss: torch.Tensor, optimiser, params, schedule) -> None:
    """Backward, clip the gradient norm to 1, then step the optimiser and the learning-rate schedule."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimiser.step()
    schedule.step()


def _report(part: str, step: int, total: int, loss: float, started: float, every: int) -> bool:
    """Log every `every` steps and at the last one; True when a stop was requested (looked for when logging)."""
    if step % every == 0 or step == total - 1:
        _log(part, step, total, loss, started)
        return _stop_requested(part)
    return False


def _record_time(part: str, seconds: float, extra: dict | None = None) -> None:
    path = WORK_DIR / "times.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[part] = {"seconds": round(seconds, 1), "threads": torch.get_num_threads(), **(extra or {})}
    path.write_text(json.dumps(times, indent=2))


def _images_to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _pixel_weights(masks: np.ndarray, foreground_weight: float) -> torch.Tensor:
    """Per-pixel loss weights [N, 1, H, W]: 1 on the background, 1 + foreground_weight on the shape and a 2-px rim.
    A small shape is ~3 % of the pixels: unweighted, the autoencoder learns to blur it away."""
    silhouette = torch.from_numpy(masks).float()[:, None]
    rim = F.max_pool2d(silhouette, kernel_size=5, stride=1, padding=2)
    return 1.0 + foreground_weight * rim


def _autoencoder_data(count: int, foreground_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's and the decoder's training images (half filled, half outlined) in -1..1, and their loss weights."""
    filled, filled_masks, _ = toy_dataset.make_arrays(count // 2, start_seed=1_000_000)
    outline, outline_masks, _ = toy_dataset.make_arrays(count // 2, start_seed=2_000_000, style="outline")
    pixels = _images_to_tensor(np.concatenate([filled, outline]))
    return pixels, _pixel_weights(np.concatenate([filled_masks, outline_masks]), foreground_weight)


def _reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    error = reconstruction - target
    return (weight * (error.abs() + error.pow(2))).mean() / weight.mean()


# ----------------------------------------------------------------------------------------------------------- VAE

def train_vae(args: argparse.Namespace) -> None:
    started = time.time()
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    count = args.vae_images
    pixels, weights = _autoencoder_data(count, args.foreground_weight)
    # --vae-resume continues from work-training/vae (its latent normalisation is folded in; it is re-done below).
    vae = (_load_vae() if args.vae_resume else build_vae()).to(args.device).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    crop_steps, total = args.vae_crop_steps, args.vae_crop_steps + args.vae_full_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 30) * (0.05 + 0.475 * (1 + math.cos(math.pi * step / total))))
    step = 0
    while step < total:
        index = torch.from_numpy(rng.integers(0, len(pixels), args.vae_batch))
        batch, weight = pixels[index], weights[index]
        if step < crop_steps:
            # Random crops on the 8-pixel latent grid: much cheaper per step, and convolutions barely care; the
            # whole-image phase at the end adapts the borders and the mid-block attention.
            crop = args.vae_crop
            oy, ox = (int(v) * 8 for v in rng.integers(0, (64 - crop) // 8 + 1, 2))
            batch = batch[:, :, oy:oy + crop, ox:ox + crop]
            weight = weight[:, :, oy:oy + crop, ox:ox + crop]
        batch, weight = batch.to(args.device), weight.to(args.device)
        # Deterministic autoencoder (decode the posterior mean): sampling with the untrained unit variance would
        # drown the small initial latents in noise and slow learning badly. Mild latent noise keeps the decoder
        # tolerant of imperfect UNet outputs; a small L2 term keeps the latents bounded (instead of the KL term).
        latents = vae.encode(batch).latent_dist.mean
        jitter = 0.1 * latents.detach().std() * torch.randn_like(latents)
        reconstruction = vae.decode(latents + jitter).sample
        loss = _reconstruction_loss(reconstruction, batch, weight)
        loss = loss + 1e-4 * latents.pow(2).mean()
        _optimiser_step(loss, optimiser, vae.parameters(), schedule)
        if step % 50 == 0 or step == total - 1:
            _log("vae", step, total, loss.item(), started)
            if step < crop_steps and _stop_requested("vae"):
                # Skip to the whole-image phase (the cosine schedule, late-bound on `total`, is then near its end).
                crop_steps, total = step + 1, step + 1 + args.vae_full_steps
        step += 1
    vae = vae.eval().cpu()
    _normalise_latents(vae, pixels[:1000])
    vae.save_pretrained(WORK_DIR / "vae")
    _record_time("vae", time.time() - started,
                 {"crop_steps": crop_steps, "full_steps": total - crop_steps, "batch": args.vae_batch})


@torch.no_grad()
def _normalise_latents(vae, pixels: torch.Tensor) -> None:
    """Fold an affine map into the VAE so latent_mean * 0.18215 has zero mean and unit variance per channel.

    quant_conv emits (mean, logvar); the new mean is (mean - mu) * k; post_quant_conv receives z / k + mu
    instead of z, so the decoded image is unchanged.
    """
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(250)])
    mu = means.mean(dim=(0, 2, 3))
    std = means.std(dim=(0, 2, 3))
    k = 1.0 / (std * LATENT_SCALE)
    channels = mu.numel()
    quant = vae.quant_conv
    quant.weight[:channels] *= k[:, None, None, None]
    quant.bias[:channels] = (quant.bias[:channels] - mu) * k
    post = vae.post_quant_conv
    # post(z/k + mu) = W (z/k) + (W mu + b)
    post.bias += (post.weight[:, :, 0, 0] @ mu)
    post.weight /= k[None, :, None, None]
    # Trained as a deterministic autoencoder: make the posterior variance negligible so a sample is the mean.
    quant.weight[channels:] = 0
    quant.bias[channels:] = -20.0
    check = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels[:500].split(250)]) * LATENT_SCALE
    print(f"[vae] latent stats after folding: mean {check.mean().item():.3f} std {check.std().item():.3f}")


def train_decoder(args: argparse.Namespace) -> None:
    """More decoder training with the encoder frozen: the latents the UNet learnt stay valid, the images sharpen.
    Works on 4x4-latent crops of whole-image latents (so the frozen encoder sees whole images)."""
    started = time.time()
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    vae = _load_vae()
    count = args.vae_images
    pixels, weights = _autoencoder_data(count, args.foreground_weight)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(250)])
    vae.requires_grad_(False)
    trainable = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for param in trainable:
        param.requires_grad_(True)
    vae.decoder.train()
    optimiser = torch.optim.AdamW(trainable, lr=args.decoder_lr, weight_decay=0.0)
    total = args.decoder_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / 20) * (0.05 + 0.475 * (1 + math.cos(math.pi * step / total))))
    for step in range(total):
        index = torch.from_numpy(rng.integers(0, len(pixels), args.vae_batch))
        if args.decoder_mosaic:
            # Mosaics of 1x1 to 2x2 whole latents: the mid-block attention must also decode canvases larger than
            # 64x64 (hires fix, outpaint, area composition), where it otherwise mixes colours across the image.
            rows, cols = (int(v) for v in rng.integers(1, 3, 2))
            tiles = [torch.from_numpy(rng.integers(0, len(pixels), args.vae_batch)) for _ in range(rows * cols)]
            def mosaic(source, tiles=tiles, rows=rows, cols=cols):
                grid = [torch.cat([source[tiles[r * cols + c]] for c in range(cols)], dim=3) for r in range(rows)]
                return torch.cat(grid, dim=2)
            z, target, weight = mosaic(latents), mosaic(pixels), mosaic(weights)
        else:
            # 4x4-latent crops, whole 8x8 latents for the last 10 % of the steps (borders, mid-block attention).
            side = 8 if step >= 0.9 * total else 4
            ly, lx = (int(v) for v in rng.integers(0, 9 - side, 2))
            z = latents[index][:, :, ly:ly + side, lx:lx + side]
            target = pixels[index][:, :, ly * 8:(ly + side) * 8, lx * 8:(lx + side) * 8]
            weight = weights[index][:, :, ly * 8:(ly + side) * 8, lx * 8:(lx + side) * 8]
        jitter = 0.1 * z.std() * torch.randn_like(z)
        reconstruction = vae.decode(z + jitter).sample
        loss = _reconstruction_loss(reconstruction, target, weight)
        _optimiser_step(loss, optimiser, trainable, schedule)
        if _report("decoder", step, total, loss.item(), started, every=50):
            break
    vae.eval().save_pretrained(WORK_DIR / "vae")
    _record_time("decoder", time.time() - started, {"steps": step + 1, "batch": args.vae_batch})


# ------------------------------------------------------------------------------------- latents for the UNet

def _load_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(WORK_DIR / "vae").eval()


@torch.no_grad()
def prepare_latents(style: str, count: int, start_seed: int, tokenizer) -> dict:
    """Encode `count` dataset images once (VAE mean, x 0.18215) and tokenize their four caption variants."""
    cache = WORK_DIR / f"latents_{style}_{count}_{start_seed}.pt"
    if cache.exists():
        return torch.load(cache)
    vae = _load_vae()
    samples = list(toy_dataset.iter_samples(count, start_seed=start_seed, style=style))
    pixels = _images_to_tensor(np.stack([s.image for s in samples]))
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(200)]) * LATENT_SCALE
    variants = [toy_dataset.caption_for(s.spec, with_size, with_position)
                for s in samples for with_size in (False, True) for with_position in (False, True)]
    token_ids = tokenize(tokenizer, variants).view(count, 4, -1)
    masks = torch.from_numpy(np.stack([s.mask for s in samples])).to(torch.float16)
    data = {"latents": latents, "token_ids": token_ids, "masks": masks}
    torch.save(data, cache)
    return data


class _Batches:
    """Random batches: latent, one random caption variant (dropped to "" with CAPTION_DROPOUT), optional hint."""

    def __init__(self, data: dict, tokenizer, seed: int, device: str):
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        self.empty_ids = tokenize(tokenizer, [""])[0]
        self.device = device

    def next(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        count = len(self.data["latents"])
        index = torch.randint(0, count, (batch_size,), generator=self.generator)
        variant = torch.randint(0, 4, (batch_size,), generator=self.generator)
        ids = self.data["token_ids"][index, variant].clone()
        dropped = torch.rand(batch_size, generator=self.generator) < CAPTION_DROPOUT
        ids[dropped] = self.empty_ids
        hint = self.data["masks"][index].float()[:, None].expand(-1, 3, -1, -1)
        return (self.data["latents"][index].to(self.device), ids.to(self.device), hint.contiguous().to(self.device))

    def noised(self, latents: torch.Tensor, alphas: torch.Tensor):
        # Uniform timesteps, plus a third more from the noisy half where colour, shape and layout are decided.
        uniform = torch.randint(0, 1000, (len(latents),), generator=self.generator)
        noisy_half = torch.randint(500, 1000, (len(latents),), generator=self.generator)
        timesteps = torch.where(torch.rand(len(latents), generator=self.generator) < 0.25, noisy_half, uniform)
        noise = torch.randn(latents.shape, generator=self.generator).to(latents.device)
        alpha = alphas[timesteps].to(latents.device).view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        # min-SNR-5 weighting (eps form): spends less effort on the nearly clean, easy timesteps.
        snr = alpha / (1 - alpha)
        weight = snr.clamp(max=5.0) / snr
        return noisy, timesteps.to(latents.device), noise, weight.view(-1)


def _weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (weight * ((prediction - target) ** 2).mean(dim=(1, 2, 3))).mean()


def _lr_schedule(optimiser, total: int, warmup: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total))))


class _Ema:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=False):
            shadow.lerp_(param.detach(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, param in zip(self.shadow, self.params, strict=False):
            param.copy_(shadow)

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA weights in the model for the duration (e.g. to save them), the trained ones restored after."""
        with torch.no_grad():
            trained = [param.detach().clone() for param in self.params]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, param in zip(trained, self.params, strict=False):
                    param.copy_(saved)


# ---------------------------------------------------------------------------------------------- UNet + CLIP

def train_unet(args: argparse.Namespace) -> None:
    started = time.time()
    torch.manual_seed(2)
    tokenizer = load_tokenizer()
    data = prepare_latents("filled", args.unet_images, 0, tokenizer)
    prepared = time.time() - started
    if args.unet_resume:
        # Continue from the last run: raw weights to train, the EMA weights as the EMA's starting point.
        unet, text_encoder = _load_pair("unet_raw", "text_encoder_raw", args.device)
        ema_unet, ema_text = _load_pair("unet", "text_encoder", "cpu")
    else:
        unet, text_encoder = build_unet().to(args.device), build_text_encoder().to(args.device)
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    schedule = _lr_schedule(optimiser, args.unet_steps, warmup=20 if args.unet_resume else 100)
    ema = _Ema([unet, text_encoder], decay=args.ema_decay)
    if args.unet_resume:
        ema.shadow = [p.detach().clone().to(args.device)
                      for p in list(ema_unet.parameters()) + list(ema_text.parameters())]
    batches = _Batches(data, tokenizer, seed=2, device=args.device)
    alphas = sd_alphas_cumprod().float()
    running = 0.0
    for step in range(args.unet_steps):
        latents, ids, _ = batches.next(args.batch)
        noisy, timesteps, noise, weight = batches.noised(latents, alphas)
        context = encode_prompts(text_encoder, ids)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = _weighted_mse(prediction, noise, weight)
        _optimiser_step(loss, optimiser, params, schedule)
        ema.update()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if _report("unet", step, args.unet_steps, running, started, every=100):
            break
        if (step + 1) % 1000 == 0 and step + 1 < args.unet_steps:
            # Checkpoint both the raw weights (to resume) and the EMA weights (to evaluate while training goes on).
            unet.save_pretrained(WORK_DIR / "unet_raw")
            text_encoder.save_pretrained(WORK_DIR / "text_encoder_raw")
            with ema.swapped_in():
                unet.save_pretrained(WORK_DIR / "unet")
                text_encoder.save_pretrained(WORK_DIR / "text_encoder")
    unet.save_pretrained(WORK_DIR / "unet_raw")
    text_encoder.save_pretrained(WORK_DIR / "text_encoder_raw")
    ema.copy_to_model()
    unet.cpu().save_pretrained(WORK_DIR / "unet")
    text_encoder.cpu().save_pretrained(WORK_DIR / "text_encoder")
    _record_time("unet", time.time() - started,
                 {"steps": step + 1, "batch": args.batch, "data_prep_seconds": round(prepared, 1)})


def _load_pair(unet_folder: str, text_folder: str, device: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(WORK_DIR / unet_folder).to(device)
    return unet, CLIPTextModel.from_pretrained(WORK_DIR / text_folder).to(device)


def _load_base(device: str):
    unet, text_encoder = _load_pair("unet", "text_encoder", device)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------- ControlNet

def train_controlnet(args: argparse.Namespace) -> None:
    from diffusers import ControlNetModel

    started = time.time()
    torch.manual_seed(3)
    tokenizer = load_tokenizer()
    data = prepare_latents("filled", args.unet_images, 0, tokenizer)
    unet, text_encoder = _load_base(args.device)
    controlnet = ControlNetModel.from_unet(unet).to(args.device).train().requires_grad_(True)
    optimiser = torch.optim.AdamW(controlnet.parameters(), lr=args.controlnet_lr, weight_decay=0.0)
    schedule = _lr_schedule(optimiser, args.controlnet_steps, warmup=50)
    batches = _Batches(data, tokenizer, seed=3, device=args.device)
    alphas = sd_alphas_cumprod().float()
    running = 0.0
    for step in range(args.controlnet_steps):
        latents, ids, hint = batches.next(args.batch)
        noisy, timesteps, noise, weight = batches.noised(latents, alphas)
        with torch.no_grad():
            context = encode_prompts(text_encoder, ids)
        down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context, controlnet_cond=hint,
                               return_dict=False)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        loss = _weighted_mse(prediction, noise, weight)
        _optimiser_step(loss, optimiser, controlnet.parameters(), schedule)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if _report("controlnet", step, args.controlnet_steps, running, started, every=100):
            break
    controlnet.cpu().save_pretrained(WORK_DIR / "controlnet")
    _record_time("controlnet", time.time() - started, {"steps": step + 1, "batch": args.batch})


# ----------------------------------------------------------------------------------------------------- LoRA

def train_lora(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    started = time.time()
    torch.manual_seed(4)
    tokenizer = load_tokenizer()
    data = prepare_latents("outline", args.lora_images, 3_000_000, tokenizer)
    unet, text_encoder = _load_base(args.device)
    adapters = inject_lora(unet, rank=args.lora_rank, alpha=args.lora_rank)
    params = [p for adapter in adapters.values() for p in adapter.parameters()]
    optimiser = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    schedule = _lr_schedule(optimiser, args.lora_steps, warmup=50)
    batches = _Batches(data, tokenizer, seed=4, device=args.device)
    alphas = sd_alphas_cumprod().float()
    running = 0.0
    for step in range(args.lora_steps):
        latents, ids, _ = batches.next(args.batch)
        noisy, timesteps, noise, weight = batches.noised(latents, alphas)
        with torch.no_grad():
            context = encode_prompts(text_encoder, ids)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        loss = _weighted_mse(prediction, noise, weight)
        _optimiser_step(loss, optimiser, params, schedule)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if _report("lora", step, args.lora_steps, running, started, every=100):
            break
    save_file(kohya_state_dict(adapters, alpha=args.lora_rank), WORK_DIR / "lora_outline.safetensors")
    _record_time("lora", time.time() - started,
                 {"steps": step + 1, "batch": args.batch, "rank": args.lora_rank})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", required=True, choices=["vae", "unet", "controlnet", "lora", "decoder", "all"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # Two threads on a quiet 2-core machine; use 1 when other jobs load the CPU (barrier waits made 2 threads
    # up to 4x slower per step on an oversubscribed machine).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-images", type=int, default=8000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-crop-steps", type=int, default=3500)
    parser.add_argument("--vae-full-steps", type=int, default=250)
    parser.add_argument("--vae-resume", action="store_true")
    parser.add_argument("--vae-crop", type=int, default=32, choices=[16, 24, 32, 40, 48])
    parser.add_argument("--foreground-weight", type=float, default=8.0,
                        help="extra loss weight on the shape's pixels (VAE and decoder parts)")
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--decoder-mosaic", action="store_true", help="decoder part: train on 1x1..2x2 mosaics")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--unet-images", type=int, default=12000)
    parser.add_argument("--unet-steps", type=int, default=9000)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--unet-resume", action="store_true", help="continue from work-training/unet_raw")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--controlnet-steps", type=int, default=1200)
    parser.add_argument("--controlnet-lr", type=float, default=1e-3)
    parser.add_argument("--lora-images", type=int, default=3000)
    parser.add_argument("--lora-steps", type=int, default=1200)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    parts = ["vae", "unet", "controlnet", "lora"] if args.part == "all" else [args.part]
    trainers = {"vae": train_vae, "decoder": train_decoder, "unet": train_unet, "controlnet": train_controlnet,
                "lora": train_lora}
    for part in parts:
        trainers[part](args)


if __name__ == "__main__":
    main()
