"""`comfy_api.feature_flags`: what a connected client said it supports. Our server negotiates no optional
websocket features, so every feature reads as unsupported and packs send the plain message forms."""

from __future__ import annotations

from typing import Any


def supports_feature(sockets_metadata: Any, sid: Any, feature_name: str) -> bool:
    return False


def get_connection_feature(sockets_metadata: Any, sid: Any, feature_name: str, default: Any = False) -> Any:
    return default


def get_server_features() -> dict[str, Any]:
    return {}
