"""The ComfyUI-compatible server: `create_app(engine, config)` builds the Starlette app, `serve(args)` runs it.

Every API route answers at `/X` and `/api/X` (the frontend uses the prefix, scripts often do not); `/internal/*`
has no alias; the editor's static files are served at `/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from latentloom.engine.files import remove_stale_parts
from latentloom.nodes import bundled_graphs_dir

from . import frontend, pack_routes, routes_files, routes_prompt, routes_system, routes_userdata
from .queue_store import QueueStore
from .security import SecurityMiddleware, SecurityPolicy
from .state import PREVIEW_METHODS, LogBuffer, SafeJSONResponse, ServerConfig, ServerState
from .worker import Worker
from .ws import Hub

log = logging.getLogger("latentloom.server")


def with_api_alias(routes: list[Route]) -> list[BaseRoute]:
    aliased: list[BaseRoute] = list(routes)
    for route in routes:
        aliased.append(Route("/api" + route.path, route.endpoint, methods=sorted(route.methods or ())))
    return aliased


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = getattr(exc, "headers", None)
    return SafeJSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=headers)


async def server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        # The routes check name lengths first; this catches a path that only grows too long on disk.
        return SafeJSONResponse({"error": "file name or path too long"}, status_code=400)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal server error"}, status_code=500)


def create_app(engine, config: ServerConfig | None = None) -> Starlette:
    config = config or ServerConfig()
    if config.graphs_dir is None and bundled_graphs_dir().is_dir():
        config.graphs_dir = bundled_graphs_dir()
    store = QueueStore(config.database_path)
    logs = LogBuffer()
    hub = Hub(store, {}, config.preview_method)
    worker: Any
    if config.workers == "ray":
        from .dispatch import RayWorkerPool  # Ray is imported only in this mode

        worker = RayWorkerPool(engine, store, hub, config.worker_options)
    else:
        worker = Worker(engine, store, hub)
    state = ServerState(engine, config, store, hub, worker, logs)
    hub.features = routes_system.features(state)

    api = (routes_prompt.ROUTES + routes_files.ROUTES + routes_system.ROUTES + routes_userdata.ROUTES
           + frontend.api_routes())
    routes = with_api_alias(api)
    routes += [Route("/api" + r.path, r.endpoint, methods=sorted(r.methods or ()))
               for r in routes_system.API_ONLY_ROUTES]
    routes.append(Mount("/internal", routes=routes_system.INTERNAL_ROUTES + routes_files.INTERNAL_ROUTES))
    routes += [WebSocketRoute("/ws", hub.endpoint), WebSocketRoute("/api/ws", hub.endpoint)]
    routes += pack_routes.pack_routes(engine)  # after ours (ours win a clash), before the editor's files
    routes += pack_routes.web_extension_routes(engine)
    pack_routes.connect_pack_server(engine, hub)
    routes += frontend.static_routes(config.frontend_root or frontend.frontend_root())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for folder in (engine.env.output_dir, engine.env.temp_dir):
            removed = remove_stale_parts(folder) if folder else 0  # unfinished writes of a process that was killed
            if removed:
                log.info("removed %d unfinished file(s) left in %s", removed, folder)
        hub.attach(asyncio.get_running_loop(), worker)
        logs.listeners.append(hub.post_log)
        server_logger = logging.getLogger("latentloom")
        server_logger.addHandler(logs)
        if server_logger.level == logging.NOTSET or server_logger.level > logging.INFO:
            server_logger.setLevel(logging.INFO)
        for source, reason in engine.registry.load_errors.items():  # into the log the editor shows, too
            log.warning("custom nodes %s failed to load: %s", source, reason)
        if config.start_worker:
            worker.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)
            await hub.close_all()
            server_logger.removeHandler(logs)
            store.close()

    policy = SecurityPolicy(config.auth_token, config.allowed_hosts, config.max_upload_bytes)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(SecurityMiddleware, policy=policy)],
                    exception_handlers=handlers)
    app.state.server = state
    return app


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_names(value) -> tuple[str, ...]:
    """--allowed-hosts as a comma-separated string or a list (either shape the CLI may give)."""
    if not value:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


def config_from_args(args) -> ServerConfig:
    config = ServerConfig(listen=args.listen, port=args.port, user_dir=Path(args.user_dir),
                          database=Path(args.database) if args.database else None,
                          auth_token=args.auth_token or None,
                          allowed_hosts=_host_names(getattr(args, "allowed_hosts", None)))
    if getattr(args, "workers", "local") == "ray":
        try:
            from .dispatch import pool_options_from_args
        except ImportError as exc:
            raise SystemExit(f"--workers ray needs Ray: pip install 'latentloom[ray]' ({exc})") from exc
        config.workers, config.worker_options = "ray", pool_options_from_args(args)
    method = getattr(args, "preview_method", None) or "none"
    if method not in PREVIEW_METHODS:
        raise SystemExit(f"--preview-method must be one of {', '.join(PREVIEW_METHODS)}")
    config.preview_method = method
    upload_mb = getattr(args, "max_upload_size", None)  # ComfyUI's --max-upload-size, in MB
    if upload_mb:
        config.max_upload_bytes = int(float(upload_mb) * 1024 * 1024)
    return config


class DeferredApp:
    """Listen at once, build the engine (node modules import torch: seconds) in a thread, and hold requests until
    it is ready. So `latentloom serve` answers its port in well under a second; models load later, lazily."""

    def __init__(self, build):
        self._build = build
        self._app = None
        self._lifespan = None
        self._ready = asyncio.Event()  # (binds to the running loop on first use)
        self._failure: BaseException | None = None

    async def _start(self) -> None:
        try:
            app = await asyncio.get_running_loop().run_in_executor(None, self._build)
            self._lifespan = app.router.lifespan_context(app)
            await self._lifespan.__aenter__()
            self._app = app
        except BaseException as exc:  # reported to every request instead of hanging them
            self._failure = exc
            log.exception("the engine failed to start")
        finally:
            self._ready.set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._starting = asyncio.create_task(self._start())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self._ready.wait()
                    if self._lifespan is not None:
                        await self._lifespan.__aexit__(None, None, None)
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self._ready.wait()
        if self._app is None:
            if scope["type"] == "http":
                response = JSONResponse({"error": f"the engine failed to start: {self._failure}"}, status_code=503)
                return await response(scope, receive, send)
            return await send({"type": "websocket.close", "code": 1011})
        await self._app(scope, receive, send)


def prepared(engine, config: ServerConfig):
    """The engine, after the SD network code is imported and the tokenizer built (seconds), so the first prompt
    costs what later ones do plus its checkpoint's load (requests wait for the engine anyway, see DeferredApp). In
    Ray mode the models run in the workers' processes, not in this one."""
    if config.workers != "ray":
        from latentloom.nodes.diffusion.model_code import prepare

        prepare()
    return engine


def serve(args) -> int:
    import uvicorn

    from .cli import make_engine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = config_from_args(args)
    if not is_loopback(config.listen) and not config.auth_token:
        log.warning("listening on %s without --auth-token: anyone who can reach this port can run workflows "
                    "and read your files. Set --auth-token.", config.listen)
    if config.preview_method == "taesd":
        log.info("--preview-method taesd: previews use latent2rgb (no TAESD decoder here), as ComfyUI does "
                 "without TAESD weights in models/vae_approx")
    app = DeferredApp(lambda: create_app(prepared(make_engine(args, cache_bytes=args.cache_bytes), config), config))
    host = "0.0.0.0" if config.listen in ("", "0.0.0.0") else config.listen
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{config.port}/"
    print(f"latentloom: serving the editor at {url}", flush=True)
    if config.auth_token:
        print(f"latentloom: open {url}?token=<your token> once in the browser (it then keeps a cookie); "
              "scripts send 'Authorization: Bearer <token>'", flush=True)
    # No per-message deflate: previews are already compressed and the JSON messages are small, so it only costs CPU.
    uvicorn.run(app, host=host, port=config.port, log_level="warning", ws="websockets-sansio",
                ws_per_message_deflate=False)
    return 0
