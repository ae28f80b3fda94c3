"""No model hub, ever: diffusers and transformers read these variables when first imported."""

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")


def ensure_offline() -> None:
    """Call before importing diffusers or transformers (and when creating an engine). A value the user set wins."""
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
