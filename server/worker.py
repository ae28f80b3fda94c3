"""The prompt worker: one thread with its own event loop runs queued prompts one at a time.

Sync nodes block the loop they run on, so the executor must not run on the server's loop. Events leave this thread
through the hub, which hands them to the server loop with call_soon_threadsafe (FIFO, so the order is global).
The end of a prompt is: history written -> `status` broadcast -> `executing {node: null}`.

Output files: a prompt killed mid-run (kill -9) runs again after the restart, and its saves take the names of the
first attempt (server.queue_store.PromptOutputNumbering), so the output folder ends up with one copy of each.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
from typing import TYPE_CHECKING

from latentloom.engine.events import (
    Event,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
)
from latentloom.nodes.image_files import numbering_outputs

from .queue_store import PromptOutputNumbering, QueueItem, QueueStore
from .ws import preview_method

if TYPE_CHECKING:
    from latentloom.engine.run_state import InterruptToken

log = logging.getLogger("latentloom.server")
HISTORY_EVENTS = (ExecutionStart, ExecutionCached, ExecutionSuccess, ExecutionError, ExecutionInterrupted)
JOB_STATUS = {"success": "completed", "error": "failed", "interrupted": "cancelled"}


class Worker:
    def __init__(self, engine, store: QueueStore, hub):
        self.engine = engine
        self.store = store
        self.hub = hub
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._token: InterruptToken | None = None  # the running prompt's
        self._free_flags = {"unload_models": False, "free_memory": False}
        self._messages: list[list] = []
        self._previews = False  # whether the running prompt's preview method sends preview frames
        self.current: QueueItem | None = None
        self.last_node: str | None = None
        self._unsubscribe = None

    # Control (any thread) -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._unsubscribe = self.engine.bus.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._main, name="latentloom-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.interrupt()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._unsubscribe:
            self._unsubscribe()

    def wake(self) -> None:
        self._wake.set()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given). Idle interrupts do nothing."""
        with self._lock:
            current, token = self.current, self._token
            if current is None or token is None:
                return False
            if prompt_id is not None and str(prompt_id) != current.prompt_id:
                return False
            token.request()
            return True

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self._lock:
            self._free_flags["unload_models"] |= bool(unload_models)
            self._free_flags["free_memory"] |= bool(free_memory)
        self._wake.set()

    @property
    def running_prompt_id(self) -> str | None:
        current = self.current
        return current.prompt_id if current else None

    # Worker thread --------------------------------------------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._loop())
        finally:
            loop.close()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_free()
            self._wake.clear()
            item = self.store.take_next()
            if item is None:
                self._wake.wait(1.0)
                continue
            try:
                await self._run(item)
            except Exception:  # the worker must outlive any bug in one prompt
                log.exception("prompt %s failed outside the executor", item.prompt_id)

    def _apply_free(self) -> None:
        with self._lock:
            flags = dict(self._free_flags)
            self._free_flags = {"unload_models": False, "free_memory": False}
        if flags["free_memory"]:
            self.engine.free()
        elif flags["unload_models"]:
            self.engine.env.models.free_all()

    def _on_event(self, event: Event) -> None:
        current = self.current
        if current is None or event.prompt_id != current.prompt_id:
            return
        if isinstance(event, HISTORY_EVENTS):
            self._messages.append([event.type, event.data()])
        if isinstance(event, Executing):
            self.last_node = event.node
        self.hub.post_event(event, current.client_id, self._previews)

    async def _run(self, item: QueueItem) -> None:
        from latentloom.engine.run_state import InterruptToken

        token = InterruptToken()
        self._messages = []
        method = preview_method(item.extra_data, self.hub.preview_method)
        self._previews = method != "none"
        with self._lock:
            self.current, self._token, self.last_node = item, token, None
        self.hub.post_status()
        extra_data = {**item.extra_data, **item.secrets, "preview_method": method}
        outputs: dict = {}
        try:
            checked = self.engine.validate(item.prompt, item.outputs or None)
            if not checked.ok:
                status = "error"
                self._fail(item, "ValidationError", _describe_invalid(checked), None)
            else:
                # Output names are recorded against the queued prompt: a re-run after a crash reuses them.
                with numbering_outputs(PromptOutputNumbering(self.store, item.prompt_id)):
                    result = await self.engine.executor.run_async(checked.graph, item.prompt_id, extra_data, token)
                status = result.status
                outputs = result.outputs
        except Exception as exc:
            status = "error"
            self._fail(item, type(exc).__name__, str(exc), exc)
        if status == "interrupted" and self._stop.is_set():
            # Shutting down, not cancelled by a user: the prompt runs again after the restart.
            self.store.requeue(item.prompt_id)
            with self._lock:
                self.current, self._token = None, None
            return
        self.store.finish(item, history_entry(item, outputs, status, self._messages), JOB_STATUS.get(status, "failed"))
        with self._lock:
            self.current, self._token = None, None
        self.hub.post_status()
        self.hub.post_json("executing", {"node": None, "prompt_id": item.prompt_id}, item.client_id)

    def _fail(self, item: QueueItem, exception_type: str, message: str, exc: BaseException | None) -> None:
        report_error(self.hub, item, self._messages, exception_type, message,
                     traceback.format_exception(exc) if exc else [])


def history_entry(item: QueueItem, outputs: dict, status: str, messages: list) -> dict:
    """The history entry of a finished prompt (shared with the Ray pool, server.dispatch)."""
    return {
        "prompt": item.as_tuple(),
        "outputs": outputs,
        "status": {"status_str": "success" if status == "success" else "error",
                   "completed": status == "success", "messages": messages},
        "meta": {node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
                 for node in outputs},
    }


def report_error(hub, item: QueueItem, messages: list, exception_type: str, message: str,
                 traceback_lines: list[str]) -> None:
    """An error outside any node (e.g. a queued graph that no longer validates after a restart): sent to the
    prompt's client and recorded in `messages`, after an execution_start if none was sent."""
    data = {"prompt_id": item.prompt_id, "node_id": "", "node_type": "", "executed": [],
            "exception_message": message, "exception_type": exception_type,
            "traceback": traceback_lines, "current_inputs": {},
            "current_outputs": [], "timestamp": int(time.time() * 1000)}
    if not any(m[0] == "execution_start" for m in messages):
        start = {"prompt_id": item.prompt_id, "timestamp": data["timestamp"]}
        messages.append(["execution_start", start])
        hub.post_json("execution_start", start, item.client_id)
    messages.append(["execution_error", data])
    hub.post_json("execution_error", data, item.client_id)


def _describe_invalid(checked) -> str:
    parts = []
    if checked.error:
        parts.append(f"{checked.error.get('message')}: {checked.error.get('details')}")
    for node_id, info in checked.node_errors.items():
        for error in info.get("errors", []):
            parts.append(f"#{node_id} {info.get('class_type')}: {error.get('message')}: {error.get('details')}")
    return "; ".join(parts) or "the graph no longer validates"
