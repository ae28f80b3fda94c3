"""Architectures, tokenizer and schedule shared by the toy model's training, evaluation and packing scripts.

The configurations keep SD1.5's topology (4 UNet levels, 2 layers per block, cross-attention in the first
three, 8 attention heads, conv proj_in/out; 4-block VAE with mid attention; CLIP with quick-gelu, 77
positions, the real 49408-token vocabulary) and shrink only the widths, so the shipped files load through the
same code paths as real SD1.5 checkpoints. CLIP keeps real CLIP's 64-dim attention heads (64 wide, 1 head).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Training progress and intermediate diffusers-format results (git-ignored); overridable for smoke runs.
WORK_DIR = Path(os.environ.get("TOY_WORK_DIR", REPO_ROOT / "work-training"))

TEXT_WIDTH = 64
UNET_CHANNELS = (32, 64, 64, 64)
VAE_CHANNELS = (32, 32, 64, 64)
VAE_LAYERS_PER_BLOCK = 1  # SD uses 2; 1 halves the full-resolution work, and the loaders read it from the keys
MAX_TOKENS = 77
BOS_ID, EOS_ID = 49406, 49407


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS, layers_per_block=VAE_LAYERS_PER_BLOCK, norm_num_groups=32, sample_size=64,
        scaling_factor=0.18215,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=UNET_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32,
    )


def build_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4, num_hidden_layers=2,
        num_attention_heads=TEXT_WIDTH // 64, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID, projection_dim=TEXT_WIDTH,
    )
    return CLIPTextModel(config)


def _bpe_archive() -> Path | None:
    candidates = [os.environ.get("CLIP_BPE_PATH", "")]
    candidates += [str(p) for p in REPO_ROOT.glob("nodes/**/bpe_simple_vocab_16e6.txt.gz")]
    candidates += ["/tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=False))


def load_tokenizer():
    """The real CLIP tokenizer (ids as openai/clip-vit-large-patch14): the engine's when it exists, else built
    from the BPE merges archive in a temporary folder."""
    import sys

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        from latentloom.nodes.diffusion.tokenizer import clip_tokenizer
        return clip_tokenizer()
    except ImportError:
        pass
    from transformers import CLIPTokenizer

    archive = _bpe_archive()
    if archive is None:
        raise FileNotFoundError("CLIP BPE merges (bpe_simple_vocab_16e6.txt.gz) not found; set CLIP_BPE_PATH")
    lines = gzip.open(archive).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [token + "</w>" for token in base] + ["".join(pair) for pair in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="clip_tok_"))
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """SD1 style: BOS + tokens + EOS, padded with EOS to 77 (no attention mask, as ComfyUI encodes)."""
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
    return torch.tensor(ids, dtype=torch.long)


def encode_prompts(text_encoder, token_ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state after the final layer norm (SD1's default layer), no padding mask."""
    return text_encoder(input_ids=token_ids).last_hidden_state


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's scaled-linear schedule in float64 (as ComfyUI builds it)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ------------------------------------------------------------------------------------------------------- LoRA

# The attention projections of every transformer block (self- and cross-attention), as kohya's LoRA trains them.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


class LoraLinear(torch.nn.Module):
    """base(x) + scale * up(down(x)); up starts at zero so training begins at the base model."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        torch.nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))


def inject_lora(unet: torch.nn.Module, rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Wrap every transformer-block projection named in LORA_TARGETS; returns {diffusers module path: wrapper}."""
    adapters: dict[str, LoraLinear] = {}
    for path, module in list(unet.named_modules()):
        if isinstance(module, torch.nn.Linear) and path.endswith(LORA_TARGETS) and ".transformer_blocks." in path:
            parent_path, _, child = path.rpartition(".")
            parent = unet.get_submodule(parent_path)
            wrapper = LoraLinear(module, rank, alpha).to(module.weight.device)
            setattr(parent, child, wrapper)
            adapters[path] = wrapper
    return adapters


def ldm_unet_module_path(diffusers_path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet path of a transformer module -> the LDM (original SD) path, e.g.
    down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q -> input_blocks.2.1.transformer_blocks.0.attn1.to_q"""
    parts = diffusers_path.split(".")
    per_level = layers_per_block + 1
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        prefix = f"input_blocks.{1 + int(parts[1]) * per_level + int(parts[3])}.1"
        rest = parts[4:]
    elif parts[0] == "up_blocks" and parts[2] == "attentions":
        prefix = f"output_blocks.{int(parts[1]) * per_level + int(parts[3])}.1"
        rest = parts[4:]
    elif parts[0] == "mid_block" and parts[1] == "attentions":
        prefix, rest = "middle_block.1", parts[3:]
    else:
        raise ValueError(f"not a UNet transformer module: {diffusers_path}")
    return ".".join([prefix, *rest])


def kohya_state_dict(adapters: dict[str, LoraLinear], alpha: float) -> dict[str, torch.Tensor]:
    """kohya / A1111 naming with LDM module names: lora_unet_<ldm path with _>.lora_down/.lora_up/.alpha (fp16)."""
    tensors: dict[str, torch.Tensor] = {}
    for path, adapter in sorted(adapters.items()):
        key = "lora_unet_" + ldm_unet_module_path(path).replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = adapter.down.weight.detach().cpu().to(torch.float16).contiguous()
        tensors[f"{key}.lora_up.weight"] = adapter.up.weight.detach().cpu().to(torch.float16).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
    return tensors


@torch.no_grad()
def apply_kohya_lora(unet: torch.nn.Module, tensors: dict[str, torch.Tensor], strength: float) -> int:
    """W += strength * alpha/rank * up @ down for every key of a kohya file made by kohya_state_dict (in place).
    Returns the number of patched modules."""
    by_key = {"lora_unet_" + ldm_unet_module_path(path).replace(".", "_"): path
              for path, module in unet.named_modules()
              if isinstance(module, torch.nn.Linear) and path.endswith(LORA_TARGETS) and ".transformer_blocks." in path}
    patched = 0
    for key, path in by_key.items():
        if f"{key}.lora_down.weight" not in tensors:
            continue
        down = tensors[f"{key}.lora_down.weight"].float()
        up = tensors[f"{key}.lora_up.weight"].float()
        alpha = float(tensors[f"{key}.alpha"]) if f"{key}.alpha" in tensors else down.shape[0]
        weight = unet.get_submodule(path).weight
        weight += (strength * alpha / down.shape[0] * (up @ down)).to(weight.dtype)
        patched += 1
    return patched
