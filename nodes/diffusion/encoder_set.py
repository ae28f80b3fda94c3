"""What every text-encoder set shares (the CLIP sets' ClipModel, and the transformer families' FamilyClip,
Lumina2Clip, QwenImageClip, HiDreamClip): clones that keep the encoders and change the layer or the patches, and
`prepared()`, which leases the encoders from the model manager and applies the CLIP patches (LoRA) for the
duration of one encode.

The classes are frozen dataclasses with the fields `encoders`, `layer_idx`, `patches` and `options`. Also here:
where a text encoder file's tokenizer is looked for, and the meta-device construction of the transformers
decoder-only text models (Gemma 2, Llama 3, Qwen2.5-VL) those sets hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch


class EncoderSet:
    encoders: torch.nn.ModuleDict
    patches: tuple[Any, ...]
    options: dict[str, Any]

    def clone_with_layer(self, layer_idx: int | None) -> Self:
        """Clip skip: the same weights, reading the hidden state `layer_idx` (-1 last, -2 penultimate, ...)."""
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
        """The encoders ready to run: on the compute device (through the memory manager when given), with this
        set's patches applied; restored on exit."""
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


def tokenizer_folders(encoder_file: Path, folder_name: str) -> tuple[Path, ...]:
    """Where the tokenizer of a text encoder file is looked for, in order: `<file stem>_tokenizer/` beside it,
    `folder_name/` beside it, and `text_encoders/<folder_name>/` of the models folder."""
    return (encoder_file.parent / f"{encoder_file.stem}_tokenizer", encoder_file.parent / folder_name,
            encoder_file.parent.parent / "text_encoders" / folder_name)


def meta_text_model(model_class: Any, config: Any) -> Any:
    """A transformers decoder-only text model built on the meta device (weights assigned later), except its rotary
    embedding: its frequencies are a non-persistent buffer, so they are computed for real on the CPU."""
    with torch.device("meta"):
        model = model_class(config)
    with torch.device("cpu"):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model
