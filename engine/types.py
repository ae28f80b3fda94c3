"""Port types and input specifications.

A node declares each input as a pydantic field annotated with one of the specs below, e.g.::

    seed: Annotated[int, Int(min=0, max=2**64 - 1, control_after_generate=True)] = 0
    model: Annotated[Any, Socket(MODEL)]

The spec carries everything the catalogue (ComfyUI's /object_info) and the validator need; the pydantic field
carries the Python type and the widget default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Port type names, spelled as ComfyUI spells them on the wire.
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
LATENT = "LATENT"
IMAGE = "IMAGE"
MASK = "MASK"
CONTROL_NET = "CONTROL_NET"
INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"
COMBO = "COMBO"
ANY = "*"
# Custom-sampling types (used by SamplerCustom & co.).
SAMPLER = "SAMPLER"
SIGMAS = "SIGMAS"
NOISE = "NOISE"
GUIDER = "GUIDER"
UPSCALE_MODEL = "UPSCALE_MODEL"

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})


def type_set(type_name: str) -> frozenset[str]:
    return frozenset(part.strip() for part in type_name.split(",") if part.strip())


def types_compatible(received: str, expected: str) -> bool:
    """ComfyUI's matching rule: equal, either side the wildcard, or overlapping comma-separated unions."""
    if received == expected or received == ANY or expected == ANY:
        return True
    return bool(type_set(received) & type_set(expected))


# A combo's choices may depend on the environment (files found under the model roots), so they can be computed.
Choices = Sequence[str] | Callable[[Any], Sequence[str]]


@dataclass(frozen=True)
class ListedAs:
    """A catalogue entry given as is ([TYPE, {options}]), in the required or optional section."""

    entry: list[Any]
    optional: bool = False


@dataclass(frozen=True)
class InputSpec:
    """What one input accepts. `type` is a port type name, a comma-separated union, or COMBO."""

    type: str
    optional: bool = False
    tooltip: str | None = None
    # Link-only: the input shows as a socket, never a widget (ComfyUI's forceInput for widget types).
    force_input: bool = False
    # Lazy inputs are evaluated only when the node asks for them (Node.inputs_needed).
    lazy: bool = False
    # The node receives the link itself ([node_id, slot]) instead of its value; no dependency is created.
    raw_link: bool = False
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    round: float | bool | None = None
    multiline: bool = False
    choices: Choices | None = None
    # Set False when the node's own validator checks the value (e.g. annotated file names): skips min/max/combo.
    check_value: bool = True
    # Extra keys passed through verbatim into the catalogue (control_after_generate, image_upload, display, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    # How the catalogue lists the input when not derived from the fields above: an input that stands for several
    # the node receives (ComfyUI's dynamic inputs: the parts are declared with listed=False, validated as usual).
    listed_as: ListedAs | None = None
    listed: bool = True

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input

    def resolve_choices(self, env: Any = None) -> list[str]:
        if self.choices is None:
            return []
        if callable(self.choices):
            return list(self.choices(env))
        return list(self.choices)


def Socket(type_name: str, *, optional: bool = False, tooltip: str | None = None, lazy: bool = False,
           raw_link: bool = False, **extra: Any) -> InputSpec:
    return InputSpec(type_name, optional=optional, tooltip=tooltip, lazy=lazy, raw_link=raw_link,
                     force_input=type_name in WIDGET_TYPES, extra=extra)


def Int(*, min: int | None = None, max: int | None = None, step: int | None = None, optional: bool = False,
        tooltip: str | None = None, force_input: bool = False, lazy: bool = False, check_value: bool = True,
        **extra: Any) -> InputSpec:
    return InputSpec(INT, optional=optional, tooltip=tooltip, force_input=force_input, lazy=lazy, min=min, max=max,
                     step=step, check_value=check_value, extra=extra)


def Float(*, min: float | None = None, max: float | None = None, step: float | None = None,
          round: float | bool | None = None, optional: bool = False, tooltip: str | None = None,
          force_input: bool = False, lazy: bool = False, check_value: bool = True, **extra: Any) -> InputSpec:
    return InputSpec(FLOAT, optional=optional, tooltip=tooltip, force_input=force_input, lazy=lazy, min=min, max=max,
                     step=step, round=round, check_value=check_value, extra=extra)


def String(*, multiline: bool = False, optional: bool = False, tooltip: str | None = None, force_input: bool = False,
           lazy: bool = False, **extra: Any) -> InputSpec:
    return InputSpec(STRING, optional=optional, tooltip=tooltip, force_input=force_input, lazy=lazy,
                     multiline=multiline, extra=extra)


def Boolean(*, optional: bool = False, tooltip: str | None = None, force_input: bool = False, lazy: bool = False,
            **extra: Any) -> InputSpec:
    return InputSpec(BOOLEAN, optional=optional, tooltip=tooltip, force_input=force_input, lazy=lazy, extra=extra)


def Combo(choices: Choices, *, optional: bool = False, tooltip: str | None = None, lazy: bool = False,
          check_value: bool = True, **extra: Any) -> InputSpec:
    return InputSpec(COMBO, optional=optional, tooltip=tooltip, lazy=lazy, choices=choices,
                     check_value=check_value, extra=extra)


@dataclass(frozen=True)
class Output:
    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.type
