"""The Canny preprocessor node: edges where the image changes, nothing elsewhere, ComfyUI's inputs."""

from __future__ import annotations

import pytest
import torch
from node_context import StubContext, make_env, run_node

from latentloom.engine.registry import node_info
from latentloom.nodes.preprocessors import Canny


def square_image(batch=1, height=48, width=56, box=(12, 36, 14, 42), value=1.0):
    image = torch.zeros((batch, height, width, 3))
    top, bottom, left, right = box
    image[:, top:bottom, left:right] = value
    return image


def run(image, low=0.4, high=0.8):
    return run_node(Canny, StubContext(make_env()), image=image, low_threshold=low, high_threshold=high)[0]


def test_edges_lie_on_the_square_outline_only():
    edges = run(square_image())
    assert edges.shape == (1, 48, 56, 3) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 1]) and torch.equal(edges[..., 0], edges[..., 2])
    mask = edges[0, ..., 0] > 0
    rows, cols = torch.nonzero(mask, as_tuple=True)
    # Every edge pixel is within 2 px of the square's border, and every side of the square has edges.
    near_border = ((rows - 12).abs() <= 2) | ((rows - 35).abs() <= 2) | ((cols - 14).abs() <= 2) | \
                  ((cols - 41).abs() <= 2)
    assert bool(near_border.all())
    assert mask[11:14, 20:36].any() and mask[34:38, 20:36].any() and mask[18:30, 12:16].any() and \
        mask[18:30, 40:44].any()
    assert not mask[16:32, 18:38].any()  # flat interior
    assert not mask[:8].any() and not mask[:, :8].any()  # flat background


def test_flat_image_has_no_edges_and_batches_are_independent():
    flat = torch.full((1, 32, 32, 3), 0.5)
    assert run(flat).sum() == 0
    both = run(torch.cat([flat, square_image(height=32, width=32, box=(8, 24, 8, 24))]))
    assert both[0].sum() == 0 and both[1].sum() > 0
    # (Not bit-identical to a batch of one: kornia's batched convolutions round differently at the square's
    # exact diagonal ties, in ComfyUI too.)
    assert both[1].sum() == run(square_image(height=32, width=32, box=(8, 24, 8, 24))).sum()


def test_thresholds_decide_which_contrasts_count():
    faint = square_image(value=0.3)          # a weak step
    assert run(faint, 0.05, 0.1).sum() > 0
    assert run(faint, 0.6, 0.9).sum() == 0
    strong_edges = run(square_image(), 0.05, 0.1).sum()
    assert run(square_image(), 0.6, 0.9).sum() <= strong_edges


def test_alpha_and_grey_images_are_accepted():
    rgba = torch.cat([square_image(), torch.ones((1, 48, 56, 1))], dim=-1)
    assert torch.equal(run(rgba), run(square_image()))
    assert run(square_image()[..., :1]).shape == (1, 48, 56, 3)


def test_bad_inputs_name_the_node_input():
    with pytest.raises(ValueError, match=r"Canny \(#1\): input 'low_threshold': 0.8 must not exceed "
                                         r"'high_threshold' \(0.4\)"):
        run(square_image(), 0.8, 0.4)
    with pytest.raises(ValueError, match=r"Canny \(#1\): input 'image': "):
        run(torch.zeros((1, 8, 8, 2)))


def test_catalogue_matches_comfyui():
    info = node_info(Canny)
    required = info["input"]["required"]
    assert list(required) == ["image", "low_threshold", "high_threshold"]
    assert required["low_threshold"][1]["default"] == 0.4 and required["high_threshold"][1]["default"] == 0.8
    assert required["low_threshold"][1]["min"] == 0.01 and required["high_threshold"][1]["max"] == 0.99
    assert info["output"] == ["IMAGE"] and info["category"] == "image/preprocessors"
