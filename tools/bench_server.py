"""Server benchmark: N prompts of a tiny graph from C websocket clients against a real server process.

    .venv/bin/python tools/bench_server.py [--prompts 1000] [--clients 20] [--out bench.json]

The server runs in a subprocess (so the clients do not share its GIL) with the model-free utility nodes. Each
client connects to /ws, submits its share of prompts one after another without waiting, and reads events until
every one of its prompts has sent `executing {node: null}`. Reported (JSON on stdout): prompts done / lost, the
submit -> execution_start latency p50/p99 (ms) and prompts per second over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tiny_graph(index: int) -> dict:
    return {"1": {"class_type": "StringConcatenate", "inputs": {"string_a": f"prompt {index}", "string_b": "x",
                                                                "delimiter": " "}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


def serve(port: int, root: Path) -> None:
    import uvicorn

    from latentloom.engine.api import Engine
    from latentloom.engine.environment import Environment
    from latentloom.engine.registry import NodeRegistry
    from latentloom.nodes import utility
    from latentloom.server.app import create_app
    from latentloom.server.state import ServerConfig

    env = Environment.create(input_dir=root / "input", output_dir=root / "output", temp_dir=root / "temp")
    engine = Engine(NodeRegistry(utility.NODES), env)
    app = create_app(engine, ServerConfig(user_dir=root / "user", port=port))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio",
                ws_per_message_deflate=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), to tell server cost from client cost."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def run_clients(base: str, prompts: int, clients: int) -> dict:
    import httpx
    from websockets.asyncio.client import connect

    submitted: dict[str, float] = {}
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    shares = [prompts // clients + (1 if i < prompts % clients else 0) for i in range(clients)]

    async def client(index: int, count: int, http) -> None:
        client_id = f"bench-{index}-{uuid.uuid4().hex[:6]}"
        ws = await connect(base.replace("http://", "ws://") + f"/ws?clientId={client_id}", max_size=None)
        mine = [str(uuid.uuid4()) for _ in range(count)]

        async def reader() -> None:
            remaining = set(mine)
            while remaining:
                raw = await ws.recv()
                if isinstance(raw, bytes):
                    continue
                message = json.loads(raw)
                data = message.get("data", {})
                prompt_id = data.get("prompt_id")
                if prompt_id is not None and prompt_id not in submitted:
                    raise AssertionError(f"{client_id} got an event for an unknown prompt")
                if message["type"] == "execution_start":
                    started[prompt_id] = time.perf_counter()
                elif message["type"] == "executing" and data.get("node") is None and prompt_id in remaining:
                    remaining.discard(prompt_id)
                    done[prompt_id] = time.perf_counter()

        reading = asyncio.create_task(reader())
        for n, prompt_id in enumerate(mine):
            submitted[prompt_id] = time.perf_counter()
            response = await http.post("/prompt", json={"prompt": tiny_graph(index * 100000 + n),
                                                        "client_id": client_id, "prompt_id": prompt_id})
            response.raise_for_status()
        await asyncio.wait_for(reading, timeout=600)
        await ws.close()

    began = time.perf_counter()
    # No Nagle: httpx writes headers and body separately, and Nagle + delayed ACK would stall each request ~40 ms.
    transport = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(base_url=base, timeout=120, transport=transport) as http:
        await asyncio.gather(*(client(i, n, http) for i, n in enumerate(shares)))
        history = (await http.get("/history")).json()
    elapsed = time.perf_counter() - began
    latencies = [(started[p] - submitted[p]) * 1000 for p in started]
    completed = sum(1 for entry in history.values() if entry["status"]["completed"])
    return {
        "prompts": prompts, "clients": clients,
        "done": len(done), "lost": prompts - len(done), "history_completed": completed,
        "submit_to_start_ms": {"p50": round(percentile(latencies, 0.5), 2),
                               "p99": round(percentile(latencies, 0.99), 2),
                               "mean": round(statistics.fmean(latencies), 2) if latencies else None},
        "seconds": round(elapsed, 2),
        "prompts_per_second": round(len(done) / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return 0
    port = free_port()
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(port), root],
                                   cwd=REPO, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.05)
            result = asyncio.run(run_clients(base, args.prompts, args.clients))
            result["server_cpu_seconds"] = process_cpu_seconds(process.pid)
            result["client_cpu_seconds"] = round(time.process_time(), 2)
        finally:
            process.terminate()
            process.wait(30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
