"""ComfyUI's `server` module for packs: `PromptServer.instance` with `routes`, `send_sync`, `send_progress_text`.

There is one PromptServer per engine (a PackServer service of its Environment): `PromptServer.instance` is the
one of the engine the caller acts for (context.py), so the decorators a pack runs at import record their routes
on the engine that loads it. This layer knows no HTTP: the server layer (latentloom.server.pack_routes) serves
the recorded routes on its app and connects `send_sync` / `send_progress_text` to its websocket hub. Without a
server (the CLI, the Python API) messages are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .context import current_env, current_node
from .web_shim import RouteTableDef

log = logging.getLogger(__name__)

# (event type, data, client id or None for everyone)
JsonSender = Callable[[str, Any, "str | None"], None]
# (node id, text, client id or None)
TextSender = Callable[[str, str, "str | None"], None]


class PackRouter:
    """`PromptServer.instance.app.router`: routes added to it are recorded in the pack route table."""

    frozen = False

    def __init__(self, table: RouteTableDef):
        self.table = table

    def add_route(self, method: str, path: str, handler: Any, **kwargs: Any) -> None:
        self.table.route(method, path, **kwargs)(handler)

    def add_get(self, path: str, handler: Any, **kwargs: Any) -> None:
        self.add_route("GET", path, handler, **kwargs)

    def add_post(self, path: str, handler: Any, **kwargs: Any) -> None:
        self.add_route("POST", path, handler, **kwargs)

    def add_static(self, prefix: str, path: Any, **kwargs: Any) -> None:
        self.table.static(prefix, str(path), **kwargs)


class PackApp:
    """`PromptServer.instance.app` as packs use it before the server starts: `add_routes([web.get(...),
    web.static(...)])` and `router.add_*` record into the same route table as the `routes` decorators (aiohttp's
    own route definitions too: anything with method / path / handler, or prefix / path for static folders)."""

    def __init__(self, table: RouteTableDef):
        self.router = PackRouter(table)

    def add_routes(self, definitions: Any) -> None:
        for definition in definitions:
            if hasattr(definition, "handler") and hasattr(definition, "method"):
                self.router.add_route(definition.method, definition.path, definition.handler,
                                      **dict(getattr(definition, "kwargs", {}) or {}))
            elif hasattr(definition, "prefix"):
                self.router.add_static(definition.prefix, definition.path, **dict(getattr(definition, "kwargs", {})
                                                                                   or {}))
            else:
                raise TypeError(f"PromptServer.instance.app.add_routes: not a route definition: {definition!r}")


class PackServer:
    """The state behind `PromptServer.instance` for one engine."""

    def __init__(self) -> None:
        self.routes = RouteTableDef()
        self.app = PackApp(self.routes)
        self.json_sender: JsonSender | None = None
        self.text_sender: TextSender | None = None
        self.supports = {"custom_nodes_from_web"}
        self.on_prompt_handlers: list[Callable[[Any], Any]] = []
        # Pack name -> the absolute folder of its WEB_DIRECTORY (served at /extensions/<pack>/ by the HTTP layer).
        self.web_directories: dict[str, Path] = {}

    @property
    def client_id(self) -> str | None:
        """The client that queued the running prompt (None outside a run)."""
        ctx = current_node()
        return ctx.extra_data.get("client_id") if ctx is not None else None

    @property
    def last_node_id(self) -> str | None:
        ctx = current_node()
        return ctx.node_id if ctx is not None else None

    @property
    def last_prompt_id(self) -> str | None:
        ctx = current_node()
        return ctx.prompt_id if ctx is not None else None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        if self.json_sender is not None:
            self.json_sender(event, data, sid)

    async def send(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event: str, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str, node_id: str, sid: str | None = None) -> None:
        if self.text_sender is not None:
            self.text_sender(str(node_id), str(text), sid if sid is not None else self.client_id)

    def add_on_prompt_handler(self, handler: Callable[[Any], Any]) -> None:
        # Recorded; prompts are not passed through these handlers yet.
        self.on_prompt_handlers.append(handler)


def pack_server(env: Any) -> PackServer:
    found = env.find_service(PackServer)
    if found is None:
        found = PackServer()
        env.register(found)
    return found


class _PromptServerType(type):
    @property
    def instance(cls) -> PackServer:
        return pack_server(current_env())


class PromptServer(metaclass=_PromptServerType):
    """`PromptServer.instance` is the current engine's PackServer."""


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4
