"""Tiny random-weight Qwen-Image components (transformer, Wan 2.1 VAE, Qwen2.5-VL text encoder, BPE tokenizer),
and writers for the ORIGINAL single-file layouts ComfyUI users download."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>")
# Qwen2's pre-tokenizer split (a fact about its tokenizer), so the tiny vocabulary splits text the same way.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
TEXT_WIDTH = 256  # two 128-wide heads, Qwen2.5-VL's head width


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return module.eval()


def tiny_qwen_transformer(seed: int = 0) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return _perturb(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(16, 56, 56)), seed)


def tiny_qwen_vae(seed: int = 0) -> torch.nn.Module:
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return _perturb(AutoencoderKLQwenImage(base_dim=8, z_dim=16), seed, 0.02)


def vision_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Qwen2_5_VLConfig's special token ids, as the tiny tokenizer numbers them (no video: the pad of text)."""
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    return {"image_token_id": vocab["<|image_pad|>"], "vision_start_token_id": vocab["<|vision_start|>"],
            "vision_end_token_id": vocab["<|vision_end|>"], "video_token_id": vocab["<|endoftext|>"]}


def tiny_qwen_text_encoder(vocab_size: int, seed: int = 0, token_ids: dict[str, int] | None = None) \
        -> torch.nn.Module:
    """Qwen2.5-VL, text and vision, a few layers. The vision tower keeps what ComfyUI fixes rather than reads from
    the weights (16 heads, windows of 112 pixels, full attention in block 7), with 8 blocks so one is global."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": TEXT_WIDTH, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
                     "bos_token_id": None, "eos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]}},
        vision_config={"depth": 8, "hidden_size": 128, "intermediate_size": 64, "num_heads": 16,
                       "out_hidden_size": TEXT_WIDTH, "fullatt_block_indexes": [7, 15, 23, 31],
                       "window_size": 112},
        vocab_size=vocab_size, **(token_ids or {}))
    return _perturb(Qwen2_5_VLForConditionalGeneration(config), seed, 0.02)


def qwen_text_original(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's original names, as in ComfyUI's qwen_2.5_vl_7b.safetensors: model.* (language model),
    visual.*, lm_head.*."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.visual."):
            key = key[len("model."):]
        out[key] = value
    return out


def wan_vae_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """AutoencoderKLQwenImage names -> the original Wan 2.1 VAE names of ComfyUI's qwen_image_vae.safetensors."""
    residual = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                "conv2": "residual.6", "conv_shortcut": "shortcut"}

    def resnet(rest: str) -> str:
        for name, original in residual.items():
            if rest == name or rest.startswith(name + "."):
                return original + rest[len(name):]
        raise KeyError(rest)

    out = {}
    for key, value in vae.state_dict().items():
        parts = key.split(".")
        side = parts[0]
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            new = ("conv1." if key.startswith("quant_conv.") else "conv2.") + parts[-1]
        elif parts[1] in ("conv_in", "conv_out", "norm_out"):
            new = f"{side}." + {"conv_in": "conv1", "conv_out": "head.2", "norm_out": "head.0"}[parts[1]] + "." + \
                ".".join(parts[2:])
        elif parts[1] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[2]}.{parts[3]}"]
            rest = ".".join(parts[4:])
            new = f"{side}.middle.{index}." + (rest if parts[2] == "attentions" else resnet(rest))
        elif parts[1] == "down_blocks":
            rest = ".".join(parts[3:])
            keep = rest.startswith(("resample.", "time_conv."))
            new = f"encoder.downsamples.{parts[2]}." + (rest if keep else resnet(rest))
        elif parts[1] == "up_blocks":
            block = int(parts[2])
            if parts[3] == "upsamplers":
                new = f"decoder.upsamples.{4 * block + 3}." + ".".join(parts[5:])
            else:
                new = f"decoder.upsamples.{4 * block + int(parts[4])}." + resnet(".".join(parts[5:]))
        else:
            raise KeyError(key)
        out[new] = value
    return out


def write_tiny_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE with Qwen2's split and chat special tokens, trained on the prompt templates, saved
    as ComfyUI's qwen25_tokenizer folder is laid out (vocab.json, merges.txt, tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from latentloom.nodes.diffusion.qwen_text import EDIT_TEMPLATE, IMAGE_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    # Enough of each template that its words merge whole: the heads then count as with Qwen's vocabulary (34 and
    # 64 tokens, diffusers' fixed cuts).
    corpus = ([IMAGE_TEMPLATE.format("a photo of a red cat on a table")] * 20 + [EDIT_TEMPLATE.format("")] * 20
              + ["user\n"] * 50 + ["a photo of a cat, a dog and a blue sky"] * 5)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(TOKENIZER_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    added = {str(vocab[token]): {"content": token, "special": True, "lstrip": False, "rstrip": False,
                                 "normalized": False, "single_word": False} for token in TOKENIZER_SPECIALS}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "unk_token": None, "bos_token": None, "added_tokens_decoder": added}))
    return folder


def tokenizer_vocab_size(folder: Path) -> int:
    return len(json.loads((folder / "vocab.json").read_text()))
