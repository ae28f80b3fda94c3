"""The GPU half of tools/bench_compare.py: engine against diffusers' pipelines on SD1.5-size and SDXL-size random
weights, fp16, in it/s and peak VRAM, without and with torch.compile. Imported by bench_compare (--gpu,
--gpu-dry-run); see its docstring. The dry run takes the tests' tiny models (tests/tiny_models.py) at 64², on the
CPU in fp32, so the code path is checked without a GPU."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_sd import SD15_TEXT, SD15_UNET, SD15_VAE, loaded_parts, make_engine, run_engine

CHECKPOINT = "bench_gpu.safetensors"
POSITIVE, NEGATIVE = "a lighthouse on a cliff at dusk", "blurry, low quality"
CFG = 7.5

# SDXL base's configs (stabilityai/stable-diffusion-xl-base-1.0 model_index), written out so nothing is fetched.
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
    "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
}
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_TEXT_G = {
    "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
    "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
}
# family -> (UNet config, VAE config, {slot: (text config, with projection)}, image side)
FULL_SIZE = {
    "sd15": (SD15_UNET, SD15_VAE, {"l": (SD15_TEXT, False)}, 512),
    "sdxl": (SDXL_UNET, SDXL_VAE, {"l": (SD15_TEXT, False), "g": (SDXL_TEXT_G, True)}, 1024),
}
TINY_FAMILY = {"sd15": "sd1", "sdxl": "sdxl"}


def write_checkpoint(path: Path, family: str, device: torch.device, dry_run: bool) -> None:
    """Random weights of `family` as a single-file checkpoint (fp16 on CUDA)."""
    if dry_run:
        from tiny_models import write_tiny_checkpoint

        write_tiny_checkpoint(path, family=TINY_FAMILY[family], seed=0)
        return
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from latentloom.nodes.diffusion import convert
    from latentloom.nodes.diffusion.checkpoint import save_state_dict

    unet_config, vae_config, text_configs, _ = FULL_SIZE[family]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config).half().cpu()
        vae = AutoencoderKL(**vae_config).half().cpu()
        encoders = {slot: (CLIPTextModelWithProjection if projection else CLIPTextModel)(
            CLIPTextConfig(**config)).half().cpu() for slot, (config, projection) in text_configs.items()}
    state = convert.ldm_checkpoint("sdxl" if family == "sdxl" else "sd1", unet, vae, encoders)
    save_state_dict(state, path)


def graph(size: int, steps: int, seed: int, compiled: bool) -> dict:
    model = ["10", 0] if compiled else ["1", 0]
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POSITIVE}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": NEGATIVE}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
            "steps": steps, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "gpu"}},
    }
    if compiled:
        prompt["10"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["1", 0], "backend": "inductor"}}
    return prompt


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def engine_figures(engine, size: int, steps: int, repeats: int, compiled: bool, device: torch.device) -> dict:
    started = time.perf_counter()
    run_engine(engine, graph(size, steps, 1, compiled))  # loads, encodes, compiles, warms kernels up
    first = time.perf_counter() - started
    reset_peak(device)
    sampler = [run_engine(engine, graph(size, steps, 100 + repeat, compiled))[1]["5"] for repeat in range(repeats)]
    return {"first_run_s": round(first, 3), "sampler_s": round(statistics.median(sampler), 4),
            "it_s": round(steps / statistics.median(sampler), 3), "peak_vram_mb": peak_mb(device)}


def pipeline_figures(family: str, engine, size: int, steps: int, repeats: int, compiled: bool,
                     device: torch.device) -> dict:
    """diffusers' pipeline on the very modules the engine loaded, denoising loop only (output_type="latent")."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    model, _, vae, positive, negative = loaded_parts_of(engine)
    manager = engine.env.models
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon",
                                       timestep_spacing="linspace" if family == "sd15" else "leading",
                                       steps_offset=1)
    with manager.use(model.unet) as unet, manager.use(vae.autoencoder) as autoencoder:
        dtype = next(unet.parameters()).dtype
        denoiser = torch.compile(unet) if compiled else unet
        embeds = {"prompt_embeds": positive[0][0].to(device, dtype),
                  "negative_prompt_embeds": negative[0][0].to(device, dtype)}
        if family == "sdxl":
            pipe: Any = StableDiffusionXLPipeline(vae=autoencoder, text_encoder=None, text_encoder_2=None,
                                                  tokenizer=None, tokenizer_2=None, unet=denoiser,
                                                  scheduler=scheduler)
            embeds["pooled_prompt_embeds"] = positive[0][1]["pooled_output"].to(device, dtype)
            embeds["negative_pooled_prompt_embeds"] = negative[0][1]["pooled_output"].to(device, dtype)
        else:
            pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=None, tokenizer=None, unet=denoiser,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def once(seed: int) -> tuple[float, bool]:
            synchronize(device)
            begin = time.perf_counter()
            latents = pipe(**embeds, height=size, width=size, num_inference_steps=steps, guidance_scale=CFG,
                           output_type="latent", generator=torch.Generator(device).manual_seed(seed)).images
            synchronize(device)
            return time.perf_counter() - begin, bool(torch.isfinite(latents).all())

        started = time.perf_counter()
        once(1)  # warm-up (and compilation)
        first = time.perf_counter() - started
        reset_peak(device)
        runs = [once(100 + repeat) for repeat in range(repeats)]
    seconds = statistics.median(run for run, _ in runs)
    return {"first_run_s": round(first, 3), "denoise_s": round(seconds, 4), "it_s": round(steps / seconds, 3),
            "peak_vram_mb": peak_mb(device), "finite_latents": all(finite for _, finite in runs)}


def loaded_parts_of(engine) -> tuple[Any, Any, Any, Any, Any]:
    import bench_sd

    previous, bench_sd.CHECKPOINT = bench_sd.CHECKPOINT, CHECKPOINT
    try:
        return loaded_parts(engine)
    finally:
        bench_sd.CHECKPOINT = previous


def family_report(family: str, root: Path, device: torch.device, dry_run: bool, steps: int, repeats: int,
                  compile_too: bool) -> dict:
    from latentloom.engine.memory import ModelManager

    size = 64 if dry_run else FULL_SIZE[family][3]
    started = time.perf_counter()
    write_checkpoint(root / "models" / "checkpoints" / CHECKPOINT, family, device, dry_run)
    report: dict[str, Any] = {"size": size, "steps": steps,
                              "checkpoint_write_s": round(time.perf_counter() - started, 2)}
    manager = ModelManager(device=device, dtypes={"diffusion": "fp16", "text_encoder": "fp16"}
                           if device.type == "cuda" else None)
    engine = make_engine(root, manager)
    variants = [False, True] if compile_too else [False]
    for compiled in variants:
        label = "compiled" if compiled else "eager"
        if compiled and "TorchCompileModel" not in engine.registry:
            report[f"engine_{label}"] = {"skipped": "no TorchCompileModel node in this build"}
        else:
            report[f"engine_{label}"] = engine_figures(engine, size, steps, repeats, compiled, device)
        report[f"pipeline_{label}"] = pipeline_figures(family, engine, size, steps, repeats, compiled, device)
        engine_its = report[f"engine_{label}"].get("it_s")
        if engine_its:
            report[f"engine_vs_pipeline_{label}"] = round(engine_its / report[f"pipeline_{label}"]["it_s"], 4)
    unet = loaded_parts_of(engine)[0].unet
    report["unet_dtype"] = str(next(unet.parameters()).dtype).replace("torch.", "")
    report["unet_parameters"] = sum(parameter.numel() for parameter in unet.parameters())
    return report


def gpu_report(dry_run: bool, steps: int, repeats: int, compile_too: bool) -> dict:
    if not dry_run and not torch.cuda.is_available():
        return {"gpu": {"skipped": True, "note": "no CUDA device: the GPU comparison did not run"}}
    device = torch.device("cpu") if dry_run else torch.device("cuda")
    if dry_run:
        steps, repeats, compile_too = 2, 1, False  # compiling on the CPU needs a C++ toolchain and minutes
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dry_run": dry_run,
        "torch": torch.__version__, "cfg": CFG, "repeats": repeats,
        "note": "it/s = steps / sampling time (engine: KSampler node; pipeline: denoising loop, "
                "output_type='latent'); each step is one UNet call on a batch of 2 (CFG); peak VRAM over the "
                "timed repeats"}
    for family in ("sd15", "sdxl"):
        with tempfile.TemporaryDirectory(prefix=f"bench_gpu_{family}_") as temp:
            report[family] = family_report(family, Path(temp), device, dry_run, steps, repeats, compile_too)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"gpu": report}
