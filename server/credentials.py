"""Credentials in a prompt's extra_data (ComfyUI's `api_key_comfy_org`, `auth_token_comfy_org`, and anything that
looks like one) are split off before the prompt is stored, listed or run: they are never written to the queue
database, never echoed by /queue, /history or /jobs, and never reach image metadata.

Top-level ones are handed back to the nodes in memory (API nodes read them there). Nested ones, e.g. a key
pasted into `extra_pnginfo`, are dropped: the only thing that reads extra_pnginfo writes it into saved images.
"""

from __future__ import annotations

import re
from typing import Any

# Key names that name a credential. `auth` alone also matches `authorization` but not `author(s)`.
SECRET_KEY = re.compile(
    r"api_?key|apikey|token|secret|passw(?:or)?d|passphrase|credential|bearer|private_?key|auth(?!ors?(?![a-z]))",
    re.IGNORECASE)


def is_secret(key: Any, value: Any) -> bool:
    """A credential-like key holding text or a structure (numbers and flags such as `max_tokens: 77` are not)."""
    return isinstance(key, str) and bool(SECRET_KEY.search(key)) \
        and not (value is None or isinstance(value, (bool, int, float)))


def split_secrets(extra_data: dict) -> tuple[dict, dict]:
    """(a copy of extra_data without credentials at any depth, the top-level credentials)."""
    secrets = {key: value for key, value in extra_data.items() if is_secret(key, value)}
    public: dict = {}
    stack: list[tuple[Any, Any]] = [(extra_data, public)]
    while stack:
        source, target = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            if isinstance(source, dict) and is_secret(key, value):
                continue
            if isinstance(value, (dict, list)):
                child: Any = {} if isinstance(value, dict) else []
                stack.append((value, child))
            else:
                child = value
            if isinstance(target, dict):
                target[key] = child
            else:
                target.append(child)
    return public, secrets
