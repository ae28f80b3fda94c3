"""Check the toy model's prompt following with a plain sampling loop of its own; prints JSON.

The loop is ComfyUI's default KSampler made small: SD scaled-linear sigmas, "normal" schedule (timesteps
linspace(999, 0, steps), sigma interpolated in log space), integer timesteps for the UNet, initial noise
x = randn * sqrt(1 + sigma_max^2) from a CPU generator seeded per image, eps-prediction with c_in = 1/sqrt(1+s^2),
CFG on the denoised prediction, Euler steps, VAE decode of latent / 0.18215.

Measured over --seeds seeds each:
  colour_rate       prompt "a <colour> <shape> on a <background> background": colour of the shape region right
  shape_rate        the same images: shape word right (toy_metrics template IoU)
  position_rate     prompt "... at the <position>": the shape's centre lies in that third of the image
  controlnet_rate   with the ControlNet hint = a shape mask at a random place: centre within 8 px of the mask's
  lora_fill         mean fill fraction at LoRA strength 0 and 1 (filled ~1, outlined lower)
Weights are rounded to fp16 first, as shipped. Sources: work-training/ (diffusers folders) by default, or the
shipped files with --shipped (needs nodes.diffusion.convert's loader support; see tools/pack_toy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toy_dataset  # noqa: E402
import toy_metrics  # noqa: E402
from toy_common import WORK_DIR, apply_kohya_lora, encode_prompts, load_tokenizer, tokenize  # noqa: E402

LATENT_SCALE = 0.18215


class ToySampler:
    """Euler / normal schedule / CFG sampler over diffusers modules (optionally with a ControlNet)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, controlnet=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.controlnet = controlnet
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1 - betas, dim=0)
        self.sigmas = ((1 - alphas) / alphas).sqrt().float()
        self.log_sigmas = self.sigmas.double().log().float()

    def _sigma_at(self, t: float) -> float:
        low, high = int(np.floor(t)), int(np.ceil(t))
        w = t - low
        return float(((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp())

    def schedule(self, steps: int) -> list[float]:
        return [self._sigma_at(float(t)) for t in torch.linspace(999, 0, steps)] + [0.0]

    def _timestep(self, sigma: float) -> int:
        return int(torch.argmin((self.log_sigmas - np.log(sigma)).abs()))

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.text_encoder, tokenize(self.tokenizer, prompts))

    @torch.no_grad()
    def sample(self, prompt: str, seed: int, steps: int = 20, cfg: float = 6.0, hint: np.ndarray | None = None,
               control_strength: float = 1.0, negative: str = "", size: int = 64) -> np.ndarray:
        context = self.encode([negative, prompt])
        generator = torch.Generator().manual_seed(seed)
        sigmas = self.schedule(steps)
        x = torch.randn((1, 4, size // 8, size // 8), generator=generator) * (1 + sigmas[0] ** 2) ** 0.5
        hint_tensor = None
        if hint is not None:
            hint_tensor = torch.from_numpy(np.asarray(hint, dtype=np.float32))[None, None].expand(2, 3, -1, -1)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=False):
            x_in = torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5
            t = torch.full((2,), float(self._timestep(sigma)))
            extra = {}
            if self.controlnet is not None and hint_tensor is not None:
                down, mid = self.controlnet(x_in, t, encoder_hidden_states=context, controlnet_cond=hint_tensor,
                                            conditioning_scale=control_strength, return_dict=False)
                extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            eps = self.unet(x_in, t, encoder_hidden_states=context, **extra).sample
            denoised = torch.cat([x, x]) - eps * sigma
            guided = denoised[0:1] + (denoised[1:2] - denoised[0:1]) * cfg
            x = x + (x - guided) / sigma * (sigma_next - sigma)
        image = self.vae.decode(x / LATENT_SCALE).sample
        image = ((image[0].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return image.numpy()


def _fp16_round(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.half().float())
    return module.eval()


def load_work_models(with_controlnet: bool = True):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = _fp16_round(UNet2DConditionModel.from_pretrained(WORK_DIR / "unet"))
    vae = _fp16_round(AutoencoderKL.from_pretrained(WORK_DIR / "vae"))
    text_encoder = _fp16_round(CLIPTextModel.from_pretrained(WORK_DIR / "text_encoder"))
    controlnet = None
    if with_controlnet and (WORK_DIR / "controlnet").exists():
        controlnet = _fp16_round(ControlNetModel.from_pretrained(WORK_DIR / "controlnet"))
    return unet, vae, text_encoder, controlnet


@torch.no_grad()
def evaluate_vae(vae, count: int) -> dict:
    """Reconstruct held-out dataset images (filled and outlined) and measure them like generated ones."""
    right = {"colour": 0, "shape": 0}
    errors, fills = [], {}
    for style in ("filled", "outline"):
        samples = list(toy_dataset.iter_samples(count, start_seed=9_000_000, style=style))
        pixels = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        images = ((decoded.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
        errors.append(float(np.abs(images.astype(float) - np.stack([s.image for s in samples])).mean()))
        analyses = [toy_metrics.analyse(image) for image in images]
        fills[style] = float(np.mean([a.fill for a in analyses]))
        if style == "filled":
            right["colour"] = sum(a.colour == s.spec.colour for a, s in zip(analyses, samples, strict=False))
            right["shape"] = sum(a.shape == s.spec.shape for a, s in zip(analyses, samples, strict=False))
    return {"colour_rate": right["colour"] / count, "shape_rate": right["shape"] / count,
            "mean_abs_error_0_255": round(float(np.mean(errors)), 2), "fill": fills}


def _prompt_cases(seeds: int, offset: int) -> list[tuple[int, toy_dataset.ShapeSpec]]:
    """Seeded random (colour, shape, background, position) prompts, balanced over colours and shapes."""
    rng = np.random.default_rng(1234 + offset)
    cases = []
    for index in range(seeds):
        colour = list(toy_dataset.SHAPE_COLOURS)[index % 4]
        shape = toy_dataset.SHAPES[(index // 4) % 3]
        spec = toy_dataset.random_spec(rng, colour=colour, shape=shape, size_word="medium")
        cases.append((offset + index, spec))
    return cases


def evaluate(sampler: ToySampler, seeds: int, steps: int, cfg: float, lora_path: Path | None,
             examples: list | None = None) -> dict:
    results: dict = {"seeds": seeds, "steps": steps, "cfg": cfg}
    colour_ok = shape_ok = 0
    confusions: dict[str, int] = {}
    for seed, spec in _prompt_cases(seeds, 0):
        prompt = toy_dataset.caption_for(spec, with_size=False, with_position=False)
        image = sampler.sample(prompt, seed, steps=steps, cfg=cfg)
        analysis = toy_metrics.analyse(image)
        colour_ok += analysis.colour == spec.colour
        shape_ok += analysis.shape == spec.shape
        if analysis.shape != spec.shape:
            key = f"{spec.shape}->{analysis.shape}"
            confusions[key] = confusions.get(key, 0) + 1
        if examples is not None:
            examples.append((prompt, image))
    results["colour_rate"] = colour_ok / seeds
    results["shape_rate"] = shape_ok / seeds
    results["shape_confusions"] = confusions

    position_ok = 0
    for seed, spec in _prompt_cases(seeds, 1000):
        prompt = toy_dataset.caption_for(spec, with_size=False, with_position=True)
        analysis = toy_metrics.analyse(sampler.sample(prompt, seed, steps=steps, cfg=cfg))
        position_ok += analysis.position == spec.position_word
    results["position_rate"] = position_ok / seeds

    if sampler.controlnet is not None:
        control_ok = 0
        distances = []
        for seed, spec in _prompt_cases(seeds, 2000):
            _, mask = toy_dataset.render(spec)
            prompt = toy_dataset.caption_for(spec, with_size=False, with_position=False)
            analysis = toy_metrics.analyse(sampler.sample(prompt, seed, steps=steps, cfg=cfg, hint=mask))
            target = toy_metrics.mask_centre(mask)
            distance = float(np.hypot(analysis.centre[0] - target[0], analysis.centre[1] - target[1])) \
                if analysis.centre else 99.0
            distances.append(distance)
            control_ok += distance <= 8.0
        results["controlnet_rate"] = control_ok / seeds
        results["controlnet_median_distance_px"] = float(np.median(distances))

    if lora_path is not None and lora_path.exists():
        from safetensors.torch import load_file

        tensors = load_file(str(lora_path))
        fills = {}
        for strength in (0.0, 1.0):
            patched = apply_kohya_lora(sampler.unet, tensors, strength)
            values = []
            for seed, spec in _prompt_cases(seeds, 3000):
                prompt = toy_dataset.caption_for(spec, with_size=False, with_position=False)
                values.append(toy_metrics.analyse(sampler.sample(prompt, seed, steps=steps, cfg=cfg)).fill)
            apply_kohya_lora(sampler.unet, tensors, -strength)
            fills[str(strength)] = float(np.mean(values))
        results["lora_modules"] = patched
        results["lora_fill"] = fills
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=6.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", default=str(WORK_DIR / "lora_outline.safetensors"))
    parser.add_argument("--vae-only", action="store_true", help="only measure VAE reconstructions")
    parser.add_argument("--sheet", default="", help="write a contact sheet of the colour/shape samples here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    if args.vae_only:
        from diffusers import AutoencoderKL

        vae = _fp16_round(AutoencoderKL.from_pretrained(WORK_DIR / "vae"))
        print(json.dumps({"vae_reconstruction": evaluate_vae(vae, args.seeds)}, indent=2))
        return
    unet, vae, text_encoder, controlnet = load_work_models()
    sampler = ToySampler(unet, vae, text_encoder, load_tokenizer(), controlnet)
    examples: list = []
    results = evaluate(sampler, args.seeds, args.steps, args.cfg, Path(args.lora) if args.lora else None, examples)
    results["vae_reconstruction"] = evaluate_vae(vae, args.seeds)
    results["seconds"] = round(time.time() - started, 1)
    if args.sheet:
        from PIL import Image

        sheet = Image.new("RGB", (64 * 8, 64 * ((len(examples) + 7) // 8)))
        for index, (_, image) in enumerate(examples):
            sheet.paste(Image.fromarray(image), ((index % 8) * 64, (index // 8) * 64))
        sheet.save(args.sheet)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
