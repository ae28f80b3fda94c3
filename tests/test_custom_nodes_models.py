"""Custom node packs that work on MODEL / CLIP / VAE the ComfyUI way (tests/custom_node_packs/v1_models.py), on a
tiny SD1 checkpoint: `m = model.clone(); m.set_model_attn1_patch(fn)` changes sampling only on its branch and as
the built-in node doing the same maths does; clip.tokenize + encode_from_tokens(_scheduled) and vae.encode /
decode give what CLIPTextEncode / VAEEncode / VAEDecode give."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from branch_graphs import branches_graph, probed_latents  # noqa: E402
from sd_probe_nodes import LatentProbe  # noqa: E402
from tiny_models import write_tiny_checkpoint  # noqa: E402

from latentloom.nodes import create_engine  # noqa: E402
from tests.test_custom_nodes import PACKS, preview, texts  # noqa: E402

# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_models")
    write_tiny_checkpoint(root / "models" / "checkpoints" / "sd1.safetensors", family="sd1", seed=0)
    engine = create_engine(models_dir=root / "models", input_dir=root / "input", output_dir=root / "out",
                           temp_dir=root / "temp", custom_nodes_dir=PACKS, entry_points=False)
    engine.registry.register(LatentProbe)
    return engine


def test_a_pack_attention_patch_changes_only_its_branch(engine):
    pack = branches_graph({"patch": {"class_type": "PackSelfAttentionScale",
                                     "inputs": {"model": ["ckpt", 0], "scale": 2.0}}}, "patch")
    both = probed_latents(engine.run(pack))
    plain = probed_latents(engine.run(branches_graph({}, None)))["plain"]
    assert torch.equal(both["plain"], plain)
    assert (both["patched"] - plain).abs().max() > 1e-3
    # Scaling the self-attention values by 2 is what the built-in node does through the value weights.
    builtin = probed_latents(engine.run(branches_graph({"patch": {
        "class_type": "UNetSelfAttentionMultiply",
        "inputs": {"model": ["ckpt", 0], "q": 1.0, "k": 1.0, "v": 2.0, "out": 1.0}}}, "patch")))
    torch.testing.assert_close(both["patched"], builtin["patched"], atol=1e-4, rtol=1e-4)
    # A scale of 1 leaves the model as it was.
    unchanged = branches_graph({"patch": {"class_type": "PackSelfAttentionScale",
                                          "inputs": {"model": ["ckpt", 0], "scale": 1.0}}}, "patch")
    torch.testing.assert_close(probed_latents(engine.run(unchanged))["patched"], plain)
    # A pack that patches a model and samples through nodes.common_ksampler gets the same patched latent.
    sampled = branches_graph({}, None)
    sampled["patched"] = {"class_type": "PackPatchedSampler", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "seed": 3, "steps": 3, "scale": 2.0}}
    sampled["probe_patched"] = {"class_type": "LatentProbe", "inputs": {"samples": ["patched", 0],
                                                                        "label": "patched"}}
    assert torch.equal(probed_latents(engine.run(sampled))["patched"], both["patched"])


def test_model_objects_packs_read(engine):
    result = engine.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
                         "facts": {"class_type": "PackModelFacts", "inputs": {"model": ["ckpt", 0]}},
                         "show": preview("facts")})
    assert result.status == "success", result.error
    sigma_max, sigma_min, scale, leaked, kept = texts(result)["show"][0].split("|")
    assert (sigma_max, sigma_min, scale) == ("14.615", "0.0292", "0.18215")  # SD1's schedule and latent format
    assert (leaked, kept) == ("False", "True")  # model_options edits on a clone stay on the clone


@pytest.mark.parametrize("scheduled", [False, True])
def test_clip_tokenize_and_encode_from_tokens_match_clip_text_encode(engine, scheduled):
    reference = probed_latents(engine.run(branches_graph({}, None)))["plain"]
    graph = branches_graph({}, None)
    graph["pos"] = {"class_type": "PackEncodeTokens",
                    "inputs": {"clip": ["ckpt", 1], "text": "a red square", "scheduled": scheduled}}
    assert torch.equal(probed_latents(engine.run(graph))["plain"], reference)
    graph["pos"]["inputs"]["text"] = "a blue circle"
    assert not torch.equal(probed_latents(engine.run(graph))["plain"], reference)


def test_vae_encode_and_decode_match_the_core_nodes(engine):
    vae = ["ckpt", 2]
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.safetensors"}},
        "image": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 24, "batch_size": 1,
                                                         "color": 0x3366CC}},
        "trip": {"class_type": "PackVAERoundTrip", "inputs": {"vae": vae, "image": ["image", 0]}},
        "encoded": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": vae}},
        "decoded": {"class_type": "VAEDecode", "inputs": {"samples": ["encoded", 0], "vae": vae}},
        # The decoded images compared through one more encode each (a probe shows latents).
        "pack_again": {"class_type": "VAEEncode", "inputs": {"pixels": ["trip", 1], "vae": vae}},
        "core_again": {"class_type": "VAEEncode", "inputs": {"pixels": ["decoded", 0], "vae": vae}},
        "probe_pack": {"class_type": "LatentProbe", "inputs": {"samples": ["trip", 0], "label": "pack"}},
        "probe_core": {"class_type": "LatentProbe", "inputs": {"samples": ["encoded", 0], "label": "core"}},
        "probe_pack_again": {"class_type": "LatentProbe", "inputs": {"samples": ["pack_again", 0],
                                                                     "label": "pack_again"}},
        "probe_core_again": {"class_type": "LatentProbe", "inputs": {"samples": ["core_again", 0],
                                                                     "label": "core_again"}},
        "ratio": preview("trip", 2)}
    result = engine.run(graph)
    assert result.outputs.pop("ratio") == {"text": ["8"]}  # spacial_compression_encode()
    latents = probed_latents(result)
    assert latents["pack"].shape == (1, 4, 3, 4)
    assert torch.equal(latents["pack"], latents["core"])
    assert torch.equal(latents["pack_again"], latents["core_again"])
