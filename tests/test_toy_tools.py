"""The toy model's tools: the seeded shapes dataset, the geometric metrics, the LoRA naming, the ControlNet
LDM writer (fast; no trained weights needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import toy_dataset  # noqa: E402
import toy_metrics  # noqa: E402
from toy_common import kohya_state_dict, ldm_unet_module_path  # noqa: E402


def test_samples_are_deterministic_and_differ_between_seeds():
    a, b, c = toy_dataset.make_sample(7), toy_dataset.make_sample(7), toy_dataset.make_sample(8)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_caption_names_the_drawn_colour_shape_background_and_position():
    for sample in toy_dataset.iter_samples(60, start_seed=100):
        spec = sample.spec
        assert sample.caption.startswith("a ")
        assert f"{spec.colour} {spec.shape} on a {spec.background} background" in sample.caption
        assert spec.background != spec.colour
        if " at the " in sample.caption:
            assert sample.caption.endswith(f"at the {spec.position_word}")
        # The painted colour is the named one: the centre pixel of a filled shape.
        centre = sample.image[int(spec.centre[1]) + 2, int(spec.centre[0])]
        assert np.abs(centre.astype(int) - toy_dataset.SHAPE_COLOURS[spec.colour]).max() <= 1


def test_mask_covers_the_shape_bbox():
    sample = toy_dataset.make_sample(3)
    x0, y0, x1, y1 = sample.spec.bbox
    ys, xs = np.nonzero(sample.mask > 0.5)
    assert abs(xs.min() - x0) <= 1.5 and abs(xs.max() + 1 - x1) <= 1.5
    assert abs(ys.min() - y0) <= 1.5 and abs(ys.max() + 1 - y1) <= 1.5


@pytest.mark.parametrize("style", ["filled", "outline"])
def test_metrics_recover_ground_truth_colour_shape_and_position(style):
    count = 90
    right = {"colour": 0, "shape": 0, "centre": 0}
    for sample in toy_dataset.iter_samples(count, start_seed=10_000, style=style):
        analysis = toy_metrics.analyse(sample.image)
        right["colour"] += analysis.colour == sample.spec.colour
        right["shape"] += analysis.shape == sample.spec.shape
        cx, cy = toy_metrics.mask_centre(sample.mask)
        right["centre"] += np.hypot(analysis.centre[0] - cx, analysis.centre[1] - cy) < 2.5
    assert right["colour"] == count and right["centre"] == count
    assert right["shape"] >= (count if style == "filled" else 0.9 * count)


def test_fill_measure_separates_filled_from_outlined():
    filled = [toy_metrics.analyse(s.image).fill for s in toy_dataset.iter_samples(40, 500)]
    outline = [toy_metrics.analyse(s.image).fill for s in toy_dataset.iter_samples(40, 500, style="outline")]
    assert min(filled) > 0.95
    assert np.mean(outline) < 0.75


def test_metrics_on_float_image_and_empty_image():
    sample = toy_dataset.make_sample(11)
    assert toy_metrics.analyse(sample.image.astype(np.float32) / 255).shape == sample.spec.shape
    blank = np.full((64, 64, 3), 0.5, dtype=np.float32)
    analysis = toy_metrics.analyse(blank)
    assert analysis.shape is None and analysis.background == "gray"


def test_ldm_module_paths_follow_sd_block_numbering():
    assert ldm_unet_module_path("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    assert ldm_unet_module_path("down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_out.0") == \
        "input_blocks.8.1.transformer_blocks.0.attn2.to_out.0"
    assert ldm_unet_module_path("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k") == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k"
    assert ldm_unet_module_path("mid_block.attentions.0.transformer_blocks.0.attn1.to_v") == \
        "middle_block.1.transformer_blocks.0.attn1.to_v"


@pytest.mark.slow  # builds diffusers modules
def test_kohya_lora_keys_match_unet_modules_and_apply_the_formula():
    from toy_common import LoraLinear, apply_kohya_lora, build_unet, inject_lora

    torch.manual_seed(0)
    unet = build_unet()
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters = inject_lora(build_unet(), rank=4, alpha=2)
    for adapter in adapters.values():
        torch.nn.init.normal_(adapter.up.weight, std=0.1)
    tensors = kohya_state_dict(adapters, alpha=2)
    assert all(isinstance(a, LoraLinear) for a in adapters.values())
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in tensors
    assert apply_kohya_lora(unet, tensors, strength=0.5) == len(adapters) == len(tensors) // 3
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    key = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    expected = original[path + ".weight"] + 0.5 * (2 / 4) * (
        tensors[key + ".lora_up.weight"].float() @ tensors[key + ".lora_down.weight"].float())
    assert torch.allclose(unet.get_submodule(path).weight, expected, atol=1e-6)
    untouched = "down_blocks.0.resnets.0.conv1.weight"
    assert torch.equal(unet.state_dict()[untouched], original[untouched])


@pytest.mark.slow  # builds diffusers modules
def test_controlnet_ldm_writer_round_trips_through_diffusers_converter():
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from pack_toy import CONTROLNET_PREFIX, controlnet_to_ldm
    from toy_common import build_unet

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(build_unet())
    state = controlnet.state_dict()
    ldm = {CONTROLNET_PREFIX + k: v for k, v in controlnet_to_ldm(state).items()}
    assert "control_model.input_hint_block.14.weight" in ldm
    assert "control_model.zero_convs.11.0.weight" in ldm and "control_model.middle_block_out.0.bias" in ldm
    back = convert_controlnet_checkpoint(ldm, dict(controlnet.config))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_autoencoder_loss_weights_the_shape_and_its_rim():
    import train_toy

    sample = toy_dataset.make_sample(21)
    weights = train_toy._pixel_weights(sample.mask[None], foreground_weight=8.0)[0, 0]
    inside = sample.mask >= 0.99
    far = weights.new_tensor(np.ones_like(sample.mask)).bool()
    x0, y0, x1, y1 = (int(v) for v in sample.spec.bbox)
    far[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4] = False
    assert torch.all(weights[torch.from_numpy(inside)] == 9.0)
    assert torch.all(weights[far] == 1.0)
    # The same pixel error costs more on the shape than on the background.
    target = torch.zeros(1, 3, 64, 64)
    on_shape, off_shape = target.clone(), target.clone()
    ys, xs = np.nonzero(inside)
    on_shape[..., ys[0], xs[0]] = 0.5
    off_shape[..., 0, 0] = 0.5
    weight = weights[None, None]
    assert train_toy._reconstruction_loss(on_shape, target, weight) > \
        5 * train_toy._reconstruction_loss(off_shape, target, weight)
