"""Stable Diffusion benchmark: the engine against a plain diffusers loop, and memory over many prompts. Prints one
JSON object.

    python tools/bench_sd.py [--size 256] [--steps 10] [--repeats 7] [--threads 1] [--prompts 100]
    python tools/bench_sd.py --gpu [--gpu-size 512] [--gpu-steps 20] [--gpu-repeats 3]

CPU part, on a tiny random SD1.5-shaped checkpoint (tests/tiny_models.py) in a temporary models folder:
  overhead   txt2img (CheckpointLoaderSimple → CLIPTextEncode ×2 → EmptyLatentImage → KSampler euler/normal →
             VAEDecode → SaveImage) re-run with a new seed each repeat (loader and prompts cached, as in use),
             against the same computation written straight against the diffusers modules in this process: the
             seed's CPU noise, the same sigmas and integer timesteps, one UNet call per step on [uncond, cond]
             with CFG in eps space, Euler steps, VAE decode, the PNG written. Medians over --repeats, the two
             alternating; `ratio` = engine / plain (target ≤ 1.02), with `paired_ratio` (median of the
             per-repeat ratios) and `min_ratio` (fastest runs) as steadier figures on a loaded machine.
             `sampler_ratio` compares the KSampler node alone with the plain loop alone; `max_pixel_diff` checks
             that both computed the same picture.
  memory     the same graph at 64² / 2 steps with --prompts distinct positive prompts on one engine: RSS after 10
             and after all of them (target growth ≤ 5 %), and the output cache's bytes against its budget;
             `memory_small_cache` repeats up to 30 prompts under a 256 KiB cache budget (evictions keep the
             cache within it). Measured before the overhead runs, whose freed memory would hide growth.
GPU part (--gpu, only where CUDA is available; otherwise a JSON note): SD1.5-size random weights from the real
SD1.5 UNet / VAE / CLIP-L configs below (no download), written as a single-file fp16 checkpoint, 512², 20
steps: the engine's KSampler (euler, cfg 7.5) against diffusers' StableDiffusionPipeline built from the very
modules the engine loaded (EulerDiscreteScheduler, same prompt embeddings, output_type="latent"), in it/s.
--gpu-dry-run runs that code path on the CPU with the configs shrunk, to check it without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHECKPOINT = "bench_sd15.safetensors"
NEGATIVE = "blurry, low quality"
SMALL_CACHE_BYTES = 1 << 18

# The SD1.5 networks' diffusers / transformers configs (v1-5 model_index), written out so nothing is fetched.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "norm_eps": 1e-5,
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "center_input_sample": False,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# Shrunk for --gpu-dry-run: same block types, narrow widths.
DRY_UNET = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 64}
DRY_VAE = {**SD15_VAE, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1}
DRY_TEXT = {**SD15_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 2, "projection_dim": 64}


# --- shared helpers ----------------------------------------------------------------------------------------------

def txt2img(size: int, steps: int, seed: int, text: str, cfg: float = 7.0, prefix: str = "bench") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def make_engine(root: Path, manager: Any = None, cache_bytes: int | None = None):
    from latentloom import nodes

    engine = nodes.create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "output",
                                 temp_dir=root / "temp", entry_points=False, cache_bytes=cache_bytes)
    if manager is not None:
        engine.env.register(manager)
    return engine


class NodeTimer:
    """Wall time per node of an engine run, from the executor's `executing` events."""

    def __init__(self):
        self.marks: list[tuple[str | None, float]] = []

    def __call__(self, event) -> None:
        if event.type == "executing":
            self.marks.append((event.node, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        pairs = zip(self.marks, self.marks[1:], strict=False)
        return {node: later - at for (node, at), (_, later) in pairs if node is not None}


def run_engine(engine, prompt: dict) -> tuple[float, dict[str, float], Any]:
    timer = NodeTimer()
    started = time.perf_counter()
    result = engine.run(prompt, listener=timer)
    seconds = time.perf_counter() - started
    timer.marks.append((None, time.perf_counter()))  # closes the last node's span
    if getattr(result, "status", None) != "success":
        raise RuntimeError(f"engine run failed: {getattr(result, 'error', None) or result}")
    return seconds, timer.durations(), result


def node_context(engine) -> SimpleNamespace:
    """The parts of engine.node.RunContext the timed nodes use, for calling them outside a run."""
    env = engine.env
    return SimpleNamespace(env=env, models=env.models, service=env.service, find_service=env.find_service,
                           node_id="bench", display_node_id="bench", class_type="bench", prompt={}, extra_data={},
                           warn=lambda message: None, progress=lambda *args, **kwargs: None,
                           check_interrupt=lambda: None)


def loaded_parts(engine) -> tuple[Any, Any, Any, Any, Any]:
    """The model, VAE and both prompts' conditioning as the graph's nodes produce them (the memory manager hands
    out the very objects the engine's runs use)."""
    from latentloom.nodes.conditioning import CLIPTextEncode
    from latentloom.nodes.loaders import CheckpointLoaderSimple

    ctx = node_context(engine)
    model, clip, vae = CheckpointLoaderSimple.model_construct(ckpt_name=CHECKPOINT).run(ctx)
    positive = CLIPTextEncode.model_construct(text="a lighthouse on a cliff at dusk", clip=clip).run(ctx)[0]
    negative = CLIPTextEncode.model_construct(text=NEGATIVE, clip=clip).run(ctx)[0]
    return model, clip, vae, positive, negative


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- CPU: engine vs plain diffusers loop ---------------------------------------------------------------------------

def plain_txt2img(unet, autoencoder, context_uncond, context_cond, seed: int, size: int, sigmas: torch.Tensor,
                  timesteps: torch.Tensor, cfg: float, out_path: Path) -> tuple[np.ndarray, float]:
    """txt2img written straight against diffusers' modules; returns the uint8 image and the loop's seconds."""
    from PIL import Image

    started = time.perf_counter()
    with torch.no_grad():
        noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))
        x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
        context = torch.cat([context_uncond, context_cond])
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            x_in = x / torch.sqrt(sigma ** 2 + 1.0)
            eps_uncond, eps_cond = unet(torch.cat([x_in, x_in]), timesteps[i], encoder_hidden_states=context,
                                        return_dict=False)[0].chunk(2)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            x = x + eps * (sigmas[i + 1] - sigma)  # Euler: dx/dσ = (x − D)/σ = ε
        loop_seconds = time.perf_counter() - started
        decoded = autoencoder.decode(x / autoencoder.config.scaling_factor).sample
    image = torch.clamp((decoded[0] + 1.0) / 2.0, 0.0, 1.0).permute(1, 2, 0).numpy()
    pixels = np.clip(255.0 * image, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(out_path, compress_level=4)
    return pixels, loop_seconds


def bench_overhead(root: Path, size: int, steps: int, repeats: int, cfg: float = 7.0) -> dict:
    from PIL import Image

    from latentloom.engine.memory import ModelManager
    from latentloom.nodes.diffusion.schedules import DiscreteSchedule, calculate_sigmas

    engine = make_engine(root, ModelManager(device="cpu"))
    model, _, vae, positive, negative = loaded_parts(engine)
    schedule = DiscreteSchedule(model.sampling)
    sigmas = calculate_sigmas(schedule, "normal", steps).float()
    timesteps = schedule.timestep(sigmas[:-1])
    unet, autoencoder = model.unet, vae.autoencoder
    text = "a lighthouse on a cliff at dusk"
    plain_dir = root / "plain"
    plain_dir.mkdir(exist_ok=True)

    def engine_once(seed: int) -> tuple[float, dict[str, float], np.ndarray]:
        seconds, nodes_s, result = run_engine(engine, txt2img(size, steps, seed, text, cfg))
        image = result.outputs["7"]["images"][0]
        with Image.open(root / "output" / image["subfolder"] / image["filename"]) as png:
            return seconds, nodes_s, np.asarray(png.convert("RGB"))

    def plain_once(seed: int) -> tuple[float, float, np.ndarray]:
        started = time.perf_counter()
        pixels, loop_s = plain_txt2img(unet, autoencoder, negative[0][0], positive[0][0], seed, size, sigmas,
                                       timesteps, cfg, plain_dir / f"plain_{seed}.png")
        return time.perf_counter() - started, loop_s, pixels

    engine_once(1)  # first run: loads the checkpoint, encodes the prompts
    plain_once(1)
    engine_s, plain_s, sampler_s, loop_s, decode_s, save_s = [], [], [], [], [], []
    max_diff = 0
    for repeat in range(repeats):
        seed = 100 + repeat
        # Alternate which goes first so a slow patch of a shared machine hits both alike.
        order = ("engine", "plain") if repeat % 2 == 0 else ("plain", "engine")
        images = {}
        for which in order:
            if which == "engine":
                seconds, nodes_s, images[which] = engine_once(seed)
                engine_s.append(seconds)
                sampler_s.append(nodes_s["5"])
                decode_s.append(nodes_s["6"])
                save_s.append(nodes_s.get("7", 0.0))
            else:
                seconds, loop_seconds, images[which] = plain_once(seed)
                plain_s.append(seconds)
                loop_s.append(loop_seconds)
        max_diff = max(max_diff, int(np.abs(images["engine"].astype(int) - images["plain"].astype(int)).max()))
    median = statistics.median
    return {
        "model": "tiny SD1.5-shaped (tests/tiny_models.py sd1: UNet widths 32,32,64,64, CLIP width 32)",
        "size": size, "steps": steps, "cfg": cfg, "sampler": "euler/normal", "repeats": repeats,
        "engine_s": round(median(engine_s), 4), "plain_s": round(median(plain_s), 4),
        "ratio": round(median(engine_s) / median(plain_s), 4),
        # The machine may be shared: per-repeat ratios (each pair ran back to back) and the fastest runs are
        # steadier than the medians under load.
        "paired_ratio": round(median(e / p for e, p in zip(engine_s, plain_s, strict=False)), 4),
        "min_ratio": round(min(engine_s) / min(plain_s), 4),
        "engine_sampler_node_s": round(median(sampler_s), 4), "plain_loop_s": round(median(loop_s), 4),
        "sampler_ratio": round(median(sampler_s) / median(loop_s), 4),
        "engine_decode_node_s": round(median(decode_s), 4), "engine_save_node_s": round(median(save_s), 4),
        "engine_runs_s": [round(s, 4) for s in engine_s], "plain_runs_s": [round(s, 4) for s in plain_s],
        "max_pixel_diff": max_diff,
        "unet_calls_per_image": steps,
    }


# --- CPU: memory over many prompts -----------------------------------------------------------------------------

def bench_memory(root: Path, prompts: int, cache_bytes: int | None = None) -> dict:
    from latentloom.engine.memory import ModelManager

    engine = make_engine(root, ModelManager(device="cpu"), cache_bytes)
    words = ("lighthouse", "forest", "city", "harbour", "mountain", "desert", "garden", "library", "bridge", "river")
    rss: dict[int, int] = {}
    started = time.perf_counter()
    for index in range(1, prompts + 1):
        text = f"prompt {index}: a {words[index % len(words)]} in the style of painter number {index * 7}"
        run_engine(engine, txt2img(64, 2, index, text, prefix="memory"))
        if index in (10, prompts):
            gc.collect()
            rss[index] = rss_bytes()
    seconds = time.perf_counter() - started
    cache = engine.cache.stats().as_dict()
    manager = engine.env.models.stats()
    growth = (rss[prompts] - rss[10]) / rss[10]
    return {
        "prompts": prompts, "size": 64, "steps": 2, "seconds": round(seconds, 2),
        "rss_after_10_mb": round(rss[10] / 2 ** 20, 1), f"rss_after_{prompts}_mb": round(rss[prompts] / 2 ** 20, 1),
        "rss_growth": round(growth, 4), "rss_growth_mb": round((rss[prompts] - rss[10]) / 2 ** 20, 1),
        "target_growth": 0.05,
        "cache_bytes": cache["bytes"], "cache_budget": cache["budget"], "cache_entries": cache["entries"],
        "cache_evictions": cache["evictions"], "cache_within_budget": cache["bytes"] <= cache["budget"],
        "model_loads": manager.loads, "models_loaded": len(manager.entries),
    }


# --- GPU: engine vs StableDiffusionPipeline, it/s ---------------------------------------------------------------

def write_random_sd15(path: Path, unet_config: dict, vae_config: dict, text_config: dict, device: torch.device,
                      seed: int = 0) -> None:
    """Random SD1.5-architecture networks (built on `device` for speed) as a single-file fp16 checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from latentloom.nodes.diffusion import convert
    from latentloom.nodes.diffusion.checkpoint import save_state_dict

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        text = CLIPTextModel(CLIPTextConfig(**text_config))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    parts = [module.to(dtype=dtype).cpu().eval() for module in (unet, vae, text)]
    state = convert.ldm_checkpoint("sd1", parts[0], parts[1], {"l": parts[2]})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict({name: tensor.contiguous() for name, tensor in state.items()}, path)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_gpu(root: Path, device: torch.device, size: int, steps: int, repeats: int, dry_run: bool) -> dict:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from latentloom.engine.memory import ModelManager

    configs = (DRY_UNET, DRY_VAE, DRY_TEXT) if dry_run else (SD15_UNET, SD15_VAE, SD15_TEXT)
    started = time.perf_counter()
    write_random_sd15(root / "models" / "checkpoints" / CHECKPOINT, *configs, device=device)
    write_s = time.perf_counter() - started
    manager = ModelManager(device=device, dtypes={"diffusion": "fp16", "text_encoder": "fp16"}
                           if device.type == "cuda" else None)
    engine = make_engine(root, manager)
    cfg = 7.5
    text = "a lighthouse on a cliff at dusk"

    started = time.perf_counter()
    run_engine(engine, txt2img(size, steps, 1, text, cfg))  # loads, encodes, warms up kernels
    first_run_s = time.perf_counter() - started
    engine_sampler_s, engine_run_s = [], []
    for repeat in range(repeats):
        seconds, nodes_s, _ = run_engine(engine, txt2img(size, steps, 100 + repeat, text, cfg))
        engine_run_s.append(seconds)
        engine_sampler_s.append(nodes_s["5"])

    model, _, vae, positive, negative = loaded_parts(engine)
    unet_dtype = next(model.unet.parameters()).dtype
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon",
                                       timestep_spacing="linspace", steps_offset=1)
    pipeline_s = []
    with manager.use(model.unet) as unet, manager.use(vae.autoencoder) as autoencoder:
        pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipeline_nonfinite: list[int] = []
        embeds = {"prompt_embeds": positive[0][0].to(device, unet_dtype),
                  "negative_prompt_embeds": negative[0][0].to(device, unet_dtype)}

        def pipeline_once(seed: int) -> float:
            synchronize(device)
            begin = time.perf_counter()
            latents = pipe(**embeds, height=size, width=size, num_inference_steps=steps, guidance_scale=cfg,
                           output_type="latent", generator=torch.Generator(device).manual_seed(seed)).images
            synchronize(device)
            if not torch.isfinite(latents).all():
                pipeline_nonfinite.append(seed)
            return time.perf_counter() - begin

        pipeline_once(1)  # warm-up
        for repeat in range(repeats):
            pipeline_s.append(pipeline_once(100 + repeat))
    median = statistics.median
    engine_its = steps / median(engine_sampler_s)
    pipeline_its = steps / median(pipeline_s)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dry_run": dry_run, "size": size, "steps": steps, "cfg": cfg, "repeats": repeats,
        "unet_dtype": str(unet_dtype).replace("torch.", ""),
        "vae_dtype": str(next(vae.autoencoder.parameters()).dtype).replace("torch.", ""),
        "unet_parameters": sum(p.numel() for p in model.unet.parameters()),
        "checkpoint_write_s": round(write_s, 2), "engine_first_run_s": round(first_run_s, 2),
        "engine_sampler_s": round(median(engine_sampler_s), 4), "engine_run_s": round(median(engine_run_s), 4),
        "pipeline_s": round(median(pipeline_s), 4),
        "engine_it_s": round(engine_its, 3), "pipeline_it_s": round(pipeline_its, 3),
        "engine_vs_pipeline": round(engine_its / pipeline_its, 4),
        "pipeline_nonfinite_latents": bool(pipeline_nonfinite),
        "note": "it/s = steps / sampling time (engine: KSampler node, previews included; pipeline: denoising "
                "loop with output_type='latent'); each step is one UNet call on a batch of 2 (CFG)",
    }


# --- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side for the overhead figure (pixels)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fixed for the run)")
    parser.add_argument("--prompts", type=int, default=100, help="distinct prompts for the memory figure")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="the SD1.5-size GPU comparison (needs CUDA)")
    parser.add_argument("--gpu-dry-run", action="store_true",
                        help="run the GPU comparison's code on the CPU with shrunk networks")
    parser.add_argument("--gpu-size", type=int, default=512)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.prompts < 10:
        parser.error("--prompts must be at least 10 (the memory figure compares RSS after 10 with after all)")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory(prefix="bench_sd_") as temp:
        root = Path(temp)
        if args.gpu or args.gpu_dry_run:
            if args.gpu_dry_run:
                report["gpu"] = bench_gpu(root, torch.device("cpu"), 64, 2, 2, dry_run=True)
            elif not torch.cuda.is_available():
                report["gpu"] = {"skipped": True, "note": "no CUDA device: the GPU comparison did not run"}
            else:
                report["gpu"] = bench_gpu(root, torch.device("cuda"), args.gpu_size, args.gpu_steps,
                                          args.gpu_repeats, dry_run=False)
        else:
            from tiny_models import write_tiny_checkpoint

            write_tiny_checkpoint(root / "models" / "checkpoints" / CHECKPOINT, family="sd1", seed=0)
            # Memory first: memory freed by the larger overhead runs would otherwise absorb any growth.
            if not args.skip_memory:
                report["memory"] = bench_memory(root, args.prompts)
                # The same with a cache budget the outputs overflow: evictions keep it within the budget.
                report["memory_small_cache"] = bench_memory(root, min(args.prompts, 30),
                                                            cache_bytes=SMALL_CACHE_BYTES)
            report["overhead"] = bench_overhead(root, args.size, args.steps, args.repeats)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
