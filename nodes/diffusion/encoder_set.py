"""What every text-encoder set of the transformer families shares (FamilyClip, Lumina2Clip, QwenImageClip,
HiDreamClip): clones that keep the encoders and change the layer or the patches, and `prepared()`, which leases
the encoders from the model manager and applies the CLIP patches (LoRA) for the duration of one encode.

The classes are frozen dataclasses with the fields `encoders`, `layer_idx`, `patches` and `options`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, Self

import torch


class EncoderSet:
    encoders: torch.nn.ModuleDict
    patches: tuple[Any, ...]
    options: dict[str, Any]

    def clone_with_layer(self, layer_idx: int | None) -> Self:
        replaced: Self = dataclasses.replace(self, layer_idx=layer_idx, options=dict(self.options))  # type: ignore[type-var]
        return replaced

    def with_patches(self, *patches: Any) -> Self:
        replaced: Self = dataclasses.replace(self, patches=self.patches + tuple(patches),  # type: ignore[type-var]
                                             options=dict(self.options))
        return replaced

    def cache_nbytes(self) -> int:
        return 0  # the encoders are counted by the model manager, not the output cache

    @contextlib.contextmanager
    def prepared(self, manager: Any = None) -> Iterator[torch.nn.ModuleDict]:
        lease = manager.use(self.encoders) if manager is not None else contextlib.nullcontext(self.encoders)
        with lease as modules:
            restores = []
            try:
                for patch in self.patches:
                    restores.append(patch.apply(modules))
                yield modules
            finally:
                for restore in reversed(restores):
                    restore()
