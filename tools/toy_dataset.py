"""Procedural, seeded dataset of coloured shapes on plain backgrounds (the toy model's training data).

Each sample is a 64x64 RGB image of one circle, square or (upright) triangle in one of four colours on a plain
background of another colour, with a caption such as "a small red circle on a white background at the top left",
the shape's coverage mask (the ControlNet hint) and metadata (colour, shape, bbox, centre, size) for tests.

Style "outline" draws the same shape as a coloured ring with the background inside (the LoRA's target style).

Rendering is 4x supersampled then box-filtered, so edges are anti-aliased and the VAE sees smooth data.
Everything is a pure function of the seed: `make_sample(seed)` always returns the same image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    **SHAPE_COLOURS,
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Extent (diameter / side / base = height) in pixels of the 64 px image.
SIZE_RANGES: dict[str, tuple[int, int]] = {"small": (16, 22), "medium": (26, 32), "large": (36, 46)}
# 3x3 grid of position words, indexed [row][column] by the shape centre's third of the image.
POSITION_WORDS: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
MARGIN = 2


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image."""

    colour: str
    shape: str
    background: str
    size_word: str        # small | medium | large
    extent: float         # pixels: diameter / side / triangle base and height
    centre: tuple[float, float]  # (x, y) in pixels, origin top left
    style: str = "filled"  # filled | outline

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels."""
        half = self.extent / 2
        return (self.centre[0] - half, self.centre[1] - half, self.centre[0] + half, self.centre[1] + half)

    @property
    def position_word(self) -> str:
        return position_word(self.centre)


def position_word(centre: tuple[float, float], size: int = IMAGE_SIZE) -> str:
    column = min(int(centre[0] * 3 / size), 2)
    row = min(int(centre[1] * 3 / size), 2)
    return POSITION_WORDS[row][column]


def caption_for(spec: ShapeSpec, with_size: bool, with_position: bool) -> str:
    size = f"{spec.size_word} " if with_size and spec.size_word != "medium" else ""
    text = f"a {size}{spec.colour} {spec.shape} on a {spec.background} background"
    if with_position:
        text += f" at the {spec.position_word}" if spec.position_word != "center" else " in the center"
    return text


@dataclass(frozen=True)
class Sample:
    image: np.ndarray     # uint8 [64, 64, 3]
    mask: np.ndarray      # float32 [64, 64] shape coverage in 0..1 (filled silhouette, whatever the style)
    caption: str
    spec: ShapeSpec

    @property
    def metadata(self) -> dict:
        return {**dataclasses.asdict(self.spec), "bbox": self.spec.bbox, "position": self.spec.position_word}


def _coverage(spec: ShapeSpec, shrink: float = 0.0) -> np.ndarray:
    """Supersampled boolean silhouette; `shrink` pixels moves every edge inwards (for the outline's hole)."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    xs, ys = np.meshgrid(coords, coords)
    cx, cy = spec.centre
    half = spec.extent / 2 - shrink
    if half <= 0:
        return np.zeros((n, n), dtype=bool)
    if spec.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
    if spec.shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if spec.shape == "triangle":
        # Upright isosceles: apex at the top centre, base along the bottom; edge offset by `shrink` inwards.
        top, bottom = cy - half, cy + half
        height = bottom - top
        inside_vertical = (ys >= top) & (ys <= bottom)
        # Half-width at row y grows linearly from 0 at the apex to `half` at the base.
        half_width = (ys - top) / height * half
        return inside_vertical & (np.abs(xs - cx) <= half_width)
    raise ValueError(f"unknown shape {spec.shape!r}")


def _downsample(mask: np.ndarray) -> np.ndarray:
    s = SUPERSAMPLE
    return mask.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s).mean(axis=(1, 3)).astype(np.float32)


def render(spec: ShapeSpec) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [H,W,3], silhouette coverage float32 [H,W])."""
    silhouette = _coverage(spec)
    if spec.style == "outline":
        thickness = max(3.0, spec.extent * 0.14)
        # Triangles' inner edges sit further from the outer ones per unit of shrink; scale so the band looks even.
        shrink = thickness * (1.6 if spec.shape == "triangle" else 1.0)
        painted = silhouette & ~_coverage(spec, shrink)
    elif spec.style == "filled":
        painted = silhouette
    else:
        raise ValueError(f"unknown style {spec.style!r}")
    alpha = _downsample(painted)[..., None]
    fg = np.array(SHAPE_COLOURS[spec.colour], dtype=np.float32)
    bg = np.array(BACKGROUND_COLOURS[spec.background], dtype=np.float32)
    image = alpha * fg + (1 - alpha) * bg
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), _downsample(silhouette)


def random_spec(rng: np.random.Generator, style: str = "filled", colour: str | None = None,
                shape: str | None = None, background: str | None = None, size_word: str | None = None,
                centre: tuple[float, float] | None = None) -> ShapeSpec:
    colour = colour or str(rng.choice(list(SHAPE_COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    if background is None:
        background = str(rng.choice([name for name in BACKGROUND_COLOURS if name != colour]))
    elif background == colour:
        raise ValueError(f"background {background!r} must differ from the shape colour")
    size_word = size_word or str(rng.choice(list(SIZE_RANGES)))
    low, high = SIZE_RANGES[size_word]
    extent = float(rng.uniform(low, high))
    if centre is None:
        half = extent / 2 + MARGIN
        centre = (float(rng.uniform(half, IMAGE_SIZE - half)), float(rng.uniform(half, IMAGE_SIZE - half)))
    return ShapeSpec(colour=colour, shape=shape, background=background, size_word=size_word, extent=extent,
                     centre=centre, style=style)


def make_sample(seed: int, style: str = "filled") -> Sample:
    """One deterministic training sample. Size and position words are each in the caption half of the time."""
    rng = np.random.default_rng([seed, 0x5A4E])
    spec = random_spec(rng, style=style)
    with_size, with_position = rng.random() < 0.5, rng.random() < 0.5
    image, mask = render(spec)
    return Sample(image=image, mask=mask, caption=caption_for(spec, with_size, with_position), spec=spec)


def iter_samples(count: int, start_seed: int = 0, style: str = "filled") -> Iterator[Sample]:
    for seed in range(start_seed, start_seed + count):
        yield make_sample(seed, style=style)


def make_arrays(count: int, start_seed: int = 0, style: str = "filled") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 [N,64,64,3], masks float32 [N,64,64], captions) for training."""
    samples = list(iter_samples(count, start_seed, style))
    return (np.stack([s.image for s in samples]), np.stack([s.mask for s in samples]), [s.caption for s in samples])


if __name__ == "__main__":
    import argparse

    from PIL import Image

    parser = argparse.ArgumentParser(description="Write a contact sheet of toy dataset samples.")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--style", default="filled", choices=["filled", "outline"])
    parser.add_argument("--out", default="toy_dataset_sheet.png")
    args = parser.parse_args()
    samples = list(iter_samples(args.count, style=args.style))
    columns = 8
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * IMAGE_SIZE, rows * IMAGE_SIZE), (255, 255, 255))
    for index, sample in enumerate(samples):
        sheet.paste(Image.fromarray(sample.image), ((index % columns) * IMAGE_SIZE, (index // columns) * IMAGE_SIZE))
        print(index, sample.caption)
    sheet.save(args.out)
