"""Scale-out benchmark: the same prompts on a Ray pool of 1 and of 2 workers (one torch thread each), and in local
mode for reference.

    .venv/bin/python tools/bench_scaleout.py [--prompts 40] [--steps 8] [--out bench.json]

The prompt is a real txt2img graph (CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler euler -> VAEDecode ->
SaveImage) on a tiny random SD1 checkpoint at 64x64, a different seed each, built by the real `nodes:create_engine`
in every actor; the images come back to the server's output folder. Prompts go straight into the SQLite queue
(no HTTP) and every worker is warmed up (model loaded) before the clock starts. Reported (JSON on stdout):
per setup the wall time, prompts per second, submit -> finished latency p50/p99, the lost and duplicate outputs;
the 2-vs-1 throughput ratio; and the dispatch cost per prompt: the server-side time around the actor's own run
(Ray call, event stream, file commit, history write) and the round trip of a trivial one-node prompt sent alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TXT2IMG = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 0, "steps": 8, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["8", 0]}},
}
TRIVIAL = {"1": {"class_type": "StringConcatenate", "inputs": {"string_a": "a", "string_b": "b", "delimiter": " "}},
           "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def txt2img(seed: int, steps: int) -> dict:
    graph = copy.deepcopy(TXT2IMG)
    graph["3"]["inputs"].update(seed=seed, steps=steps)
    return graph


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ms(value: float) -> float:
    return round(value * 1000, 1)


class Setup:
    """A queue store, a hub with no clients, and a worker (the local thread or a Ray pool) over one root."""

    def __init__(self, root: Path, workers: int | None):
        from latentloom.nodes import create_engine
        from latentloom.server.queue_store import QueueStore
        from latentloom.server.worker import Worker
        from latentloom.server.ws import Hub

        self.root = root
        self.paths = {"models_dir": str(root / "models"), "input_dir": str(root / "input"),
                      "output_dir": str(root / f"output-{workers or 'local'}"), "temp_dir": str(root / "temp")}
        self.engine = create_engine(**self.paths)
        self.store = QueueStore(root / f"queue-{workers or 'local'}.db")
        hub = Hub(self.store, {})
        if workers is None:
            self.worker = Worker(self.engine, self.store, hub)
        else:
            from latentloom.server.dispatch import PoolOptions, RayWorkerPool
            from latentloom.server.ray_pool import EngineFactory

            options = PoolOptions(EngineFactory("latentloom.nodes:create_engine", self.paths), num_workers=workers)
            self.worker = RayWorkerPool(self.engine, self.store, hub, options)
        self.worker.start()
        if workers is not None:
            deadline = time.monotonic() + 120
            while sum(w["state"] == "idle" for w in self.worker.workers()) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers did not start: {self.worker.workers()}")
                time.sleep(0.05)

    def submit(self, graph: dict) -> str:
        from latentloom.server.queue_store import QueueItem

        item = QueueItem(self.store.next_number(False), str(uuid.uuid4()), graph, {}, [])
        self.store.put(item)
        self.worker.wake()
        return item.prompt_id

    def wait(self, prompt_ids: list[str], timeout: float = 600) -> list[dict]:
        """History records of the prompts, in order. Times come from the records (created, finished), so polling
        one prompt at a time, gently, costs the workers no CPU and the figures no precision."""
        deadline = time.monotonic() + timeout
        records: list[dict] = []
        while len(records) < len(prompt_ids):
            record = self.store.history_record(prompt_ids[len(records)])
            if record is not None:
                records.append(record)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(prompt_ids) - len(records)} prompts did not finish")
            time.sleep(0.05)
        return records

    def close(self) -> None:
        self.worker.stop()
        self.store.close()


def measure(setup: Setup, prompts: int, steps: int, warmups: int) -> dict:
    setup.wait([setup.submit(txt2img(10_000 + i, steps)) for i in range(warmups)])
    timings_before = len(getattr(setup.worker, "timings", []))
    output = Path(setup.paths["output_dir"])
    files_before = len(list(output.iterdir()))
    started, cpu_started = time.time(), time.process_time()
    ids = [setup.submit(txt2img(seed, steps)) for seed in range(prompts)]
    records = setup.wait(ids)
    server_cpu = time.process_time() - cpu_started   # this process: the server side (and, locally, the runs)
    wall = max(r["finished"] for r in records) - started
    latencies = [r["finished"] - r["created"] for r in records]
    result = {
        "seconds": round(wall, 2), "prompts_per_second": round(prompts / wall, 3),
        "latency_ms": {"p50": ms(percentile(latencies, 0.5)), "p99": ms(percentile(latencies, 0.99))},
        "lost": sum(r["status"] != "completed" for r in records),
        "files": len(list(output.iterdir())) - files_before,
        "server_process_cpu_ms_per_prompt": ms(server_cpu / prompts),
    }
    timings = list(getattr(setup.worker, "timings", []))[timings_before:]
    if timings:
        result["run_ms_p50"] = ms(statistics.median(t["run"] for t in timings))
        # CPU time of the run's thread: when well below run_ms, the worker was waiting for a core.
        result["run_cpu_ms_p50"] = ms(statistics.median(t["cpu"] for t in timings))
        result["dispatch_overhead_ms"] = {"p50": ms(percentile([t["dispatch"] for t in timings], 0.5)),
                                          "p99": ms(percentile([t["dispatch"] for t in timings], 0.99))}
        result["prompts_per_worker"] = {w: sum(t["worker"] == w for t in timings)
                                        for w in sorted({t["worker"] for t in timings})}
    return result


def trivial_round_trip(setup: Setup, count: int = 20) -> float:
    """Median submit -> finished time of a one-node prompt sent alone (the queue empty, the worker idle)."""
    times = []
    for _ in range(count):
        prompt_id = setup.submit(copy.deepcopy(TRIVIAL))
        record = setup.wait([prompt_id])[0]
        times.append(record["finished"] - record["created"])
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import ray
    import torch
    from tiny_models import write_tiny_checkpoint

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    write_tiny_checkpoint(root / "models" / "checkpoints" / "sd1.safetensors", family="sd1", seed=0)
    load_before = os.getloadavg()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    runs: dict[str, dict] = {}
    trivial: dict[str, float] = {}
    try:
        for name, workers in (("ray_1_worker", 1), ("ray_2_workers", 2), ("local", None)):
            setup = Setup(root, workers)
            try:
                runs[name] = measure(setup, args.prompts, args.steps, warmups=2 * (workers or 1))
                trivial[name] = trivial_round_trip(setup)
            finally:
                setup.close()
    finally:
        ray.shutdown()
    ratio = runs["ray_2_workers"]["prompts_per_second"] / runs["ray_1_worker"]["prompts_per_second"]
    report = {
        "machine": {"cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "graph": f"tiny SD1 txt2img 64x64, {args.steps} euler steps, SaveImage; {args.prompts} prompts, new seeds",
        "runs": runs,
        "throughput_ratio_2_vs_1": round(ratio, 3),
        "dispatch": {
            "overhead_per_prompt_ms_p50": runs["ray_2_workers"]["dispatch_overhead_ms"]["p50"],
            "trivial_prompt_round_trip_ms": {name: ms(value) for name, value in trivial.items()},
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
