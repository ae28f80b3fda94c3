"""Architecture detection on full-size SD1.5 / SD2.1 / SDXL / SDXL-refiner layouts.

The networks are built on the meta device (shapes only, no memory), written in LDM names with our writer, and
detection must rebuild the configs the real models ship with (heads, depths, widths, conditioning).
"""

from __future__ import annotations

import pytest
import torch

from latentloom.nodes.diffusion import convert, detect

REAL_UNETS = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sd21": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                 attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
    "refiner": dict(block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280,
                    attention_head_dim=(6, 12, 24, 24), use_linear_projection=True, transformer_layers_per_block=4,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2560),
}
FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl", "refiner": "sdxl_refiner"}


# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


def meta_unet(name: str, in_channels: int = 4) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(in_channels=in_channels, layers_per_block=2, **REAL_UNETS[name])


def as_list(value, length):
    return list(value) if isinstance(value, (list, tuple)) else [value] * length


@pytest.mark.parametrize("name", list(REAL_UNETS))
def test_real_unet_layouts_give_back_their_diffusers_config(name):
    unet = meta_unet(name)
    ldm = convert.unet_to_ldm(unet.state_dict(), 2)
    shape = detect.read_unet_shape(ldm, "")
    family = detect.unet_family(shape)
    assert family == FAMILY[name]
    config = detect.unet_config(shape, family)
    levels = len(unet.config.block_out_channels)
    assert config["block_out_channels"] == list(unet.config.block_out_channels)
    assert config["down_block_types"] == list(unet.config.down_block_types)
    assert config["up_block_types"] == list(unet.config.up_block_types)
    assert config["attention_head_dim"] == as_list(unet.config.attention_head_dim, levels)
    assert config["cross_attention_dim"] == unet.config.cross_attention_dim
    assert config["use_linear_projection"] == unet.config.use_linear_projection
    assert config.get("projection_class_embeddings_input_dim") == unet.config.projection_class_embeddings_input_dim
    wanted_depth = as_list(unet.config.transformer_layers_per_block, levels)
    for level, is_attention in enumerate(t.startswith("CrossAttn") for t in config["down_block_types"]):
        if is_attention:
            assert config["transformer_layers_per_block"][level] == wanted_depth[level]
    # The rebuilt network has exactly the original's parameter names and shapes.
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        rebuilt = UNet2DConditionModel(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in unet.state_dict().items()}


def test_inpaint_and_pix2pix_inputs_are_variants_of_sd1():
    for channels, variant in ((9, "inpaint"), (8, "instruct_pix2pix")):
        ldm = convert.with_prefix(convert.unet_to_ldm(meta_unet("sd15", channels).state_dict(), 2),
                                  convert.UNET_PREFIX)
        found = detect.detect_checkpoint(ldm)
        assert (found.family, found.variant, found.unet.in_channels) == ("sd1", variant, channels)


def test_sdxl_v_prediction_marker_and_edm_refusal():
    ldm = convert.with_prefix(convert.unet_to_ldm(meta_unet("sdxl").state_dict(), 2), convert.UNET_PREFIX)
    assert detect.detect_checkpoint(ldm).prediction == "eps"
    assert detect.detect_checkpoint({**ldm, "v_pred": torch.tensor([])}).prediction == "v"
    zero_snr = detect.detect_checkpoint({**ldm, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    assert zero_snr.prediction == "v" and "zero-terminal-SNR" in zero_snr.notes[0]
    with pytest.raises(detect.UnknownArchitecture, match="EDM"):
        detect.detect_checkpoint({**ldm, "edm_mean": torch.zeros(4)})


@pytest.mark.parametrize("slot,width,layers,inner,projection", [
    ("l", 768, 12, 3072, None), ("h", 1024, 24, 4096, 1024), ("g", 1280, 32, 5120, 1280)])
def test_real_text_encoder_layouts(slot, width, layers, inner, projection):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, intermediate_size=inner,
                            num_attention_heads=width // 64, projection_dim=projection or 768)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    layout = "hf" if slot == "l" else "open_clip"
    state = (convert.clip_to_hf_legacy if layout == "hf" else convert.clip_to_open_clip)(model.state_dict())
    shape = detect.read_text_encoder_shape(convert.with_prefix(state, "te."), "te.")
    assert (shape.layout, shape.hidden_size, shape.num_layers, shape.intermediate_size, shape.projection_dim) == \
        (layout, width, layers, inner, projection)
    built = detect.text_encoder_config(shape, slot)
    assert built["num_attention_heads"] == width // 64
    assert built["hidden_act"] == ("quick_gelu" if slot == "l" else "gelu")


def test_unknown_layouts_are_refused():
    with pytest.raises(detect.UnknownArchitecture, match="no diffusion UNet"):
        detect.detect_checkpoint({"some.weight": torch.zeros(1)})
    ldm = convert.with_prefix(convert.unet_to_ldm(meta_unet("sd15", 6).state_dict(), 2), convert.UNET_PREFIX)
    with pytest.raises(detect.UnknownArchitecture, match="6 input channels"):
        detect.detect_checkpoint(ldm)
