"""Loader nodes on tiny random checkpoints written in the real single-file (LDM) layout."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from node_context import StubContext, make_env, run_node
from tiny_models import (
    FAMILIES,
    save_state,
    tiny_components,
    write_tiny_checkpoint,
    write_tiny_diffusers,
    write_tiny_text_encoder,
    write_tiny_unet,
    write_tiny_vae,
)

from latentloom.engine.environment import Environment
from latentloom.engine.memory import ModelManager
from latentloom.nodes.diffusion import checkpoint, convert, detect
from latentloom.nodes.loaders import (
    CheckpointLoaderSimple,
    CLIPLoader,
    DiffusersLoader,
    DualCLIPLoader,
    UNETLoader,
    VAELoader,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path) -> Environment:
    return make_env(models_dir=tmp_path / "models")


@pytest.fixture
def ctx(env) -> StubContext:
    return StubContext(env)


def models_dir(env: Environment, folder: str) -> Path:
    return env.model_dirs[folder][0]


def assert_same_weights(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert set(expected) == set(actual)
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert different == []


EXPECTED = {  # tiny family -> (family, prediction, UNet input channels, CLIP slots, variant)
    "sd1": ("sd1", "eps", 4, {"l"}, ""),
    "sd1_inpaint": ("sd1", "eps", 9, {"l"}, "inpaint"),
    "sd2": ("sd2", "eps", 4, {"h"}, ""),
    "sd2_v": ("sd2", "v", 4, {"h"}, ""),
    "sdxl": ("sdxl", "eps", 4, {"l", "g"}, ""),
    "sdxl_refiner": ("sdxl_refiner", "eps", 4, {"g"}, ""),
}


@pytest.mark.parametrize("tiny_family", FAMILIES)
def test_checkpoint_loader_detects_family_and_round_trips_weights(env, ctx, tiny_family):
    write_tiny_checkpoint(models_dir(env, "checkpoints") / f"{tiny_family}.safetensors", tiny_family, seed=3)
    model, clip, vae = CheckpointLoaderSimple.model_construct(ckpt_name=f"{tiny_family}.safetensors").run(ctx)
    family, prediction, in_channels, slots, variant = EXPECTED[tiny_family]
    assert (model.family, model.prediction, model.unet.config.in_channels) == (family, prediction, in_channels)
    assert model.options.get("variant", "") == variant
    assert clip.family == family and set(clip.encoders) == slots
    original = tiny_components(tiny_family, seed=3)
    assert_same_weights(original.unet, model.unet)
    assert_same_weights(original.vae, vae.autoencoder)
    for slot in slots:
        assert_same_weights(original.text_encoders[slot], clip.encoders[slot])
    expected_scale = 0.13025 if family.startswith("sdxl") else 0.18215
    assert model.latent_format.scale_factor == vae.latent_format.scale_factor == expected_scale
    assert ctx.warnings == []


@pytest.mark.parametrize("tiny_family", ["sd1", "sd2", "sdxl"])
def test_loaded_networks_compute_what_the_originals_compute(tmp_path, tiny_family):
    """Weights alone do not prove the architecture: heads, activations and projections must match too."""
    path = write_tiny_checkpoint(tmp_path / "model.safetensors", tiny_family, seed=1)
    loaded = checkpoint.load_checkpoint(path)
    original = tiny_components(tiny_family, seed=1)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, original.unet.config.cross_attention_dim, generator=generator)
    extra = {}
    if tiny_family == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}}
    with torch.no_grad():
        want = original.unet(latent, 500, context, **extra).sample
        got = loaded.model.unet(latent, 500, context, **extra).sample
        assert torch.equal(want, got)
        tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
        for slot, encoder in original.text_encoders.items():
            want_text = encoder(tokens, output_hidden_states=True)
            got_text = loaded.clip.encoders[slot](tokens, output_hidden_states=True)
            assert torch.equal(want_text.hidden_states[-2], got_text.hidden_states[-2])
            if slot in ("h", "g"):
                assert torch.equal(want_text.text_embeds, got_text.text_embeds)
        image = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
        want_latent = original.vae.encode(image).latent_dist.mean
        assert torch.equal(want_latent, loaded.vae.autoencoder.encode(image).latent_dist.mean)


def test_two_loader_nodes_on_one_file_share_the_networks(env, ctx):
    write_tiny_checkpoint(models_dir(env, "checkpoints") / "shared.safetensors", "sd1")
    first = CheckpointLoaderSimple.model_construct(ckpt_name="shared.safetensors").run(ctx)
    second = CheckpointLoaderSimple.model_construct(ckpt_name="shared.safetensors").run(ctx)
    assert first[0].unet is second[0].unet
    assert first[1].encoders is second[1].encoders
    assert first[2].autoencoder is second[2].autoencoder
    stats = env.models.stats()
    assert (stats.loads, stats.hits) == (1, 1)
    # A file replaced on disk (new mtime) is a different identity: loaded afresh.
    path = models_dir(env, "checkpoints") / "shared.safetensors"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    third = CheckpointLoaderSimple.model_construct(ckpt_name="shared.safetensors").run(ctx)
    assert third[0].unet is not first[0].unet


def test_checkpoint_fingerprint_follows_the_file(env):
    path = write_tiny_checkpoint(models_dir(env, "checkpoints") / "f.safetensors", "sd1")
    before = CheckpointLoaderSimple.fingerprint(env, {"ckpt_name": "f.safetensors"})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert CheckpointLoaderSimple.fingerprint(env, {"ckpt_name": "f.safetensors"}) != before
    assert CheckpointLoaderSimple.fingerprint(env, {"ckpt_name": "missing.safetensors"}) is None


def test_ckpt_pickle_of_tensors_loads_like_safetensors(tmp_path):
    components = tiny_components("sd1", seed=2)
    from tiny_models import checkpoint_state

    path = save_state(checkpoint_state(components), tmp_path / "model.ckpt")
    loaded = checkpoint.load_checkpoint(path)
    assert_same_weights(components.unet, loaded.model.unet)


class _Exploit:
    """Pickles to a call of open(marker, "w"): loading it unsafely would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_never_executed(env, ctx):
    marker = env.model_dirs["checkpoints"][0].parent / "pwned.txt"
    path = models_dir(env, "checkpoints") / "evil.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, path)
    with pytest.raises(ValueError) as raised:
        run_node(CheckpointLoaderSimple, ctx, ckpt_name="evil.ckpt")
    message = str(raised.value)
    assert "ckpt_name" in message and "evil.ckpt" in message and "refused" in message
    assert not marker.exists()


def test_broken_and_unknown_files_name_the_input_and_file(env, ctx):
    folder = models_dir(env, "checkpoints")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(ValueError,
                       match=r"CheckpointLoaderSimple \(#1\): input 'ckpt_name': broken.safetensors: not a readable"):
        run_node(CheckpointLoaderSimple, ctx, ckpt_name="broken.safetensors")
    save_state({"some.layer.weight": torch.zeros(4, 4)}, folder / "other.safetensors")
    with pytest.raises(ValueError, match=r"CheckpointLoaderSimple \(#1\): input 'ckpt_name': other.safetensors.*"
                                         r"unknown or unsupported"):
        run_node(CheckpointLoaderSimple, ctx, ckpt_name="other.safetensors")
    with pytest.raises(FileNotFoundError, match=r"CheckpointLoaderSimple \(#1\): input 'ckpt_name': checkpoints "
                                                r"file 'absent.safetensors' not found"):
        run_node(CheckpointLoaderSimple, ctx, ckpt_name="absent.safetensors")
    assert env.models.loaded_keys() == []


def test_diffusers_folder_loads(env, ctx):
    write_tiny_diffusers(models_dir(env, "diffusers") / "tiny-sdxl", "sdxl", seed=4)
    assert env.list_models("diffusers") == ["tiny-sdxl"]
    model, clip, vae = DiffusersLoader.model_construct(model_path="tiny-sdxl").run(ctx)
    original = tiny_components("sdxl", seed=4)
    assert (model.family, model.prediction, clip.family) == ("sdxl", "eps", "sdxl")
    assert_same_weights(original.unet, model.unet)
    assert_same_weights(original.vae, vae.autoencoder)
    assert_same_weights(original.text_encoders["g"], clip.encoders["g"])


def test_diffusers_sd2_text_encoder_gets_an_identity_top_layer(tmp_path):
    directory = write_tiny_diffusers(tmp_path / "sd2", "sd2_v", seed=0)
    loaded = checkpoint.load_diffusers_folder(directory)
    assert (loaded.model.family, loaded.model.prediction) == ("sd2", "v")
    encoder = loaded.clip.encoders["h"]
    tokens = torch.tensor([[49406, 320, 1125, 49407] + [0] * 73])
    with torch.no_grad():
        hidden = encoder(tokens, output_hidden_states=True).hidden_states
    # The appended layer passes its input through: penultimate (ComfyUI's SD2 default) = diffusers' last.
    assert torch.equal(hidden[-1], hidden[-2])


def test_unet_vae_and_clip_loaders_on_component_files(env, ctx):
    write_tiny_unet(models_dir(env, "unet") / "unet.safetensors", "sd2_v", seed=5)
    write_tiny_vae(models_dir(env, "vae") / "vae-ldm.safetensors", "sd1", seed=5)
    write_tiny_vae(models_dir(env, "vae") / "vae-diffusers.safetensors", "sd1", seed=5, ldm_names=False)
    write_tiny_text_encoder(models_dir(env, "clip") / "clip_l.safetensors", "sdxl", "l", seed=5)
    write_tiny_text_encoder(models_dir(env, "clip") / "clip_g.safetensors", "sdxl", "g", seed=5)
    original_sd2, original_sd1, original_xl = (tiny_components(f, seed=5) for f in ("sd2_v", "sd1", "sdxl"))

    (model,) = UNETLoader.model_construct(unet_name="unet.safetensors", weight_dtype="default").run(ctx)
    assert (model.family, model.prediction) == ("sd2", "v")
    assert_same_weights(original_sd2.unet, model.unet)
    for name in ("vae-ldm.safetensors", "vae-diffusers.safetensors"):
        (vae,) = VAELoader.model_construct(vae_name=name).run(ctx)
        assert_same_weights(original_sd1.vae, vae.autoencoder)
    (clip,) = CLIPLoader.model_construct(clip_name="clip_l.safetensors", type="stable_diffusion").run(ctx)
    assert clip.family == "sd1"
    assert_same_weights(original_xl.text_encoders["l"], clip.encoders["l"])
    (dual,) = DualCLIPLoader.model_construct(clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors",
                                             type="sdxl").run(ctx)
    assert dual.family == "sdxl"
    assert_same_weights(original_xl.text_encoders["g"], dual.encoders["g"])
    with pytest.raises(ValueError, match=r"DualCLIPLoader \(#1\): input 'type': 'hunyuan_video' text encoders "):
        run_node(DualCLIPLoader, ctx, clip_name1="clip_g.safetensors", clip_name2="clip_l.safetensors",
                 type="hunyuan_video")
    (fp8,) = UNETLoader.model_construct(unet_name="unet.safetensors", weight_dtype="fp8_e4m3fn").run(ctx)
    assert fp8.unet.conv_in.weight.dtype == torch.float8_e4m3fn  # kept in fp8, cast per call (test_weight_storage)


def test_non_standard_widths_and_depths_are_read_from_shapes():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 96, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=32).eval()
    state = convert.with_prefix(convert.unet_to_ldm(unet.state_dict(), 1), convert.UNET_PREFIX)
    found = detect.detect_checkpoint(state)
    assert found.family == "sd1"
    assert found.unet.block_out_channels == (64, 96, 128)
    assert (found.unet.layers_per_block, found.unet.context_dim) == (1, 48)
    assert found.unet.transformer_depth == (1, 1, 0)
    rebuilt = checkpoint.build_unet(state, found.unet, found.family, torch.float32)
    assert_same_weights(unet, rebuilt)


def test_sidecar_yaml_sets_the_prediction(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "model.safetensors", "sd1")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert checkpoint.load_checkpoint(path).model.prediction == "v"


def test_loading_never_touches_the_network(env, ctx, monkeypatch):
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    write_tiny_checkpoint(models_dir(env, "checkpoints") / "offline.safetensors", "sdxl")
    write_tiny_diffusers(models_dir(env, "diffusers") / "offline", "sd1")
    CheckpointLoaderSimple.model_construct(ckpt_name="offline.safetensors").run(ctx)
    DiffusersLoader.model_construct(model_path="offline").run(ctx)
    assert attempts == []


def test_lightning_ckpt_with_callback_objects_loads(tmp_path, monkeypatch):
    """Original .ckpt files pickle a Lightning ModelCheckpoint beside the weights; it is admitted inert."""
    import sys
    import types

    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    callback_class = type("ModelCheckpoint", (), {"__module__": module_name})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[module_name].ModelCheckpoint = callback_class
    callback = callback_class()
    callback.monitor = "val/loss"
    from tiny_models import checkpoint_state

    state = checkpoint_state(tiny_components("sd1", seed=0))
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": state, "callbacks": {callback_class: callback}, "global_step": 5}, path)
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module_name):
        monkeypatch.delitem(sys.modules, name)
    assert set(checkpoint.read_state_dict(path)) == set(state)


def test_txt2img_graph_runs_through_the_engine_on_a_tiny_checkpoint(tmp_path):
    from latentloom import nodes

    write_tiny_checkpoint(tmp_path / "models" / "checkpoints" / "tiny.safetensors", "sd1")
    (tmp_path / "models" / "checkpoints" / "bad.safetensors").write_bytes(b"not weights")
    engine = nodes.create_engine(models_dir=tmp_path / "models", input_dir=tmp_path / "in",
                                 output_dir=tmp_path / "out", temp_dir=tmp_path / "tmp", entry_points=False)
    engine.env.register(ModelManager(device="cpu"))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "9": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["9", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiny"}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    assert (tmp_path / "out" / "tiny_00001_.png").is_file()
    stats = engine.env.models.stats()
    assert (stats.loads, len(stats.entries)) == (1, 1)  # both loader nodes got the one loaded checkpoint

    broken = {**prompt, "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "bad.safetensors"}}}
    result = engine.run(broken)
    assert result.status == "error"
    assert result.error["node_id"] == "1"
    assert result.error["exception_message"].startswith("CheckpointLoaderSimple (#1): input 'ckpt_name': "
                                                        "bad.safetensors: ")


def test_fingerprint_changes_when_the_manager_dropped_the_models(env, ctx):
    """Cached outputs holding evicted weights must not be served: the loader's fingerprint moves on a drop."""
    write_tiny_checkpoint(models_dir(env, "checkpoints") / "c.safetensors", "sd1")
    write_tiny_text_encoder(models_dir(env, "clip") / "l.safetensors", "sd1", "l")
    manager = env.models
    checkpoint_inputs = {"ckpt_name": "c.safetensors"}
    clip_inputs = {"clip_name": "l.safetensors", "type": "stable_diffusion"}
    CheckpointLoaderSimple.model_construct(**checkpoint_inputs).run(ctx)
    CLIPLoader.model_construct(**clip_inputs).run(ctx)
    before = (CheckpointLoaderSimple.fingerprint(env, checkpoint_inputs), CLIPLoader.fingerprint(env, clip_inputs))
    assert before == (CheckpointLoaderSimple.fingerprint(env, checkpoint_inputs),
                      CLIPLoader.fingerprint(env, clip_inputs))  # stable while loaded
    manager.free_all()
    assert CheckpointLoaderSimple.fingerprint(env, checkpoint_inputs) != before[0]
    assert CLIPLoader.fingerprint(env, clip_inputs) != before[1]
