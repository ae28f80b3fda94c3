"""The shipped toy model follows its prompts: measured through the engine on the graphs in graphs/.

Every image is its own run with its own seed (batch size 1), judged by the geometric measures of
tools/toy_metrics.py:
  colour      the shape region's colour is the prompt's colour word            >= 90 % of images
  shape       the shape's template fit (circle / square / triangle) is the prompt's shape word   >= 80 %
  ControlNet  the shape's centre lies within 8 px of the control mask's centre  >= 90 %
  LoRA        strength 1 draws outlines: the mean fill fraction drops by >= 0.09 from strength 0's
  seeds       the same seed repeats the image exactly; different seeds (and batch entries) differ
The thresholds are the issue's; a model that misses them fails here (retrain, do not lower them).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentloom.engine.api import set_input
from latentloom.nodes import create_engine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import toy_dataset  # noqa: E402
import toy_metrics  # noqa: E402

pytestmark = [pytest.mark.toy, pytest.mark.slow]

GRAPHS = REPO / "graphs"
MODELS = Path(os.environ.get("TOY_MODELS_DIR", REPO / "models"))
CHECKPOINT = MODELS / "checkpoints" / "toy-shapes.safetensors"
LORA = MODELS / "loras" / "toy-outline.safetensors"
CONTROLNET = MODELS / "controlnet" / "toy-shape-control.safetensors"


def shipped(*paths: Path):
    missing = [str(p.relative_to(MODELS)) for p in (CHECKPOINT, *paths) if not p.is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"toy model files not shipped: {missing}")


SEEDS_PER_PROMPT = 5  # 12 colour/shape prompts x 5 seeds = 60 images
CONTROL_SEEDS = 30
LORA_SEEDS = 24       # two per colour/shape prompt
SEED = 100
COLOUR_RATE, SHAPE_RATE, CONTROL_RATE = 0.9, 0.8, 0.9


CONTROL_DISTANCE_PX = 8.0
LORA_FILL_DROP = 0.09


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_semantics")
    (root / "input").mkdir()
    return create_engine(models_dir=MODELS, input_dir=root / "input", output_dir=root / "output",
                         temp_dir=root / "temp", entry_points=False)


def graph(name: str, **overrides) -> dict:
    """graphs/NAME.json with inputs overridden: keyword NODE_INPUT (e.g. n6_text) -> value."""
    prompt = json.loads((GRAPHS / f"{name}.json").read_text())
    for key, value in overrides.items():
        node_id, _, input_name = key.removeprefix("n").partition("_")
        prompt = set_input(prompt, f"{node_id}.{input_name}", value)
    return prompt


def run_images(engine, prompt: dict) -> list[np.ndarray]:
    """Run a prompt; the images its SaveImage wrote, as uint8 [H, W, 3], in batch order."""
    result = engine.run(prompt)
    assert getattr(result, "status", None) == "success", getattr(result, "error", result)
    (saved,) = [ui["images"] for ui in result.outputs.values() if ui.get("images")]
    return [np.asarray(Image.open(engine.env.output_dir / item["subfolder"] / item["filename"]).convert("RGB"))
            for item in saved]


def colour_shape_cases() -> list[tuple[str, str, str]]:
    """Every colour with every shape, each on a different background (never its own colour)."""
    backgrounds = list(toy_dataset.BACKGROUND_COLOURS)
    cases = []
    for index, (colour, shape) in enumerate((c, s) for c in toy_dataset.SHAPE_COLOURS for s in toy_dataset.SHAPES):
        options = [b for b in backgrounds if b != colour]
        cases.append((colour, shape, options[index % len(options)]))
    return cases


@shipped()
def test_colour_and_shape_words_are_followed(engine):
    colour_right = shape_right = total = 0
    misses = []
    for case_index, (colour, shape, background) in enumerate(colour_shape_cases()):
        text = f"a {colour} {shape} on a {background} background"
        for repeat in range(SEEDS_PER_PROMPT):
            seed = SEED + case_index * SEEDS_PER_PROMPT + repeat
            (image,) = run_images(engine, graph("txt2img", n6_text=text, n5_batch_size=1, n3_seed=seed))
            analysis = toy_metrics.analyse(image)
            colour_right += analysis.colour == colour
            shape_right += analysis.shape == shape
            total += 1
            if analysis.colour != colour or analysis.shape != shape:
                misses.append(f"{text!r} seed {seed} -> {analysis.colour} {analysis.shape}")
    colour_rate, shape_rate = colour_right / total, shape_right / total
    print(f"colour {colour_rate:.3f} shape {shape_rate:.3f} over {total} seeds")
    assert total >= 20
    assert colour_rate >= COLOUR_RATE, (colour_rate, misses)
    assert shape_rate >= SHAPE_RATE, (shape_rate, misses)


def write_hints(folder: Path, count: int, shape: str) -> list[tuple[str, tuple[float, float]]]:
    """`count` shape-mask PNGs at random places and sizes: (file name, mask centre) each."""
    rng = np.random.default_rng(7)
    hints = []
    for index in range(count):
        spec = toy_dataset.random_spec(rng, shape=shape, size_word=str(rng.choice(["medium", "large"])))
        _, mask = toy_dataset.render(spec)
        grey = np.clip(np.rint(mask * 255), 0, 255).astype(np.uint8)
        name = f"hint_{index:02d}.png"
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB").save(folder / name)
        hints.append((name, toy_metrics.mask_centre(mask)))
    return hints


@shipped(CONTROLNET)
def test_controlnet_puts_the_shape_where_the_mask_is(engine):
    distances = []
    for index, (name, (tx, ty)) in enumerate(write_hints(engine.env.input_dir, CONTROL_SEEDS, "triangle")):
        (image,) = run_images(engine, graph("controlnet", n11_image=name, n5_batch_size=1, n3_seed=SEED + index,
                                            n6_text="a red triangle on a white background"))
        found = toy_metrics.analyse(image).centre
        distances.append(float(np.hypot(found[0] - tx, found[1] - ty)) if found else float("inf"))
    rate = float(np.mean(np.array(distances) <= CONTROL_DISTANCE_PX))
    print(f"controlnet {rate:.3f}, median distance {np.median(distances):.1f} px over {len(distances)} seeds")
    assert len(distances) >= 20
    assert rate >= CONTROL_RATE, (rate, [round(d, 1) for d in distances])


@shipped(LORA)
def test_lora_strength_draws_outlines(engine):
    fills = {}
    for strength in (0.0, 1.0):
        fills[strength] = []
        cases = colour_shape_cases()
        for index in range(LORA_SEEDS):
            colour, shape, background = cases[index % len(cases)]
            text = f"a {colour} {shape} on a {background} background"
            (image,) = run_images(engine, graph("lora", n10_strength_model=strength, n5_batch_size=1,
                                                n3_seed=SEED + index, n6_text=text))
            fills[strength].append(toy_metrics.analyse(image).fill)
    before, after = float(np.mean(fills[0.0])), float(np.mean(fills[1.0]))
    print(f"lora fill: strength 0 {before:.3f}, strength 1 {after:.3f} over {LORA_SEEDS} seeds")
    # Filled shapes fill ~1 of their silhouette; the dataset's outlined shapes ~0.6 (their VAE round trip ~0.63,
    # tools/eval_toy.py). Ask for a clear drop, and for most seeds (same noise at both strengths) to move that way.
    assert before >= 0.9, fills
    assert after <= before - LORA_FILL_DROP, (before, after)
    assert np.mean(np.array(fills[1.0]) < np.array(fills[0.0])) >= 0.75, fills


@shipped()
def test_same_seed_same_image_and_different_seeds_differ(engine):
    prompt = graph("txt2img", n5_batch_size=3, n3_seed=SEED)
    first = run_images(engine, prompt)
    engine.free()  # drop cached outputs and models: the repeat really samples again, from a fresh load
    again = run_images(engine, prompt)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=False))
    other = run_images(engine, graph("txt2img", n5_batch_size=3, n3_seed=SEED + 1))
    images = first + other
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).mean() > 1.0, (i, j)
