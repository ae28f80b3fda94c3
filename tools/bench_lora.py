"""LoRA benchmark: re-run cost after changing only a LoRA strength vs after changing the checkpoint, and peak
memory with stacked LoRAs vs none. Prints one JSON object.

    python tools/bench_lora.py [--widths 128,256,512,512] [--steps 2] [--loras 3] [--repeats 5]

(defaults: a 135M-parameter UNet, a 525 MB checkpoint; about 2-3 minutes and 5 GB of RAM on one CPU thread)

The graph is txt2img (CheckpointLoaderSimple → N × LoraLoader → 2 × CLIPTextEncode → KSampler → VAEDecode) on
random SD1-layout checkpoints written to a temporary models folder (UNet widths from --widths; SD1.5 is
320,640,1280,1280). Figures (medians over --repeats):
  seed_change_s          re-run after changing only the seed: sampling + decoding (the floor; the memory manager
                         keeps the LoRA patch on the UNet between runs, so a warm run patches nothing)
  plain_seed_change_s    the same seed-change re-run of the graph without its LoRA nodes, interleaved with the
                         LoRA runs (it shares the loaded checkpoint, so each switch between the two graphs swaps
                         the patch: the first run after a switch is not counted)
  warm_lora_overhead_s   median per repeat of (warm LoRA seed-change run − plain seed-change run); the target is
                         ≈ 0 (within warm_lora_overhead_noise_s, the same noise formula as the change costs)
  strength_change_s      re-run after changing one LoRA's strength (checkpoint and LoRA files stay loaded:
                         the LoRA nodes, text encoding, sampling and decoding re-run)
  checkpoint_change_s    re-run after switching to a checkpoint file not loaded before (everything re-runs)
  *_change_cost_s        what the change itself costs: the re-run minus the seed-change run of the same repeat
                         (median); preparation_nodes_s times only the nodes before KSampler (the loaders and
                         text encoders), which misses the first sampling call's page faults on fresh weights
  *_change_cost_noise_s  the uncertainty of that median: 3 × 1.25·σ/√repeats, σ the larger of the costs' own
                         spread and √2 × the seed-change runs' spread (both robust: 1.4826 × MAD)
  speedup                checkpoint_change_cost_s / strength_change_cost_s, only when both costs are larger than
                         their noise; otherwise null, and speedup_note says why (a cost inside the noise makes
                         the ratio a ratio of noise). speedup_at_least: the ratio with both costs moved to the
                         pessimistic end of their noise (null when the checkpoint cost itself is not resolved);
                         meets_target compares it with the target (≥ 10). speedup_whole_graph compares the whole
                         re-runs, where sampling (the same in both) dominates on the CPU
  patch_apply_s / patch_restore_s / backup_mb   the stacked LoRAs' patch on the UNet, timed directly
  memory_mb              fresh processes without LoRAs and with N stacked LoRAs (each adapting every
                         attention/resnet layer and the text encoder): RSS polled while sampling (models
                         loaded), and the process peak (reached while loading the checkpoint)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def build_unet(widths: tuple[int, ...], seed: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (len(widths) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(widths) - 1),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
    ).eval()


def write_models(root: Path, widths: tuple[int, ...], loras: int, rank: int) -> int:
    """Two checkpoints (a.safetensors, b.safetensors) and `loras` LoRA files; returns the UNet parameter count."""
    from adapter_support import kohya_lora_for_all, save_safetensors, tiny_objects
    from tiny_models import tiny_components

    from latentloom.nodes.diffusion import convert

    parts = tiny_components("sd1", 0)
    text = parts.text_encoders["l"].state_dict()
    count = 0
    for name, seed in (("a", 0), ("b", 1)):
        unet = build_unet(widths, seed)
        count = sum(p.numel() for p in unet.parameters())
        state = convert.build_single_file(unet.state_dict(), 2, parts.vae.state_dict(),
                                          [(convert.SD1_CLIP_PREFIX, "hf", text)])
        save_safetensors(state, root / "checkpoints" / f"{name}.safetensors")
    model, clip = tiny_objects("sd1", 0)
    model = type(model)(**{**model.__dict__, "unet": build_unet(widths, 0)})
    for index in range(loras):
        save_safetensors(kohya_lora_for_all(model, clip, rank=rank, alpha=rank / 2, seed=10 + index),
                         root / "loras" / f"lora{index}.safetensors")
    return count


def graph(checkpoint: str, loras: int, strengths: list[float], steps: int, size: int, seed: int = 1) -> dict:
    prompt: dict = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    for index in range(loras):
        prompt[f"lora{index}"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": f"lora{index}.safetensors",
            "strength_model": strengths[index], "strength_clip": strengths[index]}}
        model, clip = [f"lora{index}", 0], [f"lora{index}", 1]
    prompt.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a red cube on a table"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewAny", "inputs": {"source": ["decode", 0]}},
    })
    return prompt


TARGET_SPEEDUP = 10.0

# Nodes that make the MODEL and CONDITIONING ready for sampling (everything before KSampler).
PREPARATION = ("ckpt", "lora", "pos", "neg")


def timed_run(engine, prompt: dict, node_times: dict | None = None) -> float:
    """Seconds for the whole run; `node_times` (when given) receives the seconds each executed node took."""
    from latentloom.engine.events import Executing

    starts: list[tuple[str | None, float]] = []

    def listen(event) -> None:
        if isinstance(event, Executing):
            starts.append((event.node, time.perf_counter()))

    start = time.perf_counter()
    result = engine.run(prompt, listener=listen)
    end = time.perf_counter()
    if not getattr(result, "ok", False):
        raise RuntimeError(f"benchmark graph failed: {getattr(result, 'error', None) or result}")
    if node_times is not None:
        for (node, began), (_, following) in zip(starts, starts[1:] + [(None, end)], strict=False):
            if node is not None:
                node_times[node] = node_times.get(node, 0.0) + following - began
    return end - start


def preparation_seconds(node_times: dict) -> float:
    return sum(t for node, t in node_times.items() if node.startswith(PREPARATION))


def robust_sigma(values: list[float]) -> float:
    """A standard deviation estimate that one outlier run (a page-fault storm, a busy neighbour) cannot inflate."""
    median = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - median) for v in values)


def change_cost(change_times: list[float], floor_times: list[float]) -> tuple[float, float | None]:
    """Median extra seconds of a change over the seed-change run of the same repeat, and its noise (None when
    fewer than 3 repeats leave no spread to estimate it from)."""
    costs = [t - f for t, f in zip(change_times, floor_times, strict=True)]
    median = statistics.median(costs)
    if len(costs) < 3:
        return median, None
    sigma = max(robust_sigma(costs), 2 ** 0.5 * robust_sigma(floor_times))
    return median, 3 * 1.253 * sigma / len(costs) ** 0.5  # 1.253σ/√n: the standard error of a median


def speedup_figures(checkpoint: tuple[float, float | None], strength: tuple[float, float | None],
                    target: float) -> dict:
    """The checkpoint/strength cost ratio, reported only when both costs stand out of the noise."""
    (checkpoint_cost, checkpoint_noise), (strength_cost, strength_noise) = checkpoint, strength
    figures: dict = {"strength_change_cost_noise_s": None if strength_noise is None else round(strength_noise, 4),
                     "checkpoint_change_cost_noise_s": None if checkpoint_noise is None
                     else round(checkpoint_noise, 4),
                     "speedup": None, "speedup_at_least": None, "speedup_note": None}
    if checkpoint_noise is None or strength_noise is None:
        figures["speedup_note"] = "fewer than 3 repeats: no spread to tell the costs from noise (use --repeats 5)"
    elif checkpoint_cost <= checkpoint_noise:
        figures["speedup_note"] = (f"the checkpoint change cost ({checkpoint_cost:.4f} s) is within the noise "
                                   f"(±{checkpoint_noise:.4f} s): no ratio")
    else:
        pessimistic_strength = max(strength_cost + strength_noise, 1e-4)
        figures["speedup_at_least"] = round((checkpoint_cost - checkpoint_noise) / pessimistic_strength, 2)
        if strength_cost > strength_noise:
            figures["speedup"] = round(checkpoint_cost / strength_cost, 2)
        else:
            figures["speedup_note"] = (f"the strength change cost ({strength_cost:.4f} s) is within the noise "
                                       f"(±{strength_noise:.4f} s): a ratio would be noise; speedup_at_least "
                                       f"bounds it with the strength cost at the top of the noise")
    figures["meets_target"] = figures["speedup_at_least"] is not None and figures["speedup_at_least"] >= target
    return figures


def measure_rerun(root: Path, args: argparse.Namespace) -> dict:
    from latentloom.nodes import create_engine

    engine = create_engine(models_dir=root, entry_points=False)
    strengths = [0.8] * args.loras

    preparation: dict[str, list[float]] = {"strength": [], "checkpoint": []}

    def run(checkpoint: str, seed: int = 1, change: str | None = None) -> float:
        node_times: dict[str, float] = {}
        seconds = timed_run(engine, graph(checkpoint, args.loras, strengths, args.steps, args.size, seed),
                            node_times)
        if change is not None:
            preparation[change].append(preparation_seconds(node_times))
        return seconds

    def run_plain(seed: int) -> float:
        return timed_run(engine, graph("a.safetensors", 0, [], args.steps, args.size, seed))

    first = run("a.safetensors")
    unchanged = run("a.safetensors")
    floor_times, strength_times, checkpoint_times, plain_times = [], [], [], []
    for repeat in range(args.repeats):
        # Plain graph, warm (the first run after the switch pays the patch swap and is not counted).
        run_plain(200 + repeat)
        plain_times.append(run_plain(300 + repeat))
        run("a.safetensors", seed=400 + repeat)  # back to the LoRA graph: swaps the patch in
        # The floor: only the seed changes, so only sampling and decoding re-run.
        floor_times.append(run("a.safetensors", seed=100 + repeat))
        if strengths:
            strengths[0] = 0.5 + 0.1 * repeat
        strength_times.append(run("a.safetensors", seed=100 + repeat, change="strength"))
        # A checkpoint file never loaded before (a copy under a new name), so the loader really reads and builds.
        name = f"switch{repeat}.safetensors"
        shutil.copyfile(root / "checkpoints" / ("b.safetensors" if repeat % 2 == 0 else "a.safetensors"),
                        root / "checkpoints" / name)
        checkpoint_times.append(run(name, seed=100 + repeat, change="checkpoint"))
    floor = statistics.median(floor_times)
    strength_s, checkpoint_s = statistics.median(strength_times), statistics.median(checkpoint_times)
    # What each change costs on top of the floor, per repeat (the three runs of a repeat are back to back).
    strength = change_cost(strength_times, floor_times)
    overhead = change_cost(floor_times, plain_times)
    checkpoint = change_cost(checkpoint_times, floor_times)
    return {"first_run_s": round(first, 4), "unchanged_rerun_s": round(unchanged, 4),
            "seed_change_s": round(floor, 4),
            "plain_seed_change_s": round(statistics.median(plain_times), 4),
            "warm_lora_overhead_s": round(overhead[0], 4),
            "warm_lora_overhead_noise_s": None if overhead[1] is None else round(overhead[1], 4),
            "strength_change_s": round(strength_s, 4), "checkpoint_change_s": round(checkpoint_s, 4),
            "speedup_whole_graph": round(checkpoint_s / strength_s, 2),
            "strength_change_cost_s": round(strength[0], 4), "checkpoint_change_cost_s": round(checkpoint[0], 4),
            "target_speedup": TARGET_SPEEDUP, **speedup_figures(checkpoint, strength, TARGET_SPEEDUP),
            "preparation_nodes_s": {change: round(statistics.median(times), 4)
                                    for change, times in preparation.items()},
            "runs_s": {"seed_change": [round(t, 4) for t in floor_times],
                       "plain_seed_change": [round(t, 4) for t in plain_times],
                       "strength_change": [round(t, 4) for t in strength_times],
                       "checkpoint_change": [round(t, 4) for t in checkpoint_times]},
            "memory_manager_loads": engine.env.models.stats().loads}


def measure_patch(root: Path, loras: int) -> dict:
    """Applying and restoring the stacked LoRAs' patch on the UNet, timed directly."""
    from node_context import StubContext, make_env

    from latentloom.nodes.diffusion.checkpoint import load_checkpoint
    from latentloom.nodes.lora import LoraLoader

    env = make_env(models_dir=root)
    loaded = load_checkpoint(root / "checkpoints" / "a.safetensors")
    model, clip = loaded.model, loaded.clip
    for index in range(loras):
        model, clip = LoraLoader.model_construct(model=model, clip=clip, lora_name=f"lora{index}.safetensors",
                                                 strength_model=0.8, strength_clip=0.8).run(StubContext(env))
    if not model.patches:
        return {}
    patch = model.patches[-1]
    timings = []
    for _ in range(3):  # the first apply also pays for fresh allocations (page faults)
        start = time.perf_counter()
        restore = patch.apply(model.unet)
        applied = time.perf_counter()
        restore()
        timings.append((applied - start, time.perf_counter() - applied))
    weights = patch.parameters()
    backup_bytes = sum(model.unet.get_parameter(name).numel() * 4 for name in weights)
    return {"patch_apply_s": [round(a, 4) for a, _ in timings], "patch_restore_s": [round(r, 4) for _, r in timings],
            "patched_weights": len(weights), "backup_mb": round(backup_bytes / 2**20, 1)}


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_peak(root: Path, loras: int, steps: int, size: int) -> dict:
    """Run in a fresh process: the graph once with `loras` stacked LoRAs (loading everything), then again with a
    new seed while RSS is polled: the memory sampling needs on top of the loaded models."""
    from latentloom.nodes import create_engine

    engine = create_engine(models_dir=root, entry_points=False)
    timed_run(engine, graph("a.safetensors", loras, [0.8] * loras, steps, size))
    before = rss_mb()
    peak = [before]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        timed_run(engine, graph("a.safetensors", loras, [0.8] * loras, steps, size, seed=2))
    finally:
        done.set()
        poller.join()
    return {"loras": loras, "rss_before_sampling_mb": round(before, 1),
            "peak_while_sampling_mb": round(peak[0], 1),
            "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def peak_in_subprocess(root: Path, loras: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child-peak", str(loras), "--root", str(root), "--steps",
               str(args.steps), "--size", str(args.size), "--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe with {loras} LoRAs failed:\n{completed.stderr[-4000:]}")
    output = completed.stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="128,256,512,512", help="UNet block widths (SD1.5: 320,640,1280,1280)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--loras", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child-peak", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_peak is not None:
        print(json.dumps(child_peak(Path(args.root), args.child_peak, args.steps, args.size)))
        return
    widths = tuple(int(w) for w in args.widths.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as folder:
        root = Path(folder)
        parameters = write_models(root, widths, args.loras, args.rank)
        lora_bytes = sum(p.stat().st_size for p in (root / "loras").iterdir()) if args.loras else 0
        checkpoint_bytes = (root / "checkpoints" / "a.safetensors").stat().st_size
        rerun = measure_rerun(root, args)
        patch = measure_patch(root, args.loras)
        without = peak_in_subprocess(root, 0, args)
        stacked = peak_in_subprocess(root, args.loras, args)
    print(json.dumps({
        "config": {"unet_widths": widths, "unet_parameters": parameters,
                   "checkpoint_mb": round(checkpoint_bytes / 2**20, 1), "loras": args.loras, "rank": args.rank,
                   "lora_files_mb": round(lora_bytes / 2**20, 1), "steps": args.steps, "image_size": args.size,
                   "threads": args.threads,
                   "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()},
        **rerun,
        **patch,
        "memory_mb": {"no_lora": without, f"{args.loras}_loras": stacked,
                      "sampling_peak_difference": round(stacked["peak_while_sampling_mb"]
                                                        - without["peak_while_sampling_mb"], 1),
                      "process_peak_difference": round(stacked["process_peak_rss_mb"]
                                                       - without["process_peak_rss_mb"], 1)},
    }, indent=2))


if __name__ == "__main__":
    main()
