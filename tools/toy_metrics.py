"""Geometric measures of a toy-model image: which colour, which shape, where, filled or outlined.

`analyse(image)` finds the plain background (the median colour of the image border), takes the pixels far from
it as the shape (largest connected blob, holes filled), and measures:
  colour    nearest of the four shape colours to the median colour of the clearly-foreground pixels
  shape     circle / square / triangle by the best IoU of the blob with an ellipse, a rectangle and an upright
            triangle fitted to the blob's bounding box
  centre    centroid of the filled blob, pixels (x, y); `position` the 3x3 grid word of it
  fill      painted pixels / filled-blob pixels: ~1 for filled shapes, ~0.3-0.6 for outlined ones (LoRA style)
Works on uint8 [H, W, 3] arrays or float [H, W, 3] in 0..1 (ComfyUI IMAGE rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from toy_dataset import BACKGROUND_COLOURS, SHAPE_COLOURS, position_word

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background colour that counts as "shape"
STRONG_DISTANCE = 110.0     # for the colour vote: skip anti-aliased / blurred edge pixels


@dataclass(frozen=True)
class Analysis:
    background: str
    colour: str | None
    shape: str | None
    centre: tuple[float, float] | None
    position: str | None
    bbox: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive)
    area: int
    fill: float
    shape_scores: dict[str, float]

    def as_dict(self) -> dict:
        return {"background": self.background, "colour": self.colour, "shape": self.shape, "centre": self.centre,
                "position": self.position, "bbox": self.bbox, "area": self.area, "fill": round(self.fill, 3),
                "shape_scores": {k: round(v, 3) for k, v in self.shape_scores.items()}}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an image [H, W, 3], got shape {image.shape}")
    return image[..., :3]


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(colour - np.array(palette[name], dtype=np.float64)) for name in names]
    return names[int(np.argmin(distances))]


def shape_templates(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Boolean ellipse / rectangle / upright triangle inscribed in `bbox` on an image of `size` (h, w)."""
    x0, y0, x1, y1 = bbox
    height, width = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    ellipse = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    rectangle = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    half_width = (ys - y0) / max(y1 - y0, 1) * rx
    triangle = (ys >= y0) & (ys <= y1) & (np.abs(xs - cx) <= half_width)
    return {"circle": ellipse, "square": rectangle, "triangle": triangle}


def analyse(image: np.ndarray) -> Analysis:
    pixels = _to_uint8(image).astype(np.float64)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    painted = distance > FOREGROUND_DISTANCE
    labels, count = ndimage.label(painted)
    if count == 0:
        return Analysis(_nearest(background_rgb, BACKGROUND_COLOURS), None, None, None, None, None, 0, 0.0, {})
    sizes = ndimage.sum(painted, labels, index=range(1, count + 1))
    blob = labels == (int(np.argmax(sizes)) + 1)
    solid = ndimage.binary_fill_holes(blob)
    ys, xs = np.nonzero(solid)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    strong = blob & (distance > STRONG_DISTANCE)
    vote = pixels[strong] if strong.sum() >= 4 else pixels[blob]
    colour = _nearest(np.median(vote, axis=0), SHAPE_COLOURS)
    scores = {}
    for name, template in shape_templates(bbox, (height, width)).items():
        scores[name] = float((template & solid).sum() / max((template | solid).sum(), 1))
    shape = max(scores, key=scores.get)
    centre = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return Analysis(
        background=_nearest(background_rgb, BACKGROUND_COLOURS), colour=colour, shape=shape, centre=centre,
        position=position_word(centre, size=width), bbox=bbox, area=int(solid.sum()),
        fill=float(blob.sum() / max(solid.sum(), 1)), shape_scores=scores,
    )


def mask_centre(mask: np.ndarray) -> tuple[float, float]:
    """Centroid (x, y) of a coverage mask [H, W] (0..1), pixels."""
    mask = np.asarray(mask, dtype=np.float64)
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]] + 0.5
    total = mask.sum()
    if total <= 0:
        raise ValueError("empty mask")
    return float((xs * mask).sum() / total), float((ys * mask).sum() / total)


def mask_iou(image: np.ndarray, mask: np.ndarray) -> float:
    """IoU between the analysed shape's filled blob and a coverage mask thresholded at 0.5."""
    pixels = _to_uint8(image).astype(np.float64)
    analysis = analyse(pixels)
    if analysis.bbox is None:
        return 0.0
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    painted = np.linalg.norm(pixels - np.median(border, axis=0), axis=2) > FOREGROUND_DISTANCE
    solid = ndimage.binary_fill_holes(painted)
    target = np.asarray(mask) >= 0.5
    return float((solid & target).sum() / max((solid | target).sum(), 1))
