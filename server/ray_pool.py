"""The Ray worker actor: one engine per actor, with its own model memory manager and output cache.

`EngineWorker` is a plain class (importable and testable without Ray); `server.dispatch` wraps it with
`ray.remote` at pool start. Every prompt runs as a streaming generator: batches of messages flow back to the
server while the prompt runs, in the order the engine emitted them:

    ("event", Event)                         any engine event except `executed`
    ("executed", Executed, {file: bytes})    an `executed` event and the bytes of the files its UI data names
    ("pack_json", (type, data, client id))   a custom node pack's `PromptServer.instance.send_sync` (client id
                                             None: every client), relayed to the server's websocket hub
    ("pack_text", (node id, text, client id)) a pack's `send_progress_text`, relayed the same way
    ("result", {...})                        always last: status, outputs, error, the models this worker holds

Custom node packs are loaded by each actor's engine (from the same `--custom-nodes` folder as the server's) and
by the server's: nodes run here, while their HTTP routes and web extensions are served by the server process only.

Output files: the actor's engine writes into a private staging folder (its env.output_dir / temp_dir), never into
the server's folders. The bytes of each new file travel with the `executed` event that names it, and the server
commits them (atomically, under fresh counters, deduplicated by prompt), so a worker that dies mid-prompt leaves no
partial or duplicate file where /view looks, and workers on other machines need no shared disk. A shipped staging
file is truncated to zero bytes but kept, so that SaveImage's counter keeps counting and staged names stay unique
for this actor's lifetime (the server maps cached `executed` events back to the committed names).
"""

from __future__ import annotations

import importlib
import os
import queue
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .worker import _describe_invalid

STAGED_TYPES = ("output", "temp")
# A UI entry that names a file: {"filename", "subfolder", "type"} (ComfyUI's images/gifs/audio/... lists).
FileKey = tuple[str, str, str]  # (type, subfolder, filename)


@dataclass(frozen=True)
class EngineFactory:
    """How a worker builds its engine, by import path, so it pickles to any node of the cluster:
    `EngineFactory("latentloom.nodes:create_engine", {"models_dir": "models"})`."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self):
        module_name, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)(**self.kwargs)


def file_entries(ui: dict | None) -> Iterator[tuple[str, int, dict]]:
    """(ui key, position, entry) for each entry of a node's UI data that names a staged file."""
    for key, values in (ui or {}).items():
        if not isinstance(values, list):
            continue
        for index, entry in enumerate(values):
            if isinstance(entry, dict) and isinstance(entry.get("filename"), str) \
                    and entry.get("type", "output") in STAGED_TYPES:
                yield key, index, entry


def file_key(entry: dict) -> FileKey:
    return (str(entry.get("type", "output")), str(entry.get("subfolder") or ""), str(entry["filename"]))


def model_tokens_from_keys(keys) -> set[tuple[str, int, int]]:
    """(file name, size, mtime_ns) of every model file named in the memory manager's keys. Loader keys hold
    (resolved path, size, mtime_ns) triples (server.dispatch.prompt_model_tokens computes the same from a prompt)."""
    tokens = set()
    for key in keys:
        parts = key if isinstance(key, tuple) else (key,)
        for index in range(len(parts) - 2):
            path, size, mtime = parts[index:index + 3]
            if isinstance(path, str) and os.sep in path and type(size) is int and type(mtime) is int:
                tokens.add((Path(path).name, size, mtime))
    return tokens


class EngineWorker:
    """The body of one Ray actor. Runs one prompt at a time; `interrupt` and `info` may arrive meanwhile (the
    actor is created with max_concurrency > 1)."""

    def __init__(self, factory: EngineFactory, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.engine = factory()
        self.staging = Path(tempfile.mkdtemp(prefix="latentloom-worker-"))
        env = self.engine.env
        env.output_dir = self.staging / "output"
        env.temp_dir = self.staging / "temp"
        for folder in (env.output_dir, env.temp_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._roots = {"output": Path(env.output_dir), "temp": Path(env.temp_dir)}
        self._run_lock = threading.Lock()     # one prompt at a time; free() waits for it
        self._state_lock = threading.Lock()
        self._current: tuple[str, Any] | None = None   # (prompt_id, InterruptToken)
        self._early_interrupts: set[str] = set()       # interrupts that arrived before their prompt started
        self._shipped: set[Path] = set()
        self._messages: queue.Queue | None = None      # the running prompt's messages (pack messages go there)
        self._relay_pack_messages()

    def _relay_pack_messages(self) -> None:
        """Point the engine's PromptServer (when packs were loaded) at the running prompt's message stream."""
        from latentloom.nodes.comfy_compat.prompt_server import PackServer

        server = self.engine.env.find_service(PackServer)
        if server is None:
            return

        def relay(kind: str, *payload: Any) -> None:
            with self._state_lock:
                messages = self._messages
            if messages is not None:  # outside a prompt (a pack's import) there is nobody to tell
                messages.put((kind, payload))

        server.json_sender = lambda event, data, client_id: relay("pack_json", event, data, client_id)
        server.text_sender = lambda node_id, text, client_id: relay("pack_text", node_id, text, client_id)

    # Control (any thread) -----------------------------------------------------------------------------------

    def info(self) -> dict:
        import socket

        device = str(self.engine.env.models.device)
        try:
            import ray

            gpus = [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []
        except ImportError:
            gpus = []
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": device, "gpus": gpus,
                "running": self._current[0] if self._current else None}

    def interrupt(self, prompt_id: str) -> bool:
        """Interrupt `prompt_id` if it runs here; if it has not started yet, it stops as soon as it does."""
        with self._state_lock:
            if self._current is not None and self._current[0] == prompt_id:
                self._current[1].request()
                return True
            self._early_interrupts.add(prompt_id)
            return False

    def free(self, unload_models: bool, free_memory: bool) -> None:
        with self._run_lock:
            if free_memory:
                self.engine.free()
            elif unload_models:
                self.engine.env.models.free_all()

    def loaded_models(self) -> list[tuple[str, int, int]]:
        return sorted(model_tokens_from_keys(self.engine.env.models.loaded_keys()))

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    # Running --------------------------------------------------------------------------------------------------

    def run(self, prompt_id: str, prompt: dict, targets: list[str], extra_data: dict) -> Iterator[list]:
        """Run one prompt; yields batches of messages (see the module docstring), the last one ends with the
        result. Batching whatever accumulated since the last yield keeps the per-event cost low."""
        from latentloom.engine.run_state import InterruptToken

        with self._run_lock:
            token = InterruptToken()
            with self._state_lock:
                self._current = (prompt_id, token)
                if prompt_id in self._early_interrupts:
                    self._early_interrupts.discard(prompt_id)
                    token.request()
            messages: queue.Queue = queue.Queue()
            with self._state_lock:
                self._messages = messages
            thread = threading.Thread(target=self._execute, name=f"prompt-{prompt_id[:8]}",
                                      args=(prompt_id, prompt, targets, extra_data, token, messages), daemon=True)
            thread.start()
            try:
                finished = False
                while not finished:
                    batch = [messages.get()]
                    while True:
                        try:
                            batch.append(messages.get_nowait())
                        except queue.Empty:
                            break
                    finished = batch[-1][0] == "result"
                    yield batch
            finally:
                thread.join()
                with self._state_lock:
                    self._current = None
                    self._messages = None

    def _execute(self, prompt_id: str, prompt: dict, targets: list[str], extra_data: dict, token,
                 messages: queue.Queue) -> None:
        from latentloom.engine.events import Executed

        def listen(event) -> None:
            if event.prompt_id != prompt_id:
                return
            if isinstance(event, Executed):
                messages.put(("executed", event, self._collect_files(event.output)))
            else:
                messages.put(("event", event))

        started, cpu_started = time.perf_counter(), time.thread_time()
        result: dict[str, Any] = {"status": "error", "outputs": {}}
        unsubscribe = self.engine.bus.subscribe(listen)
        try:
            checked = self.engine.validate(prompt, targets or None)
            if not checked.ok:
                result = {"status": "invalid", "outputs": {}, "error": {
                    "exception_type": "ValidationError", "exception_message": _describe_invalid(checked)}}
            else:
                run = self.engine.executor.run(checked.graph, prompt_id, extra_data, token)
                result = {"status": run.status, "outputs": run.outputs, "error": run.error,
                          "warnings": run.warnings}
        except Exception as exc:  # a bug outside any node: reported as the prompt's error, the actor lives on
            result = {"status": "crashed", "outputs": {}, "error": {
                "exception_type": type(exc).__name__, "exception_message": str(exc),
                "traceback": traceback.format_exception(exc)}}
        finally:
            unsubscribe()
            result["seconds"] = time.perf_counter() - started
            result["cpu_seconds"] = time.thread_time() - cpu_started  # below `seconds`: waiting for a core
            result["models"] = self.loaded_models()
            messages.put(("result", result))

    def _collect_files(self, ui: dict | None) -> dict[FileKey, bytes]:
        """The bytes of the not yet shipped staged files `ui` names; each is then truncated (see module doc)."""
        files: dict[FileKey, bytes] = {}
        for _, _, entry in file_entries(ui):
            key = file_key(entry)
            root = self._roots[key[0]]
            path = Path(os.path.normpath(root / key[1] / key[2]))
            if path in self._shipped or not path.is_relative_to(root) or not path.is_file():
                continue
            files[key] = path.read_bytes()
            self._shipped.add(path)
            with open(path, "wb"):
                pass
        return files

