"""One queue over many workers: the server keeps the SQLite queue and history and hands prompts to Ray actors.

`RayWorkerPool` has the local `server.worker.Worker`'s interface (start, stop, wake, interrupt, request_free,
current, last_node), so the routes and the websocket hub do not know which one they drive. Importing this module
imports Ray; the server does so only for `serve --workers ray`.

Threads: one dispatcher thread starts and retires actors and assigns prompts; one runner thread per actor consumes
that actor's event stream for the prompt it runs and posts each event through the hub (one FIFO, so clients see a
prompt's events in the order the engine emitted them, with the same fields as in local mode).

Routing: the highest-priority pending prompt goes to an idle worker, preferring one whose memory manager already
holds the model files the prompt names (affinity by file name, size and mtime), otherwise the one holding the
fewest models, then the one that has run the fewest prompts.

Faults: an actor that dies mid-prompt (process killed, node lost) is dropped and replaced; its prompt goes back to
the queue at its original priority and runs on another worker (at most MAX_ATTEMPTS times). Files are committed
by the server (server.outputs_commit), deduplicated by prompt, so the retried prompt leaves no duplicate output.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from latentloom.engine.environment import MODEL_FOLDERS
from latentloom.engine.events import Executing

from .outputs_commit import OutputCommitter
from .queue_store import QueueItem, QueueStore
from .ray_pool import EngineFactory, EngineWorker
from .worker import HISTORY_EVENTS, JOB_STATUS, history_entry, report_error
from .ws import preview_method

log = logging.getLogger("latentloom.server")
MAX_ATTEMPTS = 3              # runs of one prompt whose worker died before it gives up with an error
MAX_START_FAILURES = 3        # consecutive actors that failed to start before the pool stops trying
ACTOR_CONCURRENCY = 4         # run + interrupt + info + free can overlap in one actor
POLL_SECONDS = 0.5
RESOURCES_SECONDS = 5.0       # how often a pool sized by the cluster's GPUs looks at them again
STARTING_POLL_SECONDS = 0.05
TIMINGS_KEPT = 10_000
# Errors meaning the actor (or its node) is gone, as opposed to an exception raised by our own code in it.
WORKER_LOST = tuple(getattr(ray.exceptions, name) for name in (
    "RayActorError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
    "OwnerDiedError", "LocalRayletDiedError") if hasattr(ray.exceptions, name))


@dataclass
class PoolOptions:
    engine: EngineFactory                 # how each actor builds its engine
    address: str | None = None            # an existing cluster ("auto", "ray://host:10001"); None: start one here
    num_workers: int | None = None        # None: one per GPU in the cluster, or one CPU worker without GPUs
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    torch_threads: int = 1                # torch threads of each CPU worker


def prompt_model_tokens(env, prompt: dict) -> set[tuple[str, int, int]]:
    """(file name, size, mtime_ns) of each model file the prompt's inputs name (as server.ray_pool's
    model_tokens_from_keys reads them from a worker's memory manager)."""
    tokens = set()
    for body in prompt.values():
        inputs = body.get("inputs") if isinstance(body, dict) else None
        for value in (inputs or {}).values() if isinstance(inputs, dict) else ():
            if not isinstance(value, str) or not value:
                continue
            for folder, extensions in MODEL_FOLDERS.items():
                if folder != "diffusers" and not value.lower().endswith(extensions):
                    continue
                try:
                    path = env.find_model(folder, value)
                except (FileNotFoundError, OSError, ValueError):
                    continue
                stat_path = path / "model_index.json" if path.is_dir() else path
                if stat_path.is_file():
                    stat = stat_path.stat()
                    tokens.add((path.name, stat.st_size, stat.st_mtime_ns))
                    break
    return tokens


def choose_worker(candidates: list[WorkerSlot], tokens: set) -> WorkerSlot:
    """Most of the prompt's models already loaded; then fewest models held; then fewest prompts run."""
    return max(candidates, key=lambda s: (len(tokens & s.models), -len(s.models), -s.prompts_run, -s.number))


@dataclass
class WorkerSlot:
    number: int
    actor: Any
    ready_ref: Any
    state: str = "starting"          # starting | idle | busy | draining | dead
    info: dict = field(default_factory=dict)
    models: set = field(default_factory=set)
    prompts_run: int = 0
    item: QueueItem | None = None
    last_node: str | None = None
    assigned_at: float = 0.0
    inbox: queue.Queue = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None

    @property
    def worker_id(self) -> str:
        return f"ray-{self.number}"


@dataclass
class _Attempt:
    """One run of one prompt on one worker: what the history entry needs."""

    messages: list = field(default_factory=list)


class RayWorkerPool:
    def __init__(self, engine, store: QueueStore, hub, options: PoolOptions):
        self.engine = engine
        self.store = store
        self.hub = hub
        self.options = options
        self.committer = OutputCommitter({"output": engine.env.output_dir, "temp": engine.env.temp_dir})
        self.slots: list[WorkerSlot] = []
        self.target = 0
        self.timings: deque[dict] = deque(maxlen=TIMINGS_KEPT)  # per prompt: dispatch and run seconds
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._numbers = itertools.count(1)
        self._attempts: dict[str, int] = {}
        self._kept_secrets: dict[str, dict] = {}   # secrets of re-queued prompts (the store hands them out once)
        self._start_failures = 0
        self._gpus_per_worker: float | None = None
        self._resources_checked = 0.0
        self._owns_ray = False
        self._actor_class: Any = None  # ray.remote(EngineWorker), once Ray is up
        self._actor_options: dict[str, Any] = {}
        self._torch_threads: int | None = None
        self._thread: threading.Thread | None = None

    # Control (any thread) -------------------------------------------------------------------------------------

    def start(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.options.address, include_dashboard=False, log_to_driver=True)
            self._owns_ray = True
        gpus = float(ray.cluster_resources().get("GPU", 0))
        per_worker = self.options.gpus_per_worker
        if per_worker is None:
            per_worker = 1.0 if gpus >= 1 else 0.0
        self.target = self.options.num_workers or (max(1, int(gpus // per_worker)) if per_worker else 1)
        # One worker per GPU, following GPU nodes that join or leave the cluster, unless a number was given.
        self._gpus_per_worker = per_worker if per_worker and not self.options.num_workers else None
        self._actor_options = {"num_cpus": 1, "num_gpus": per_worker, "max_concurrency": ACTOR_CONCURRENCY}
        self._torch_threads = None if per_worker else self.options.torch_threads
        self._actor_class = ray.remote(EngineWorker)
        log.info("ray: %d worker(s), %s GPU each, cluster %s", self.target, per_worker, ray.cluster_resources())
        self._thread = threading.Thread(target=self._dispatch_loop, name="latentloom-dispatch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Interrupt running prompts (they go back to the queue, as in local mode), retire every actor, and shut
        Ray down if the pool started it."""
        self._stop.set()
        self.interrupt()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            slots = list(self.slots)
        for slot in slots:
            slot.inbox.put(None)
        for slot in slots:
            if slot.thread is not None:
                slot.thread.join(timeout)
            self._retire(slot)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def wake(self) -> None:
        self._wake.set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt `prompt_id` on the worker running it (every running prompt when None)."""
        with self._lock:
            targets = [(s.actor, s.item.prompt_id) for s in self.slots
                       if s.item is not None and (prompt_id is None or s.item.prompt_id == str(prompt_id))]
        for actor, running_id in targets:
            actor.interrupt.remote(running_id)
        return bool(targets)

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self._lock:
            actors = [s.actor for s in self.slots if s.state in ("idle", "busy")]
        for actor in actors:
            actor.free.remote(bool(unload_models), bool(free_memory))

    def resize(self, num_workers: int) -> None:
        """Grow (new actors wait for free resources, e.g. a node joining) or shrink (idle workers leave at once,
        busy ones after their prompt)."""
        with self._lock:
            self.target = max(0, int(num_workers))
            self._gpus_per_worker = None
        self._wake.set()

    def remove_worker(self, worker_id: str) -> bool:
        """Let one worker leave after its current prompt (the pool starts a replacement if below target)."""
        with self._lock:
            for slot in self.slots:
                if slot.worker_id == worker_id and slot.state in ("starting", "idle", "busy"):
                    slot.state = "draining"
                    self._wake.set()
                    return True
        return False

    def workers(self) -> list[dict]:
        with self._lock:
            return [{**s.info, "id": s.worker_id, "state": s.state, "running": s.item.prompt_id if s.item else None,
                     "prompts_run": s.prompts_run, "models": len(s.models)} for s in self.slots]

    @property
    def current(self) -> QueueItem | None:
        """The most recently started running prompt (the hub's reconnect hint; local mode has only one)."""
        slot = self._latest_busy()
        return slot.item if slot else None

    @property
    def last_node(self) -> str | None:
        slot = self._latest_busy()
        return slot.last_node if slot else None

    @property
    def running_prompt_id(self) -> str | None:
        current = self.current
        return current.prompt_id if current else None

    def _latest_busy(self) -> WorkerSlot | None:
        with self._lock:
            busy = [s for s in self.slots if s.item is not None]
        return max(busy, key=lambda s: s.assigned_at) if busy else None

    # Dispatcher thread ----------------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self._maintain()
                self._assign()
            except Exception:  # the dispatcher must outlive any single failure
                log.exception("ray dispatcher step failed")
            with self._lock:
                starting = any(s.state == "starting" for s in self.slots)
            self._wake.wait(STARTING_POLL_SECONDS if starting else POLL_SECONDS)

    def _maintain(self) -> None:
        """Bring started actors into service, drop dead and drained ones, start actors up to the target."""
        if self._gpus_per_worker and time.monotonic() - self._resources_checked > RESOURCES_SECONDS:
            self._resources_checked = time.monotonic()
            gpus = float(ray.cluster_resources().get("GPU", 0))
            with self._lock:
                self.target = max(1, int(gpus // self._gpus_per_worker))
        with self._lock:
            starting = [s for s in self.slots if s.state in ("starting", "draining") and s.ready_ref is not None]
        if starting:
            ready, _ = ray.wait([s.ready_ref for s in starting], num_returns=len(starting), timeout=0)
            ready_refs = set(ready)
            for slot in starting:
                if slot.ready_ref in ready_refs:
                    self._admit(slot)
        with self._lock:
            leaving = [s for s in self.slots if s.state == "draining" and s.item is None]
        for slot in leaving:
            slot.inbox.put(None)
            self._retire(slot)
        with self._lock:
            self.slots = [s for s in self.slots if s.state != "dead"]
            live = [s for s in self.slots if s.state in ("starting", "idle", "busy")]
            surplus = len(live) - self.target
            for slot in sorted(live, key=lambda s: (s.state == "busy", s.state == "idle"))[:max(0, surplus)]:
                slot.state = "draining"
            missing = self.target - len(live) if self._start_failures < MAX_START_FAILURES else 0
        for _ in range(max(0, missing)):
            self._spawn()

    def _spawn(self) -> None:
        actor = self._actor_class.options(**self._actor_options).remote(self.options.engine, self._torch_threads)
        slot = WorkerSlot(next(self._numbers), actor, actor.info.remote())
        with self._lock:
            self.slots.append(slot)

    def _admit(self, slot: WorkerSlot) -> None:
        ref, slot.ready_ref = slot.ready_ref, None
        try:
            slot.info = ray.get(ref)
        except Exception as exc:
            self._start_failures += 1
            log.error("ray worker %s failed to start: %s", slot.worker_id, exc)
            with self._lock:
                slot.state = "dead"
            return
        self._start_failures = 0
        log.info("ray worker %s ready on %s (%s)", slot.worker_id, slot.info.get("host"), slot.info.get("device"))
        slot.thread = threading.Thread(target=self._runner, args=(slot,), name=f"latentloom-{slot.worker_id}",
                                       daemon=True)
        slot.thread.start()
        with self._lock:
            if slot.state == "starting":
                slot.state = "idle"

    def _assign(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                return
            item = self.store.take_next()
            if item is None:
                return
            item.secrets = item.secrets or self._kept_secrets.pop(item.prompt_id, {})
            slot = choose_worker(idle, prompt_model_tokens(self.engine.env, item.prompt))
            with self._lock:
                slot.state, slot.item, slot.last_node, slot.assigned_at = "busy", item, None, time.monotonic()
            slot.inbox.put(item)

    def _retire(self, slot: WorkerSlot) -> None:
        with self._lock:
            if slot.state == "dead":
                return
            slot.state = "dead"
        if slot.ready_ref is None:  # admitted: remove its staging folder (never started: nothing to remove)
            try:
                ray.get(slot.actor.close.remote(), timeout=5)
            except Exception:
                pass
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        self.committer.forget_worker(slot.worker_id)

    # Runner threads (one per actor) ---------------------------------------------------------------------------

    def _runner(self, slot: WorkerSlot) -> None:
        while True:
            item = slot.inbox.get()
            if item is None:
                return
            try:
                self._run(slot, item)
            except Exception:
                log.exception("prompt %s failed in the dispatcher", item.prompt_id)
            with self._lock:
                slot.item = None
                if slot.state == "busy":
                    slot.state = "idle"
                gone = slot.state == "dead"
            self._wake.set()
            if gone:
                return

    def _run(self, slot: WorkerSlot, item: QueueItem) -> None:
        began = time.perf_counter()
        attempt = _Attempt()
        self.hub.post_status()
        method = preview_method(item.extra_data, self.hub.preview_method)
        extra_data = {**item.extra_data, **item.secrets, "preview_method": method}
        result: dict | None = None
        try:
            stream = slot.actor.run.remote(item.prompt_id, item.prompt, item.outputs, extra_data)
            for ref in stream:
                for message in ray.get(ref):
                    if message[0] == "result":
                        result = message[1]
                    else:
                        self._forward(slot, item, attempt, message)
        except WORKER_LOST as exc:
            self._worker_lost(slot, item, attempt, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # our actor code raised: the prompt fails, the worker stays
            result = {"status": "crashed", "outputs": {}, "error": {
                "exception_type": type(exc).__name__, "exception_message": str(exc), "traceback": []}}
        if result is None:
            result = {"status": "crashed", "outputs": {}, "error": {
                "exception_type": "RuntimeError", "exception_message": "the worker sent no result"}}
        self._finish(slot, item, attempt, result)
        total = time.perf_counter() - began
        self.timings.append({"prompt_id": item.prompt_id, "worker": slot.worker_id, "total": total,
                             "run": float(result.get("seconds", 0.0)), "cpu": float(result.get("cpu_seconds", 0.0)),
                             "dispatch": max(0.0, total - float(result.get("seconds", 0.0)))})

    def _forward(self, slot: WorkerSlot, item: QueueItem, attempt: _Attempt, message: tuple) -> None:
        if message[0] in ("pack_json", "pack_text"):
            self._relay_pack_message(message[0], message[1])
            return
        event = message[1]
        if message[0] == "executed":
            output = self.committer.commit(slot.worker_id, item.prompt_id, event.display_node, event.output,
                                           message[2])
            event = event.model_copy(update={"output": output})
        if isinstance(event, HISTORY_EVENTS):
            attempt.messages.append([event.type, event.data()])
        if isinstance(event, Executing):
            slot.last_node = event.node
        previews = preview_method(item.extra_data, self.hub.preview_method) != "none"
        self.hub.post_event(event, item.client_id, previews)

    def _relay_pack_message(self, kind: str, payload: tuple) -> None:
        """A pack's send_sync / send_progress_text made in a worker, sent as the server's own PromptServer sends
        (server.pack_routes connects it to the hub)."""
        from latentloom.nodes.comfy_compat.prompt_server import PackServer

        server = self.engine.env.find_service(PackServer)
        if server is None:
            return
        if kind == "pack_json":
            server.send_sync(*payload)
        elif server.text_sender is not None:
            server.text_sender(*payload)

    def _worker_lost(self, slot: WorkerSlot, item: QueueItem, attempt: _Attempt, exc: BaseException) -> None:
        log.warning("ray worker %s lost while running prompt %s: %s", slot.worker_id, item.prompt_id,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        self._retire(slot)
        # Every loss counts, even before the first event came back: a graph that kills its worker at once must
        # not take down worker after worker forever.
        runs = self._attempts.get(item.prompt_id, 0) + 1
        self._attempts[item.prompt_id] = runs
        if runs >= MAX_ATTEMPTS:
            self._finish(slot, item, attempt, {"status": "crashed", "outputs": {}, "error": {
                "exception_type": "WorkerLost",
                "exception_message": f"the worker running this prompt died {runs} times; last: {exc}"}})
            return
        if item.secrets:
            self._kept_secrets[item.prompt_id] = item.secrets
        self.store.requeue(item.prompt_id)
        self.hub.post_status()
        self._wake.set()

    def _finish(self, slot: WorkerSlot, item: QueueItem, attempt: _Attempt, result: dict) -> None:
        status = result["status"]
        if status == "interrupted" and self._stop.is_set():
            # Shutting down, not cancelled by a user: the prompt runs again after the restart.
            if item.secrets:
                self._kept_secrets[item.prompt_id] = item.secrets
            self.store.requeue(item.prompt_id)
            return
        if status in ("invalid", "crashed"):
            error = result.get("error") or {}
            report_error(self.hub, item, attempt.messages, str(error.get("exception_type", "RuntimeError")),
                         str(error.get("exception_message", "")), list(error.get("traceback") or []))
            status = "error"
        outputs = {node: self.committer.rewrite(slot.worker_id, item.prompt_id, node, ui)
                   for node, ui in (result.get("outputs") or {}).items()}
        entry = history_entry(item, outputs, status, attempt.messages)
        self.store.finish(item, entry, JOB_STATUS.get(status, "failed"))
        self.committer.forget_prompt(item.prompt_id)
        self._attempts.pop(item.prompt_id, None)
        slot.models = {tuple(token) for token in result.get("models", [])} or slot.models
        slot.prompts_run += 1
        self.hub.post_status()
        self.hub.post_json("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)


def engine_factory_from_args(args) -> EngineFactory:
    """The actors' engine, built from the same `serve` flags as the server's own (paths made absolute, so that
    workers on this machine find them whatever their working directory)."""
    custom = args.custom_nodes if args.custom_nodes and Path(args.custom_nodes).is_dir() else None

    def absolute(value):
        return str(Path(value).resolve()) if value else None

    return EngineFactory("latentloom.nodes:create_engine", {
        "models_dir": absolute(args.models_dir), "input_dir": absolute(args.input_dir),
        "output_dir": absolute(args.output_dir), "temp_dir": absolute(args.temp_dir),
        "extra_model_paths": absolute(args.extra_model_paths), "custom_nodes_dir": absolute(custom),
        "cache_bytes": getattr(args, "cache_bytes", None), "cache_prompts": getattr(args, "cache_prompts", None),
        **memory_flags(args)})


def memory_flags(args) -> dict:
    """The memory manager's flags that differ from create_engine's defaults (--vram-budget, --no-stream-weights)."""
    flags = {}
    if getattr(args, "vram_budget", None) is not None:
        flags["vram_budget"] = args.vram_budget
    if not getattr(args, "stream_weights", True):
        flags["stream_weights"] = False
    return flags


def pool_options_from_args(args) -> PoolOptions:
    return PoolOptions(engine=engine_factory_from_args(args), address=getattr(args, "ray_address", None),
                       num_workers=getattr(args, "num_workers", None))

