"""The prepared GPU check of issue 15, item 6: Flux-dev-size random weights in bf16 at 1024², 20 steps, the engine
(KSampler euler, cfg 1, FluxGuidance, ModelSamplingFlux) against diffusers' FluxPipeline on the same transformer,
prompt embeddings, noise and sigmas. Prints one JSON object: s/it and peak VRAM of each, and the max latent
difference between them.

    python tools/bench_flux_gpu.py                # CUDA only; exits with a message (code 2) without it
    python tools/bench_flux_gpu.py --dry-run      # the same code path on a tiny Flux, CPU, fp32, 64², 2 steps

Random weights are built on the device (nothing is read from disk or fetched). Text encoders are not part of the
measure: both sides get the same random T5 embeddings [1, 512, 4096] and CLIP-L pooled vector [1, 768].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# black-forest-labs/FLUX.1-dev transformer config, written out so nothing is fetched.
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
TINY = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2,
        "joint_attention_dim": 64, "pooled_projection_dim": 32}
GUIDANCE = 3.5


class _Context:
    """The RunContext the nodes need, over a real Environment (no executor: the bench calls nodes directly)."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.warnings: list[str] = []
        self.extra_data: dict = {}
        self.prompt: dict = {}
        self.node_id = self.display_node_id = "1"
        self.class_type, self.prompt_id = "KSampler", "bench"

    @property
    def models(self) -> Any:
        return self.env.models

    def service(self, kind: type) -> Any:
        return self.env.service(kind)

    def find_service(self, kind: type) -> Any:
        return self.env.find_service(kind)

    def progress(self, value: int, maximum: int, preview: Any = None) -> None:
        pass

    def check_interrupt(self) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run(size: int, steps: int, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from latentloom.engine.environment import Environment
    from latentloom.nodes.diffusion.latent_formats import FLUX_LATENT
    from latentloom.nodes.diffusion.models import DiffusionModel, SamplingConfig
    from latentloom.nodes.diffusion.schedules import calculate_sigmas, schedule_for
    from latentloom.nodes.model_families import ModelSamplingFlux
    from latentloom.nodes.sampling import KSampler

    torch.manual_seed(seed)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**config).to(dtype).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    embeds = torch.randn(1, 512, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    latent_side = size // 8

    with tempfile.TemporaryDirectory() as models_dir:
        env = Environment.create(models_dir=models_dir)
        ctx = _Context(env)
        model = DiffusionModel(unet=transformer, family="flux", latent_format=FLUX_LATENT,
                               sampling=SamplingConfig(prediction="const", schedule="flux", shift=1.15, multiplier=1.0),
                               options={"variant": "flux_dev"})
        (model,) = ModelSamplingFlux.model_construct(model=model, max_shift=1.15, base_shift=0.5, width=size,
                                                     height=size).run(ctx)
        sigmas = calculate_sigmas(schedule_for(model.sampling), "simple", steps)
        positive = [[embeds, {"pooled_output": pooled, "guidance": GUIDANCE}]]
        sampler = KSampler.model_construct(model=model, seed=seed, steps=steps, cfg=1.0, sampler_name="euler",
                                           scheduler="simple", positive=positive, negative=positive,
                                           latent_image={"samples": torch.zeros(1, 16, latent_side, latent_side)},
                                           denoise=1.0)
        _peak_reset(device)
        _sync(device)
        start = time.perf_counter()
        (samples,) = sampler.run(ctx)
        _sync(device)
        engine_seconds = time.perf_counter() - start
        engine_peak = _peak_gib(device)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.vae_scale_factor = 8  # the real AE (no VAE is built: latents only)
    noise = torch.randn(1, 16, latent_side, latent_side, generator=torch.manual_seed(seed))
    packed_noise = FluxPipeline._pack_latents(noise, 1, 16, latent_side, latent_side)
    _peak_reset(device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        packed = pipe(prompt_embeds=embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                      height=size, width=size, guidance_scale=GUIDANCE, num_inference_steps=steps,
                      sigmas=sigmas[:-1].numpy(), latents=packed_noise.to(device, dtype),
                      output_type="latent").images
    _sync(device)
    pipeline_seconds = time.perf_counter() - start
    pipeline_peak = _peak_gib(device)

    ours = FluxPipeline._pack_latents(FLUX_LATENT.process_in(samples["samples"]), 1, 16, latent_side, latent_side)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "size": size, "steps": steps,
            "parameters_billion": round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3),
            "engine_s_per_it": round(engine_seconds / steps, 4),
            "pipeline_s_per_it": round(pipeline_seconds / steps, 4),
            "engine_peak_vram_gib": None if engine_peak is None else round(engine_peak, 2),
            "pipeline_peak_vram_gib": None if pipeline_peak is None else round(pipeline_peak, 2),
            "max_latent_diff": float((ours.float() - packed.float().cpu()).abs().max()),
            "latent_abs_max": float(packed.float().abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true", help="tiny Flux on the CPU, fp32, 64², 2 steps")
    args = parser.parse_args(argv)
    if args.dry_run:
        result = run(64, 2, TINY, torch.device("cpu"), torch.float32)
    else:
        if not torch.cuda.is_available():
            print("bench_flux_gpu: no CUDA device here; this check needs a GPU (about 30 GiB of VRAM for the "
                  "Flux-dev-size transformer in bf16). Use --dry-run to check the code path on the CPU.",
                  file=sys.stderr)
            return 2
        result = run(args.size, args.steps, FLUX_DEV, torch.device("cuda"), torch.bfloat16)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
