"""LoRA training (nodes/training.py, nodes/diffusion/training.py) on tiny random models: the trained factors read
back through our LoRA parser as the very ΔW that was trained, the first loss equals the model's error written
out by hand (σ from the schedule formula, x0 from the ε prediction), the input model never changes and gradient
checkpointing gives the same result, the folder loaders follow ComfyUI's resize rules and captions, and a graph
trains, saves, plots and reloads (LoraLoader on the saved file gives the images of the trained model).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_support import tiny_objects
from node_context import StubContext, make_env, run_node
from PIL import Image
from tiny_models import write_tiny_checkpoint

from latentloom.engine.inputs import InputError
from latentloom.nodes import create_engine
from latentloom.nodes.diffusion import lora as lora_math
from latentloom.nodes.diffusion import training
from latentloom.nodes.training import (
    LoadImageSetFromFolderNode,
    LoadImageTextSetFromFolderNode,
    LoraModelLoader,
    LossGraphNode,
    SaveLoRANode,
    TrainLoraNode,
)
from latentloom.server.cli import main

# Each test builds and runs tiny diffusers UNets (or whole graphs on them): seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    return tiny_objects("sd1", seed=3)


def conditioning(clip, text):
    cond, pooled = clip.encode(text)
    return [cond, {"pooled_output": pooled}]


def fp32_settings(**changes):
    values = dict(batch_size=2, steps=3, learning_rate=0.01, rank=2, seed=5, training_dtype=torch.float32,
                  lora_dtype=torch.float32, gradient_checkpointing=False)
    values.update(changes)
    return training.TrainSettings(**values)


# Values of LyCORIS's function (its docstring table says 12 x 30 for 360 by 16; the code gives 15 x 24).
@pytest.mark.parametrize(("dimension", "factor", "expected"), [
    (127, 4, (1, 127)), (128, 4, (4, 32)), (128, -1, (8, 16)), (250, 8, (5, 50)), (250, -1, (10, 25)),
    (360, 16, (15, 24)), (512, 2, (2, 256)), (1024, 16, (16, 64)), (1024, -1, (32, 32)),
])
def test_lokr_factorization_follows_lycoris(dimension, factor, expected):
    assert training.factorization(dimension, factor) == expected


@pytest.mark.parametrize("algorithm", ["LoRA", "LoHa", "LoKr"])
def test_trained_factors_read_back_as_the_trained_weight_change(tiny, algorithm):
    model, _ = tiny
    adapters = training.create_adapters(model.unet, algorithm, rank=2, seed=0, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, adapter in adapters.values():
            for parameter in adapter.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    linear_and_conv = {f"{name}.weight" for name, m in model.unet.named_modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert linear_and_conv <= set(adapters)
    state = training.lora_state(adapters, torch.float32)
    assert all(key.startswith("diffusion_model.") for key in state)
    parsed = lora_math.parse_lora(state, lora_math.key_map_unet(model.unet))
    assert not parsed.unmatched and not parsed.unusable
    assert len(parsed.adapters) == len(adapters)
    for target, adapter in parsed.adapters:
        weight = model.unet.get_parameter(target.parameter)
        expected_kind = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr"}[algorithm] if weight.ndim > 1 else "diff"
        assert adapter.kind == expected_kind
        change, scale = adapter.delta(weight.shape, weight.device)
        trained = adapters[target.parameter][1].delta().reshape(weight.shape)
        torch.testing.assert_close(change * scale, trained, rtol=1e-5, atol=1e-6)


def _sd_sigma_table() -> torch.Tensor:
    """SD1's discrete schedule written out: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def test_first_loss_is_the_models_x0_error_at_the_drawn_sigma(tiny):
    model, clip = tiny
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(9))
    positive = [conditioning(clip, "a red circle"), conditioning(clip, "a blue square")]
    settings = fp32_settings(steps=1, optimizer="SGD")
    result = training.train_lora(model, latents, positive, settings)

    # The same draws, by hand: sample order, then one uniform fraction per sample; noise seeded with the seed.
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(2, generator=generator).tolist()
    fractions = [torch.rand((), generator=generator).item() for _ in order]
    table = _sd_sigma_table()
    sigmas = []
    for fraction in fractions:  # σ at timestep (1 − p)·999, interpolated in log σ
        t = (1 - fraction) * 999
        low = int(math.floor(t))
        w = t - low
        sigmas.append(math.exp((1 - w) * table[low].log().item() + w * table[min(low + 1, 999)].log().item()))
    clean = latents[order] * 0.18215
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(settings.seed))
    sigma = torch.tensor(sigmas, dtype=torch.float32).view(-1, 1, 1, 1)
    noisy = clean + noise * sigma
    timesteps = torch.tensor([(table.log() - math.log(s)).abs().argmin().item() for s in sigmas], dtype=torch.float32)
    context = torch.cat([positive[i][0] for i in order])
    with torch.no_grad():
        eps = model.unet(noisy / (sigma ** 2 + 1).sqrt(), timesteps, encoder_hidden_states=context).sample
    expected = torch.nn.functional.mse_loss(noisy - sigma * eps, clean).item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-4)


def test_training_leaves_the_model_alone_and_checkpointing_changes_nothing(tiny):
    model, clip = tiny
    before = {name: value.clone() for name, value in model.unet.state_dict().items()}
    latents = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    positive = [conditioning(clip, "stripes")]
    plain = training.train_lora(model, latents, positive * 3, fp32_settings())
    checkpointed = training.train_lora(model, latents, positive * 3, fp32_settings(gradient_checkpointing=True))
    after = model.unet.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not model.unet.is_gradient_checkpointing
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-5)
    assert plain.state.keys() == checkpointed.state.keys()
    for key in plain.state:
        torch.testing.assert_close(plain.state[key], checkpointed.state[key], rtol=1e-4, atol=1e-6)
    # The zero-initialised factors (LoRA down, norm diffs) were trained: three steps moved them off zero.
    downs = [value for key, value in plain.state.items() if key.endswith(".lora_down.weight")]
    assert downs and all(value.abs().sum() > 0 for value in downs)
    assert all(value.dtype == torch.float32 for value in plain.state.values())


def test_bf16_training_gives_bf16_factors_and_a_finite_loss(tiny):
    model, clip = tiny
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    result = training.train_lora(model, latents, [conditioning(clip, "x")],
                                 fp32_settings(batch_size=1, steps=2, training_dtype=torch.bfloat16,
                                               lora_dtype=torch.bfloat16, algorithm="LoHa"))
    assert all(value.dtype == torch.bfloat16 for value in result.state.values())
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == 2


def test_lora_model_loader_scales_the_change(tiny):
    model, clip = tiny
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    state = training.train_lora(model, latents, [conditioning(clip, "x")], fp32_settings(batch_size=1)).state
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = model.unet.get_parameter(name).detach().clone()
    changes = {}
    for strength in (1.0, -0.5):
        (patched,) = run_node(LoraModelLoader, model=model, lora=state, strength_model=strength)
        with patched.prepared() as unet:
            changes[strength] = unet.get_parameter(name).detach() - base
    assert changes[1.0].abs().max() > 0
    torch.testing.assert_close(changes[-0.5], -0.5 * changes[1.0], rtol=1e-4, atol=1e-7)
    (same,) = run_node(LoraModelLoader, model=model, lora=state, strength_model=0.0)
    assert same is model
    assert torch.equal(model.unet.get_parameter(name), base)


def test_bad_training_inputs_name_the_input(tiny, tmp_path):
    model, clip = tiny
    ctx = StubContext(make_env(tmp_path))
    latents = {"samples": torch.zeros((2, 4, 8, 8))}
    common = dict(model=model, latents=latents, batch_size=1, grad_accumulation_steps=1, steps=1,
                  learning_rate=0.001, rank=2, optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32",
                  lora_dtype="fp32", gradient_checkpointing=False, existing_lora="[None]")
    one = [conditioning(clip, "x")]
    with pytest.raises(InputError, match="input 'algorithm': OFT training is not built"):
        run_node(TrainLoraNode, ctx, positive=one, algorithm="OFT", **common)
    with pytest.raises(InputError, match="input 'positive': 3 conditioning entries for 2 latents"):
        run_node(TrainLoraNode, ctx, positive=one * 3, algorithm="LoRA", **common)
    with pytest.raises(InputError, match="input 'latents': have 3 channels"):
        run_node(TrainLoraNode, ctx, positive=one, algorithm="LoRA",
                 **{**common, "latents": {"samples": torch.zeros((2, 3, 8, 8))}})
    with pytest.raises(InputError, match="input 'lora'"):
        run_node(LoraModelLoader, ctx, model=model, lora={"nothing.lora_up.weight": torch.zeros(2, 2),
                                                          "nothing.lora_down.weight": torch.zeros(2, 2)},
                 strength_model=1.0)


# Datasets -------------------------------------------------------------------------------------------------------


def write_image(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_loader_resizes_as_comfyui(tmp_path):
    ctx = StubContext(make_env(tmp_path))
    folder = ctx.env.input_dir / "set"
    gradient = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (40, 1, 3))
    write_image(folder / "a.png", (32, 24), (255, 0, 0))
    Image.fromarray(gradient).save(folder / "b.png")  # 48 x 40
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="input 'resize_method': 'b.png' is 48x40, not 32x24"):
        run_node(LoadImageSetFromFolderNode, ctx, folder="set", resize_method="None")
    (cropped,) = run_node(LoadImageSetFromFolderNode, ctx, folder="set", resize_method="Crop")
    assert cropped.shape == (2, 24, 32, 3)
    assert torch.equal(cropped[1], torch.from_numpy(gradient[:24, :32].astype(np.float32) / 255))
    (stretched,) = run_node(LoadImageSetFromFolderNode, ctx, folder="set", resize_method="Stretch")
    expected = np.asarray(Image.fromarray(gradient).resize((32, 24), Image.Resampling.LANCZOS), dtype=np.float32)
    assert torch.equal(stretched[1], torch.from_numpy(expected / 255))
    assert torch.equal(stretched[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(InputError, match="input 'folder': 'missing' does not exist"):
        run_node(LoadImageSetFromFolderNode, ctx, folder="missing", resize_method="None")
    with pytest.raises(InputError, match="input 'folder': '../x' is not a folder inside the input folder"):
        run_node(LoadImageSetFromFolderNode, ctx, folder="../x", resize_method="None")
    assert LoadImageSetFromFolderNode.input_specs()["folder"].resolve_choices(ctx.env) == ["set"]


def test_image_text_folder_pairs_captions_and_kohya_repeats(tiny, tmp_path):
    _, clip = tiny
    ctx = StubContext(make_env(tmp_path))
    folder = ctx.env.input_dir / "captioned"
    write_image(folder / "one.png", (16, 16), (0, 0, 255))
    (folder / "one.txt").write_text("a blue square\n")
    write_image(folder / "two.jpg", (20, 12), (0, 255, 0))  # no caption: the empty prompt
    write_image(folder / "3_red" / "r.png", (16, 16), (255, 0, 0))
    (folder / "3_red" / "r.txt").write_text("a red square")
    images, conds = run_node(LoadImageTextSetFromFolderNode, ctx, folder="captioned", clip=clip,
                             resize_method="Stretch", width=8, height=-1)
    assert images.shape == (5, 16, 8, 3)  # in name order: r.png three times (3_red), one.png, two.jpg
    assert torch.equal(images[0], images[2]) and images[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert len(conds) == 5
    for entry, text in zip(conds, ["a red square"] * 3 + ["a blue square", ""], strict=True):
        expected_cond, expected_pooled = clip.encode(text)
        assert torch.equal(entry[0], expected_cond) and torch.equal(entry[1]["pooled_output"], expected_pooled)


# Saving and plotting --------------------------------------------------------------------------------------------


def test_save_lora_names_files_as_comfyui_and_lora_loader_reads_them(tiny, tmp_path):
    model, clip = tiny
    ctx = StubContext(make_env(tmp_path))
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    state = training.train_lora(model, latents, [conditioning(clip, "x")], fp32_settings(batch_size=1)).state
    run_node(SaveLoRANode, ctx, lora=state, prefix="loras/trained", steps=3)
    run_node(SaveLoRANode, ctx, lora=state, prefix="loras/trained")
    names = sorted(p.name for p in (ctx.env.output_dir / "loras").iterdir())
    # ComfyUI reads the counter from the first number after the prefix: after "_3_steps_" it continues at 4.
    assert names == ["trained_00004_.safetensors", "trained_3_steps_00001_.safetensors"]
    from latentloom.nodes.diffusion.checkpoint import read_state_dict

    saved = read_state_dict(ctx.env.output_dir / "loras" / names[1])
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    with pytest.raises(InputError, match="input 'prefix'"):
        run_node(SaveLoRANode, ctx, lora=state, prefix="../outside")


def test_loss_graph_is_a_temp_preview_with_the_curve(tmp_path):
    ctx = StubContext(make_env(tmp_path), prompt={"1": {"class_type": "LossGraphNode", "inputs": {}}})
    losses = [1.0, 0.8, 0.9, 0.4, 0.2]
    result = run_node(LossGraphNode, ctx, loss={"loss": losses}, filename_prefix="curve")
    (entry,) = result.ui["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("curve_") and entry["subfolder"] == ""
    image = Image.open(ctx.env.temp_dir / entry["filename"])
    assert image.size == (840, 520)
    assert json.loads(image.text["prompt"]) == ctx.prompt
    pixels = np.asarray(image.convert("RGB")).astype(int)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    # The curve starts at the top (the largest loss) at x = 40 and ends at the bottom (the smallest).
    assert blue[:4, 38:44].any() and blue[476:482, 660:680].any()
    with pytest.raises(InputError, match="input 'loss': holds no loss values"):
        run_node(LossGraphNode, ctx, loss={}, filename_prefix="curve")


# A training graph through the engine ----------------------------------------------------------------------------


def test_training_graph_saves_a_lora_that_loads_back_to_the_same_images(tmp_path):
    models = tmp_path / "models"
    write_tiny_checkpoint(models / "checkpoints" / "tiny.safetensors", "sd1", seed=0)
    (models / "loras").mkdir(parents=True)
    for index, colour in enumerate([(250, 20, 20), (20, 20, 250)]):
        write_image(tmp_path / "input" / "set" / f"{index}.png", (32, 32), colour)
        (tmp_path / "input" / "set" / f"{index}.txt").write_text("a striped square")
    engine = create_engine(models_dir=models, input_dir=tmp_path / "input", output_dir=tmp_path / "output",
                           temp_dir=tmp_path / "temp", entry_points=False)
    sample = {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["12", 0], "positive": ["10", 1], "negative": ["10", 1], "latent_image": ["11", 0]}}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "10": {"class_type": "LoadImageTextSetFromFolderNode", "inputs": {"folder": "set", "clip": ["4", 1]}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "12": {"class_type": "TrainLoraNode", "inputs": {
            "model": ["4", 0], "latents": ["11", 0], "positive": ["10", 1], "batch_size": 2,
            "grad_accumulation_steps": 2, "steps": 2, "learning_rate": 0.01, "rank": 4, "optimizer": "Adam",
            "loss_function": "Huber", "seed": 3, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
            "gradient_checkpointing": True, "existing_lora": "[None]"}},
        "13": {"class_type": "SaveLoRANode", "inputs": {"lora": ["12", 1], "prefix": "loras/tiny", "steps": ["12", 3]}},
        "14": {"class_type": "LossGraphNode", "inputs": {"loss": ["12", 2], "filename_prefix": "loss_graph"}},
        "3": sample,
        "15": {"class_type": "LoraModelLoader", "inputs": {"model": ["4", 0], "lora": ["12", 1],
                                                           "strength_model": 1.0}},
        "16": {**sample, "inputs": {**sample["inputs"], "model": ["15", 0]}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/trained"}},
        "18": {"class_type": "SaveLatent", "inputs": {"samples": ["16", 0], "filename_prefix": "latents/loader"}},
    }
    result = engine.run(prompt)
    assert result.status == "success", result.error
    assert result.outputs["14"]["images"][0]["type"] == "temp"
    (saved,) = (tmp_path / "output" / "loras").iterdir()
    assert saved.name == "tiny_2_steps_00001_.safetensors"

    # LoraLoader on the saved file gives the trained model's images; continuing from the file counts its steps.
    shutil.copy(saved, models / "loras" / saved.name)
    reload = {
        "4": prompt["4"], "10": prompt["10"], "11": prompt["11"],
        "12": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": saved.name,
                                                      "strength_model": 1.0, "strength_clip": 1.0}},
        "3": sample,
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "latents/reloaded"}},
        "20": {"class_type": "TrainLoraNode", "inputs": {**prompt["12"]["inputs"], "existing_lora": saved.name,
                                                         "steps": 1, "grad_accumulation_steps": 1}},
        "21": {"class_type": "SaveLoRANode", "inputs": {"lora": ["20", 1], "prefix": "loras/more", "steps": ["20", 3]}},
    }
    result = engine.run(reload)
    assert result.status == "success", result.error
    from safetensors.torch import load_file

    latents = {name: load_file(next((tmp_path / "output" / "latents").glob(f"{name}_*")))["latent_tensor"]
               for name in ("trained", "loader", "reloaded")}
    assert torch.equal(latents["trained"], latents["loader"])
    assert torch.equal(latents["trained"], latents["reloaded"])
    (continued,) = (tmp_path / "output" / "loras").glob("more_*")
    assert continued.name == "more_3_steps_00001_.safetensors"  # 2 steps in the file's name + 1 more


# The shipped training graph on the toy model ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
TOY_MODELS = REPO / "models"
TOY_CHECKPOINT = TOY_MODELS / "checkpoints" / "toy-shapes.safetensors"
OTHER_PROMPTS = ("a large red triangle on a blue background", "a large yellow square on a black background")


def _stripes_tool():
    sys.path.insert(0, str(REPO / "tools"))
    import make_training_graph

    return make_training_graph


def _sampler(model, positive, seed, steps):
    return {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": model, "positive": positive, "negative": ["7", 0], "latent_image": ["5", 0]}}


@pytest.mark.toy
@pytest.mark.skipif(not TOY_CHECKPOINT.is_file(), reason="the toy model is not shipped")
def test_training_graph_learns_the_striped_style_and_the_saved_lora_reloads(tmp_path, capsys):
    tool = _stripes_tool()
    # The shipped graph and dataset are what the tool writes.
    assert json.loads((REPO / "graphs" / f"{tool.GRAPH}.json").read_text()) == tool.training_graph()
    for stem, (pixels, caption) in tool.dataset().items():
        assert np.array_equal(np.asarray(Image.open(REPO / "input" / tool.DATASET / f"{stem}.png")), pixels)
        assert (REPO / "input" / tool.DATASET / f"{stem}.txt").read_text().strip() == caption

    out, temp = tmp_path / "out", tmp_path / "temp"
    capsys.readouterr()
    code = main(["run", str(REPO / "graphs" / f"{tool.GRAPH}.json"), "--json", "--no-progress", "--models-dir",
                 str(TOY_MODELS), "--input-dir", str(REPO / "input"), "--output-dir", str(out), "--temp-dir",
                 str(temp), "--custom-nodes", str(tmp_path / "no_custom_nodes")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["status"] == "success", report
    steps = tool.TRAINING["steps"]
    lora_file = out / "loras" / f"toy-stripes_{steps}_steps_00001_.safetensors"
    trained_image = out / "lora-training_00001_.png"
    assert sorted(report["outputs"]) == sorted([str(trained_image), *map(str, temp.glob("loss_graph_*.png"))])

    # LoraLoader on the saved file, same seed: the very image the graph made; the base model draws no stripes.
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(TOY_CHECKPOINT, models / "checkpoints" / TOY_CHECKPOINT.name)  # (symlinks are not followed)
    (models / "loras").mkdir()
    shutil.copy(lora_file, models / "loras" / lora_file.name)
    graph = tool.training_graph()
    prompt = {key: graph[key] for key in ("4", "5", "6", "7")}
    prompt["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "strength_model": 1.0,
                                                           "strength_clip": 1.0, "lora_name": lora_file.name}}
    texts = [graph["6"]["inputs"]["text"], *OTHER_PROMPTS]
    for index, text in enumerate(texts):
        if index:
            prompt[f"6{index}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}}
        positive = ["6", 0] if index == 0 else [f"6{index}", 0]
        steps_here = graph["3"]["inputs"]["steps"] if index == 0 else 12
        for kind, model in (("base", ["4", 0]), ("lora", ["20", 0])):
            prompt[f"{kind}{index}"] = _sampler(model, positive, graph["3"]["inputs"]["seed"], steps_here)
            prompt[f"{kind}{index}d"] = {"class_type": "VAEDecode",
                                         "inputs": {"samples": [f"{kind}{index}", 0], "vae": ["4", 2]}}
            prompt[f"{kind}{index}s"] = {"class_type": "SaveImage", "inputs": {
                "images": [f"{kind}{index}d", 0], "filename_prefix": f"{kind}{index}"}}
    engine = create_engine(models_dir=models, input_dir=REPO / "input", output_dir=tmp_path / "eval",
                           temp_dir=temp, entry_points=False)
    result = engine.run(prompt)
    assert result.status == "success", result.error

    def image(name):
        return np.asarray(Image.open(name).convert("RGB"))

    assert np.array_equal(image(tmp_path / "eval" / "lora0_00001_.png"), image(trained_image))
    energy = {kind: tool.stripe_energy(np.stack([image(tmp_path / "eval" / f"{kind}{i}_00001_.png")
                                                 for i in range(len(texts))]))
              for kind in ("base", "lora")}
    assert energy["lora"].mean() > 2.5 * energy["base"].mean(), energy
    assert (energy["lora"] > energy["base"]).sum() >= len(texts) - 1, energy

    # The loss on the dataset, same noise and σ for both: the trained LoRA lowers it.
    from latentloom.nodes.diffusion.checkpoint import load_checkpoint, read_state_dict

    toy = load_checkpoint(TOY_CHECKPOINT)
    pixels = torch.stack([torch.from_numpy(p.astype(np.float32) / 255) for p, _ in tool.dataset().values()])
    latents = toy.vae.encode(pixels)
    positive = [conditioning(toy.clip, caption) for _, caption in tool.dataset().values()]
    trained = training.apply_lora_state(toy.model, read_state_dict(lora_file), 1.0)
    before = training.evaluation_loss(toy.model, latents, positive, draws=8)
    after = training.evaluation_loss(trained, latents, positive, draws=8)
    print(f"stripe energy base {energy['base'].round(3)} lora {energy['lora'].round(3)}; "
          f"dataset loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
