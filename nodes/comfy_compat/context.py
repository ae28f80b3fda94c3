"""Which engine and which running node ComfyUI's module-level functions act for.

ComfyUI's modules are global (`folder_paths.get_filename_list(...)`, `PromptServer.instance`,
`comfy.utils.ProgressBar(...)`): a pack calls them without saying for which engine. Here every call into pack code
is made inside `acting_for(env, ctx)`, which sets two context variables; the compatibility modules read them. So
two engines in one process never mix, and nothing is stored at module level. Context variables follow asyncio
tasks; a thread a pack starts itself does not inherit them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentloom.engine.environment import Environment
    from latentloom.engine.node import RunContext

_environment: ContextVar[Environment | None] = ContextVar("latentloom_comfy_environment", default=None)
_node_context: ContextVar[RunContext | None] = ContextVar("latentloom_comfy_node_context", default=None)


class NoEngineError(RuntimeError):
    """A ComfyUI module function was called outside any engine's pack loading or node call."""


@contextlib.contextmanager
def acting_for(env: Environment | None, ctx: RunContext | None = None) -> Iterator[None]:
    """Pack code called inside this block acts for `env` (and the running node `ctx`, when given)."""
    env_token = _environment.set(env if env is not None else _environment.get())
    ctx_token = _node_context.set(ctx if ctx is not None else _node_context.get())
    try:
        yield
    finally:
        _node_context.reset(ctx_token)
        _environment.reset(env_token)


def current_env() -> Environment:
    env = _environment.get()
    if env is None:
        raise NoEngineError("a ComfyUI module function was called outside a latentloom engine (it works while "
                            "custom nodes are loaded and while their nodes run)")
    return env


def current_node() -> RunContext | None:
    """The context of the pack node running now, or None (pack import, catalogue, validation)."""
    return _node_context.get()
