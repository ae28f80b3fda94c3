"""Server configuration and the per-app state the routes share (no module-level state: two apps never mix)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from latentloom.engine import jsonsafe

DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024
LOG_LINES = 300
# ComfyUI's --preview-method values; "default" in a prompt's extra_data means the server's setting.
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")


@dataclass
class ServerConfig:
    listen: str = "127.0.0.1"
    port: int = 8188
    user_dir: Path = field(default_factory=lambda: Path("user"))
    database: Path | None = None          # default: user_dir / "queue.db"
    auth_token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    allowed_hosts: tuple[str, ...] = ()   # extra Host names accepted besides loopback and IP literals
    graphs_dir: Path | None = None        # offered to the editor as workflow templates
    frontend_root: Path | None = None     # default: the comfyui-frontend-package static folder
    start_worker: bool = True
    workers: str = "local"                # "ray": a pool of Ray actors (server.dispatch) instead of one thread
    worker_options: Any = None            # server.dispatch.PoolOptions for workers="ray"
    preview_method: str = "none"          # live previews, as ComfyUI's --preview-method (its default: none)

    @property
    def database_path(self) -> Path:
        return Path(self.database) if self.database else Path(self.user_dir) / "queue.db"


class LogBuffer(logging.Handler):
    """Keeps the last log lines for /internal/logs and pushes new ones to subscribed sockets."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.entries: deque[dict] = deque(maxlen=LOG_LINES)
        self.listeners: list = []
        self._lock_entries = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {"t": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
                     + f".{int(record.msecs):03d}", "m": self.format(record) + "\n"}
        except Exception:
            return
        with self._lock_entries:
            self.entries.append(entry)
            listeners = list(self.listeners)
        for listener in listeners:
            listener(entry)

    def snapshot(self) -> list[dict]:
        with self._lock_entries:
            return list(self.entries)


class ServerState:
    """What every route needs: the engine, the queue store, the websocket hub, the worker, the config."""

    def __init__(self, engine, config: ServerConfig, store, hub, worker, logs: LogBuffer):
        self.engine = engine
        self.config = config
        self.store = store
        self.hub = hub
        self.worker = worker
        self.logs = logs
        self.settings_lock = threading.Lock()

    @property
    def env(self):
        return self.engine.env

    @property
    def user_root(self) -> Path:
        return Path(self.config.user_dir).resolve() / "default"

    def folder(self, kind: str) -> Path | None:
        """The input/output/temp folder by its ComfyUI type name."""
        return {"input": self.env.input_dir, "output": self.env.output_dir, "temp": self.env.temp_dir}.get(kind)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def read_json(request: Request, *, empty: Any = ...) -> Any:
    """The body as JSON whatever the Content-Type (ComfyUI clients send urlencoded). Malformed JSON, and JSON
    that could not be stored and served back (NaN, lone surrogates, huge integers, deep nesting) -> 400.
    `empty` is returned for an empty body when given."""
    body = await request.body()
    if not body.strip():
        if empty is not ...:
            return empty
        raise HTTPException(400, "empty request body: JSON expected")
    try:
        return jsonsafe.loads(body)
    except jsonsafe.JsonInputError as exc:
        raise HTTPException(400, f"invalid JSON body: {exc}") from exc


class SafeJSONResponse(JSONResponse):
    """Never fails to encode: values JSON cannot carry (NaN, lone surrogates, objects) are made plain first."""

    def render(self, content: Any) -> bytes:
        return jsonsafe.dumps(content, separators=(",", ":")).encode("utf-8")


def json_response(data: Any, status: int = 200) -> Response:
    return SafeJSONResponse(data, status_code=status)


def empty_ok() -> Response:
    return Response(status_code=200)


@overload
def int_query(request: Request, name: str, default: int, minimum: int | None = None) -> int: ...
@overload
def int_query(request: Request, name: str, default: None = None, minimum: int | None = None) -> int | None: ...


def int_query(request: Request, name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise HTTPException(400, f"query parameter '{name}' must be an integer") from exc
    if minimum is not None and value < minimum:
        raise HTTPException(400, f"query parameter '{name}' must be at least {minimum}")
    return value


def bool_query(request: Request, name: str, default: bool = False) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    return raw.lower() in ("true", "1", "yes")
