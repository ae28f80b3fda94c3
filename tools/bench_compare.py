"""Start-up, first-image, warm-image and memory figures of the engine, and the prepared GPU comparison. Prints one
JSON object.

    python tools/bench_compare.py [--graphs txt2img,hires-fix] [--repeats 3] [--threads 1] [--prompts 100]
                                  [--graphs-dir DIR --models-dir DIR]   # other graphs / checkpoints
    python tools/bench_compare.py --gpu [--gpu-steps 20] [--gpu-repeats 3] [--no-compile]
    python tools/bench_compare.py --gpu-dry-run          # the GPU code path on the CPU, networks shrunk

CPU part, on the bundled toy model and the API graphs of graphs/ (one torch thread by default, as ComfyUI was
measured; every timed process is a fresh one):
  cold       `latentloom run GRAPH` as a new process, process start to PNG (wall and CPU seconds, medians).
  serve      `latentloom serve` as a new process: seconds until it answers (the engine built and the model code
             imported), then the first image over HTTP and warm images (new seeds: loaders and prompts cached,
             sampling, decoding and saving run again): execution time from the server's own history timestamps
             (execution_start to execution_success), and the round trip POST /prompt to history entry.
             `first_over_warm` is the first image's time over the median warm one (target <= 1.5).
  in_process one Python process without the server: import, engine, first image, warm images (CPU seconds too,
             steadier on a loaded machine).
  memory     --prompts distinct prompts (new text and seed each) through one engine, with the default cache
             budget and with a budget the outputs fill by prompt 10; and through the server's worker (RSS of the
             serve process). Growth is RSS after all prompts against after 10 (target <= 0.5 %); the output
             cache's own growth is reported next to it, since with the default 2 GiB budget the cache is meant
             to keep outputs (growth minus cache growth is what the engine would leak).
GPU part (--gpu, only where CUDA is available; otherwise a JSON note): SD1.5-size and SDXL-size random weights
(fp16, single-file checkpoints, no download), 20 steps at 512² / 1024²: the engine's KSampler against diffusers'
pipeline built from the very modules the engine loaded, in it/s and peak VRAM, without and with torch.compile
of the UNet (the engine's compile through a TorchCompileModel node when the registry has one).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEFAULT_GRAPHS = "txt2img,hires-fix"
FIRST_OVER_WARM_TARGET = 1.5
GROWTH_TARGET = 0.005


def median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


# --graphs-dir / --models-dir reach the timed child processes through their environment.
GRAPHS_DIR_VARIABLE = "BENCH_COMPARE_GRAPHS_DIR"
MODELS_DIR_VARIABLE = "BENCH_COMPARE_MODELS_DIR"


def models_dir() -> str | None:
    """The models folder of every timed process (None: the bundled toy model)."""
    return os.environ.get(MODELS_DIR_VARIABLE)


def models_flags() -> list[str]:
    folder = models_dir()
    return ["--models-dir", folder] if folder else []


def load_graph(name: str, steps: int | None) -> dict:
    folder = Path(os.environ.get(GRAPHS_DIR_VARIABLE) or ROOT / "graphs")
    graph = json.loads((folder / f"{name}.json").read_text())
    if steps is not None:
        for node in graph.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = steps
    return graph


def varied(graph: dict, number: int, new_text: bool = False) -> dict:
    """The graph with every KSampler's seed set from `number` (and, with new_text, the first prompt's text made
    unique): a new image that reuses the loaded models."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = 1000 + number
    if new_text:
        encoder = next(node for node in graph.values() if node["class_type"] == "CLIPTextEncode")
        encoder["inputs"]["text"] = f"{encoder['inputs']['text']}, variation {number} of many"
    return graph


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def rss_of(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- cold: `latentloom run` as a new process -----------------------------------------------------------------

def bench_cold(name: str, graph: dict, repeats: int, threads: int, work: Path) -> dict:
    path = work / f"cold_{name}.json"
    path.write_text(json.dumps(graph))
    wall, cpu = [], []
    for repeat in range(repeats):
        out = work / f"cold_out_{name}_{repeat}"
        command = [sys.executable, "-m", "latentloom.server.cli", "run", str(path), "--output-dir", str(out),
                   "--input-dir", str(ROOT / "input"), "--json", "--no-progress", *models_flags()]
        cpu_before, started = children_cpu(), time.perf_counter()
        done = subprocess.run(command, env=child_env(threads), capture_output=True, text=True, cwd=work)
        wall.append(time.perf_counter() - started)
        cpu.append(children_cpu() - cpu_before)
        if done.returncode != 0 or not list(out.glob("*.png")):
            raise RuntimeError(f"latentloom run {name} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"run_s": median(wall), "run_cpu_s": median(cpu), "runs_s": [round(x, 3) for x in wall]}


# The imports an SD1 graph cannot avoid while its networks are diffusers' and transformers' classes: the UNet and
# VAE modules pull in diffusers' loader mixins and torch._dynamo, CLIP pulls in transformers' modeling utilities.
IMPORT_FLOOR = {
    "torch": "import torch",
    "model_classes": "import torch; import diffusers.models.unets.unet_2d_condition, "
                     "diffusers.models.autoencoders.autoencoder_kl, transformers.models.clip.modeling_clip",
}


def bench_import_floor(repeats: int, threads: int) -> dict:
    """Process start to the end of the imports above, each in a fresh process (medians): what `latentloom run`
    pays before any code of ours runs."""
    figures: dict[str, float] = {}
    for label, code in IMPORT_FLOOR.items():
        wall = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=child_env(threads), check=True)
            wall.append(time.perf_counter() - started)
        figures[f"{label}_s"] = median(wall)
    return figures


# --- in one process, without the server ----------------------------------------------------------------------

def child_first_image(name: str, steps: int | None, repeats: int, threads: int, prepare: bool) -> dict:
    """Runs inside a fresh process (--child): the figures of one process's first and warm images."""
    clock = time.perf_counter
    started, cpu_started = clock(), time.process_time()
    import torch

    torch.set_num_threads(threads)
    from latentloom.nodes import create_engine

    imported = clock()
    with tempfile.TemporaryDirectory(prefix="bench_compare_child_") as temp:
        work = Path(temp)
        engine = create_engine(output_dir=work / "output", input_dir=ROOT / "input", temp_dir=work / "temp",
                               models_dir=models_dir())
        return first_and_warm_images(engine, name, steps, repeats, prepare, started, cpu_started, imported)


def first_and_warm_images(engine: Any, name: str, steps: int | None, repeats: int, prepare: bool, started: float,
                          cpu_started: float, imported: float) -> dict:
    clock = time.perf_counter
    created = clock()
    if prepare:
        from latentloom.nodes.diffusion.model_code import prepare as prepare_model_code

        prepare_model_code()
    prepared = clock()
    graph = load_graph(name, steps)
    times, cpu = [], []
    for number in range(repeats + 1):
        begin, begin_cpu = clock(), time.process_time()
        result = engine.run(varied(graph, number))
        times.append(clock() - begin)
        cpu.append(time.process_time() - begin_cpu)
        if result.status != "success":
            raise RuntimeError(f"{name}: {result.error}")
    warm, warm_cpu = statistics.median(times[1:]), statistics.median(cpu[1:])
    return {"import_s": round(imported - started, 3), "engine_s": round(created - imported, 3),
            "prepare_s": round(prepared - created, 3), "first_s": round(times[0], 4), "warm_s": round(warm, 4),
            "first_cpu_s": round(cpu[0], 4), "warm_cpu_s": round(warm_cpu, 4),
            "first_over_warm": round(times[0] / warm, 3), "first_over_warm_cpu": round(cpu[0] / warm_cpu, 3),
            "start_to_first_image_s": round(clock() - started - sum(times[1:]), 3),
            "process_cpu_s": round(time.process_time() - cpu_started, 3)}


def bench_in_process(name: str, steps: int | None, repeats: int, threads: int, prepare: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--repeats", str(repeats),
               "--threads", str(threads)] + (["--steps", str(steps)] if steps else []) + \
        (["--prepare"] if prepare else [])
    done = subprocess.run(command, env=child_env(threads), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"in-process figures of {name} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- serve: the real server in a new process -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_json(url: str, payload: dict | None = None, timeout: float = 5.0) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def submit_and_wait(base: str, graph: dict, timeout: float = 600.0) -> tuple[float, float]:
    """(seconds from POST /prompt to its history entry, seconds from the server's execution_start to its
    execution_success). History is polled every 50 ms: faster polling takes the GIL from the worker it times."""
    started = time.perf_counter()
    prompt_id = http_json(base + "prompt", {"prompt": graph, "client_id": "bench"})["prompt_id"]
    while time.perf_counter() - started < timeout:
        entry = http_json(f"{base}history/{prompt_id}").get(prompt_id)
        if entry:
            round_trip = time.perf_counter() - started
            if not entry["status"]["completed"]:
                raise RuntimeError(f"prompt failed on the server: {entry['status']['messages'][-1:]}")
            stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
            return round_trip, (stamps["execution_success"] - stamps["execution_start"]) / 1000
        time.sleep(0.05)
    raise TimeoutError("the server did not finish the prompt")


def bench_serve(name: str, graph: dict, repeats: int, threads: int, work: Path, prompts: int = 0,
                cache_bytes: int | None = None) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    command = [sys.executable, "-m", "latentloom.server.cli", "serve", "--port", str(port),
               "--database", str(work / f"serve_{name}.db"), "--user-dir", str(work / "user"),
               "--output-dir", str(work / f"serve_out_{name}"), "--input-dir", str(ROOT / "input"),
               "--temp-dir", str(work / "temp"), *models_flags()] + \
        (["--cache-bytes", str(cache_bytes)] if cache_bytes else [])
    started = time.perf_counter()
    server = subprocess.Popen(command, env=child_env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              cwd=work)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            try:
                http_json(base + "system_stats", timeout=60)
                break
            except OSError:
                time.sleep(0.05)
        ready = time.perf_counter() - started
        first, first_executed = submit_and_wait(base, varied(graph, 0))
        warm = [submit_and_wait(base, varied(graph, number)) for number in range(1, repeats + 1)]
        warm_executed = statistics.median(executed for _, executed in warm)
        report: dict[str, Any] = {
            "ready_s": round(ready, 3), "first_s": round(first_executed, 4), "warm_s": round(warm_executed, 4),
            "first_over_warm": round(first_executed / warm_executed, 3),
            "first_round_trip_s": round(first, 4), "warm_round_trip_s": median([trip for trip, _ in warm]),
            "start_to_first_image_s": round(ready + first, 3)}
        if prompts:
            rss: dict[int, int] = {}
            for number in range(1, prompts + 1):
                submit_and_wait(base, varied(graph, 10_000 + number, new_text=True))
                if number in (10, prompts):
                    rss[number] = rss_of(server.pid)
            report["memory"] = {**growth_report(rss, prompts), "cache_budget": cache_bytes or "default"}
        return report
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- memory through one engine -------------------------------------------------------------------------------

def growth_report(rss: dict[int, int], prompts: int, cache: dict[int, int] | None = None) -> dict:
    growth = (rss[prompts] - rss[10]) / rss[10]
    report: dict[str, Any] = {
        "prompts": prompts, "rss_after_10_mb": round(rss[10] / 2**20, 2),
        f"rss_after_{prompts}_mb": round(rss[prompts] / 2**20, 2), "rss_growth": round(growth, 5),
        "target_growth": GROWTH_TARGET}
    if cache is not None:
        cache_growth = cache[prompts] - cache[10]
        report["cache_growth_mb"] = round(cache_growth / 2**20, 3)
        report["rss_growth_less_cache"] = round((rss[prompts] - rss[10] - cache_growth) / rss[10], 5)
    return report


def bench_memory(name: str, graph: dict, prompts: int, threads: int, cache_bytes: int | None) -> dict:

    import torch

    from latentloom.nodes import create_engine

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench_compare_memory_") as temp:
        work = Path(temp)
        engine = create_engine(output_dir=work / "output", input_dir=ROOT / "input", temp_dir=work / "temp",
                               cache_bytes=cache_bytes, models_dir=models_dir())
        return memory_growth(engine, name, graph, prompts)


def memory_growth(engine: Any, name: str, graph: dict, prompts: int) -> dict:
    import gc

    rss: dict[int, int] = {}
    cache: dict[int, int] = {}
    for number in range(1, prompts + 1):
        result = engine.run(varied(graph, number, new_text=True))
        if result.status != "success":
            raise RuntimeError(f"{name}: {result.error}")
        if number in (10, prompts):
            gc.collect()
            rss[number], cache[number] = rss_of(), engine.cache.stats().bytes
    stats = engine.cache.stats()
    report = growth_report(rss, prompts, cache)
    report.update({"cache_bytes": stats.bytes, "cache_budget": stats.budget, "cache_entries": stats.entries,
                   "cache_evictions": stats.evictions, "cache_within_budget": stats.bytes <= stats.budget})
    return report


# --- main ----------------------------------------------------------------------------------------------------

PLAIN_GRAPH = "txt2img"  # lora.json and controlnet.json are txt2img with a LoraLoader / ControlNet added
PLAIN_TARGET = 1.05


def add_plain_graph_ratios(graphs: dict[str, dict]) -> None:
    """Each graph's cold run and first image over txt2img's (the LoRA / ControlNet file reads included), when
    txt2img was measured too: the target for lora and controlnet is <= 1.05."""
    plain = graphs.get(PLAIN_GRAPH)
    if plain is None:
        return
    for name, figures in graphs.items():
        if name == PLAIN_GRAPH:
            continue
        ratios = figures["ratios"]
        if "cold" in figures and "cold" in plain:
            ratios["cold_over_plain_cold"] = round(figures["cold"]["run_s"] / plain["cold"]["run_s"], 3)
        ratios["first_over_plain_first"] = round(
            figures["in_process_prepared"]["first_s"] / plain["in_process_prepared"]["first_s"], 3)
        ratios["target_over_plain"] = PLAIN_TARGET


def cpu_report(args: argparse.Namespace) -> dict:
    report: dict[str, Any] = {"threads": args.threads, "load_average_before": list(os.getloadavg()), "graphs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_compare_") as temp:
        work = Path(temp)
        for name in args.graphs.split(","):
            graph = load_graph(name, args.steps)
            figures: dict[str, Any] = {}
            if not args.skip_cold:
                figures["cold"] = bench_cold(name, graph, args.repeats, args.threads, work)
                if "import_floor" not in report:
                    report["import_floor"] = bench_import_floor(args.repeats, args.threads)
            figures["in_process"] = bench_in_process(name, args.steps, args.repeats, args.threads, prepare=False)
            figures["in_process_prepared"] = bench_in_process(name, args.steps, args.repeats, args.threads,
                                                              prepare=True)
            if not args.skip_serve:
                figures["serve"] = bench_serve(name, graph, args.repeats, args.threads, work)
            warm = figures["in_process"]["warm_s"]
            figures["ratios"] = {
                "serve_first_over_warm": figures.get("serve", {}).get("first_over_warm"),
                "in_process_first_over_warm": figures["in_process"]["first_over_warm"],
                "prepared_first_over_warm": figures["in_process_prepared"]["first_over_warm"],
                "cold_run_over_warm": round(figures["cold"]["run_s"] / warm, 2) if "cold" in figures else None,
                "target_first_over_warm": FIRST_OVER_WARM_TARGET,
            }
            report["graphs"][name] = figures
        add_plain_graph_ratios(report["graphs"])
        if not args.skip_memory:
            graph = load_graph(args.memory_graph, args.memory_steps)
            report["memory"] = {
                "graph": args.memory_graph, "steps": args.memory_steps,
                "default_cache": bench_memory(args.memory_graph, graph, args.prompts, args.threads, None),
                "small_cache": bench_memory(args.memory_graph, graph, args.prompts, args.threads, args.small_cache),
            }
            if not args.skip_serve:  # the server's worker path: the same prompts over HTTP, RSS of its process
                for label, budget in (("serve_default_cache", None), ("serve_small_cache", args.small_cache)):
                    report["memory"][label] = bench_serve(args.memory_graph, graph, 1, args.threads, work,
                                                          args.prompts, budget)["memory"]
    report["load_average_after"] = list(os.getloadavg())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", default=DEFAULT_GRAPHS, help="comma-separated names of graphs/*.json")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs, and warm images after the first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every timed process")
    parser.add_argument("--steps", type=int, help="override the graphs' KSampler steps (for quick checks)")
    parser.add_argument("--prompts", type=int, default=100, help="distinct prompts for the memory figures")
    parser.add_argument("--memory-graph", default="txt2img")
    parser.add_argument("--graphs-dir", help="folder of the API graphs (default: graphs/)")
    parser.add_argument("--models-dir", help="models folder in ComfyUI's layout (default: the bundled toy model)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--small-cache", type=int, default=1 << 18, help="bytes: a budget full by prompt 10")
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="the SD1.5/SDXL-size GPU comparison (needs CUDA)")
    parser.add_argument("--gpu-dry-run", action="store_true", help="the GPU comparison's code on the CPU, shrunk")
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="GPU: leave out the torch.compile figures")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for variable, folder in ((GRAPHS_DIR_VARIABLE, args.graphs_dir), (MODELS_DIR_VARIABLE, args.models_dir)):
        if folder:
            os.environ[variable] = str(Path(folder).resolve())
    if args.prompts < 10:
        parser.error("--prompts must be at least 10 (memory compares RSS after 10 prompts with after all)")
    if args.child:
        print(json.dumps(child_first_image(args.child, args.steps, args.repeats, args.threads, args.prepare)))
        return 0
    if args.gpu or args.gpu_dry_run:
        import torch
        from bench_gpu_compare import gpu_report

        if args.gpu_dry_run:
            torch.set_num_threads(args.threads)

        report = gpu_report(dry_run=args.gpu_dry_run, steps=args.gpu_steps, repeats=args.gpu_repeats,
                            compile_too=not args.no_compile)
    else:
        report = cpu_report(args)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
