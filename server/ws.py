"""The websocket hub: `/ws?clientId=`, ComfyUI's message routing, binary previews.

Every socket has its own bounded outbox and writer task, so a slow client never blocks the others (a client that
falls too far behind is disconnected). Messages from the worker thread enter through `post_*`, which use
call_soon_threadsafe: one FIFO, so all clients see events in the order they happened.

Routing (ComfyUI's): per-prompt events go only to the prompt's client; `status` is broadcast. A prompt without a
client_id sends no execution messages, except progress, progress_state, previews and execution_interrupted, which
are broadcast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from latentloom.engine import jsonsafe
from latentloom.engine.events import Event, Progress

from .state import PREVIEW_METHODS

log = logging.getLogger("latentloom.server")
# A client this far behind is disconnected (it reconnects and gets a fresh status) rather than buffered forever.
OUTBOX_LIMIT = 10_000
OUTBOX_BYTES = 64 * 1024 * 1024
PREVIEW_IMAGE = 1
PREVIEW_IMAGE_WITH_METADATA = 4
PREVIEW_FORMATS = {"image/jpeg": 1, "image/png": 2}
# Sent only to the prompt's own client; never broadcast when the prompt has none.
CLIENT_ONLY = frozenset({"executing", "executed", "execution_start", "execution_cached", "execution_success",
                         "execution_error"})


class Client:
    def __init__(self, websocket: WebSocket, client_id: str):
        self.websocket = websocket
        self.client_id = client_id
        self.outbox: asyncio.Queue = asyncio.Queue(OUTBOX_LIMIT)
        self.queued_bytes = 0
        self.flags: dict[str, Any] = {}
        self.wants_logs = False
        self.writer: asyncio.Task | None = None
        self.closed = False

    def push(self, message: str | bytes) -> bool:
        if self.closed or self.queued_bytes + len(message) > OUTBOX_BYTES:
            return False
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            return False
        self.queued_bytes += len(message)
        return True

    async def write(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                if isinstance(message, bytes):
                    await self.websocket.send_bytes(message)
                else:
                    await self.websocket.send_text(message)
                self.queued_bytes -= len(message)
        except (WebSocketDisconnect, RuntimeError, OSError, asyncio.CancelledError):
            self.closed = True
        except Exception:
            self.closed = True
            log.exception("websocket writer for %s failed", self.client_id)


def preview_frames(event: Progress) -> tuple[bytes, bytes]:
    """(type-1 frame, type-4 frame) for a progress event carrying preview bytes."""
    image_type = event.preview_type or "image/jpeg"
    preview = event.preview or b""
    plain = struct.pack(">II", PREVIEW_IMAGE, PREVIEW_FORMATS.get(image_type, 1)) + preview
    metadata = json.dumps({"node_id": event.real_node or event.node, "display_node_id": event.node,
                           "parent_node_id": event.parent_node, "real_node_id": event.real_node or event.node,
                           "prompt_id": event.prompt_id, "image_type": image_type}).encode()
    rich = struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + preview
    return plain, rich


def encode(message_type: str, data: Any) -> str:
    return jsonsafe.dumps({"type": message_type, "data": data})


def preview_method(extra_data: dict, server_default: str) -> str:
    """The live-preview method of one prompt: its `extra_data.preview_method` (the editor's "Live preview
    method" setting) unless that is absent or "default", else the server's --preview-method."""
    asked = extra_data.get("preview_method") if isinstance(extra_data, dict) else None
    return asked if asked in PREVIEW_METHODS else server_default


class Hub:
    def __init__(self, store, features: dict[str, Any], preview_method: str = "none"):
        self.store = store
        self.features = features
        self.preview_method = preview_method  # the server's default (ComfyUI's --preview-method)
        self.clients: dict[str, Client] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.worker = None

    def attach(self, loop: asyncio.AbstractEventLoop, worker) -> None:
        self.loop = loop
        self.worker = worker

    # Thread-safe entry points (worker thread, log handler) ----------------------------------------------------

    def _post(self, callback, *args) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # loop shutting down
            pass

    def post_event(self, event: Event, client_id: str | None, previews: bool = True) -> None:
        """Send an engine event; `previews=False` (the prompt's preview method is "none") sends progress
        without its binary preview frames, as ComfyUI does."""
        if not previews and isinstance(event, Progress) and event.preview:
            event = event.model_copy(update={"preview": None, "preview_type": None})
        self._post(self.send_event, event, client_id)

    def post_json(self, message_type: str, data: Any, client_id: str | None) -> None:
        self._post(self.send, message_type, data, client_id)

    def post_status(self) -> None:
        self._post(self.broadcast_status)

    def post_log(self, entry: dict) -> None:
        self._post(self._send_log, entry)

    # Loop side --------------------------------------------------------------------------------------------------

    def status_data(self, sid: str | None = None) -> dict:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self.store.remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return data

    def broadcast_status(self) -> None:
        message = encode("status", self.status_data())
        for client in list(self.clients.values()):
            self._deliver(client, message)

    def send(self, message_type: str, data: Any, client_id: str | None) -> None:
        if client_id is None:
            if message_type in CLIENT_ONLY:
                return
            message = encode(message_type, data)
            for client in list(self.clients.values()):
                self._deliver(client, message)
            return
        target = self.clients.get(client_id)
        if target is not None:
            self._deliver(target, encode(message_type, data))

    def send_event(self, event: Event, client_id: str | None) -> None:
        if isinstance(event, Progress) and event.preview:
            found = [self.clients.get(client_id)] if client_id is not None else list(self.clients.values())
            targets = [c for c in found if c is not None]
            plain, rich = preview_frames(event)
            for client in targets:
                if client.flags.get("supports_preview_metadata"):
                    self._deliver(client, rich)
            self.send(event.type, event.data(), client_id)
            for client in targets:
                if not client.flags.get("supports_preview_metadata"):
                    self._deliver(client, plain)
            return
        if event.type.startswith("latentloom."):
            return  # our own events (warnings) are kept off the wire: the frontend logs unknown types
        self.send(event.type, event.data(), client_id)

    def _send_log(self, entry: dict) -> None:
        message = encode("logs", {"entries": [entry], "size": None})
        for client in list(self.clients.values()):
            if client.wants_logs:
                self._deliver(client, message)

    def _deliver(self, client: Client, message: str | bytes) -> None:
        if not client.push(message):
            # Too far behind (or gone): drop it rather than buffer without bound.
            self._drop(client)

    def _drop(self, client: Client) -> None:
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
        if not client.closed:
            log.warning("websocket client %s fell too far behind and was disconnected", client.client_id)
        client.closed = True
        if client.writer is not None:
            client.writer.cancel()
        asyncio.ensure_future(self._close_quietly(client))

    @staticmethod
    async def _close_quietly(client: Client) -> None:
        try:
            await client.websocket.close(code=1013)
        except Exception:
            pass

    def set_log_subscription(self, client_id: str, enabled: bool) -> bool:
        client = self.clients.get(client_id)
        if client is None:
            return False
        client.wants_logs = bool(enabled)
        return True

    # The endpoint ---------------------------------------------------------------------------------------------

    async def endpoint(self, websocket: WebSocket) -> None:
        client_id = websocket.query_params.get("clientId") or uuid.uuid4().hex
        await websocket.accept()
        client = Client(websocket, client_id)
        # The newest socket with an id owns it. The older one stays open but gets nothing more: closing it would
        # make two tabs sharing an id (a duplicated tab) reconnect in turn forever.
        self.clients[client_id] = client
        client.writer = asyncio.create_task(client.write())
        client.push(encode("status", self.status_data(sid=client_id)))
        worker = self.worker
        current = worker.current if worker is not None else None
        if current is not None and current.client_id == client_id and worker.last_node:
            client.push(encode("executing", {"node": worker.last_node, "display_node": worker.last_node,
                                             "prompt_id": current.prompt_id}))
        first = True
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if first and text:
                    self._negotiate(client, text)
                first = False
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            # Only unregister if the id still points at this socket (a reconnect may have replaced it).
            if self.clients.get(client_id) is client:
                del self.clients[client_id]
            client.closed = True
            if client.writer is not None:
                client.writer.cancel()

    def _negotiate(self, client: Client, text: str) -> None:
        try:
            message = jsonsafe.loads(text)  # the one JSON reader: a 5000-deep message is ignored, not a crash
        except ValueError:
            return
        if isinstance(message, dict) and message.get("type") == "feature_flags" \
                and isinstance(message.get("data"), dict):
            client.flags = dict(message["data"])
            client.push(encode("feature_flags", self.features))

    async def close_all(self) -> None:
        for client in list(self.clients.values()):
            client.closed = True
            if client.writer is not None:
                client.writer.cancel()
            await self._close_quietly(client)
        self.clients.clear()
