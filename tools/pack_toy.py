"""Write the shipped toy-model files (fp16, ComfyUI's folder layout) from the training results in work-training/.

  models/checkpoints/toy-shapes.safetensors        single-file LDM checkpoint: model.diffusion_model.* (UNet),
                                                    first_stage_model.* (VAE), cond_stage_model.transformer.
                                                    text_model.* (CLIP), written by nodes.diffusion.convert
  models/controlnet/toy-shape-control.safetensors  LDM ControlNet layout (control_model.*: input_blocks,
                                                    middle_block, zero_convs, middle_block_out, input_hint_block),
                                                    written by nodes.diffusion.controlnet.controlnet_to_ldm (the
                                                    engine's own reader of diffusers-named ControlNet files)
  models/loras/toy-outline.safetensors             kohya naming with LDM module names (lora_unet_input_blocks_1_1_
                                                    transformer_blocks_0_attn1_to_q.lora_down/.lora_up/.alpha)

Each file is read back and checked: the checkpoint through the engine's own loader
(nodes.diffusion.checkpoint.load_checkpoint), the ControlNet through diffusers' LDM converter; every tensor must
equal the fp16-rounded trained one.
Usage: .venv/bin/python tools/pack_toy.py
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_common import REPO_ROOT, WORK_DIR  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from latentloom.nodes.diffusion import convert  # noqa: E402
from latentloom.nodes.diffusion.controlnet import LDM_PREFIX as CONTROLNET_PREFIX  # noqa: E402
from latentloom.nodes.diffusion.controlnet import controlnet_to_ldm  # noqa: E402

MODELS_DIR = Path(os.environ.get("TOY_MODELS_DIR", REPO_ROOT / "models"))
CHECKPOINT = MODELS_DIR / "checkpoints" / "toy-shapes.safetensors"
CONTROLNET = MODELS_DIR / "controlnet" / "toy-shape-control.safetensors"
LORA = MODELS_DIR / "loras" / "toy-outline.safetensors"
LAYERS_PER_BLOCK = 2


def _fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to(torch.float16).contiguous() if value.is_floating_point() else value.contiguous()
            for key, value in state.items()}


def _metadata(description: str) -> dict[str, str]:
    times_path = WORK_DIR / "times.json"
    return {"description": description, "source": "latentloom tools/train_toy.py (procedural shapes dataset)",
            "training_times": times_path.read_text() if times_path.exists() else "{}"}


def pack_checkpoint() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = _fp16(UNet2DConditionModel.from_pretrained(WORK_DIR / "unet").state_dict())
    vae = _fp16(AutoencoderKL.from_pretrained(WORK_DIR / "vae").state_dict())
    text = _fp16(CLIPTextModel.from_pretrained(WORK_DIR / "text_encoder").state_dict())
    text.pop("embeddings.position_ids", None)
    single = convert.build_single_file(unet, LAYERS_PER_BLOCK, vae, [(convert.SD1_CLIP_PREFIX, "hf", text)])
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    save_file(single, CHECKPOINT, metadata=_metadata("toy-shapes: tiny SD1.5-architecture model, 64x64 shapes"))
    _verify_checkpoint(unet, vae, text)


def _same(what: str, expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    missing = [key for key in expected if key not in loaded]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} tensors missing after reload, e.g. {missing[:3]}")
    worst = max(float((loaded[key].float() - value.float()).abs().max()) for key, value in expected.items())
    if worst > 0:
        raise RuntimeError(f"{what}: reloaded weights differ (max |diff| {worst})")
    print(f"  {what}: {len(expected)} tensors identical after reload")


def _verify_checkpoint(unet, vae, text) -> None:
    from latentloom.nodes.diffusion.checkpoint import load_checkpoint

    loaded = load_checkpoint(CHECKPOINT)
    _same("UNet", unet, loaded.model.unet.state_dict())
    _same("VAE", vae, loaded.vae.autoencoder.state_dict())
    encoder = loaded.clip.encoders["l"]
    encoder_state = {key.removeprefix("text_model."): value for key, value in encoder.state_dict().items()}
    _same("CLIP", text, encoder_state)


def pack_controlnet() -> None:
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    model = ControlNetModel.from_pretrained(WORK_DIR / "controlnet")
    state = _fp16(model.state_dict())
    ldm = convert.with_prefix(controlnet_to_ldm(state), CONTROLNET_PREFIX)
    CONTROLNET.parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm, CONTROLNET, metadata=_metadata("toy-shape-control: ControlNet for toy-shapes, hint = shape mask"))
    back = convert_controlnet_checkpoint(load_file(str(CONTROLNET)), dict(model.config))
    _same("ControlNet (LDM -> diffusers)", state, back)


def pack_lora() -> None:
    tensors = load_file(str(WORK_DIR / "lora_outline.safetensors"))
    LORA.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, LORA, metadata=_metadata("toy-outline: LoRA for toy-shapes, draws outlined shapes"))
    print(f"  LoRA: {len(tensors)} tensors")


def main() -> None:
    pack_checkpoint()
    if (WORK_DIR / "controlnet").exists():
        pack_controlnet()
    if (WORK_DIR / "lora_outline.safetensors").exists():
        pack_lora()
    sizes = {str(p.relative_to(MODELS_DIR)): round(p.stat().st_size / 1e6, 2)
             for p in (CHECKPOINT, CONTROLNET, LORA) if p.exists()}
    print(json.dumps({"sizes_mb": sizes, "total_mb": round(sum(sizes.values()), 2)}, indent=2))


if __name__ == "__main__":
    main()
