"""Write the input images that the graphs in graphs/ load (into input/, `latentloom run`'s default input folder).

  toy-init.png          a blue square on a white background, left of centre (img2img, inpaint, outpaint)
  toy-inpaint-mask.png  white where the inpaint graph repaints: the square and a margin around it (grey-scale)
  toy-control.png       the ControlNet hint: a triangle's silhouette, white on black, at the top right (the toy
                        ControlNet is trained on shape masks, see tools/train_toy.py)

Drawn with tools/toy_dataset.py, so the images look like the toy model's training data. Deterministic.
Usage: .venv/bin/python tools/make_graph_inputs.py [--out input]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_dataset import ShapeSpec, render  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

INIT_SPEC = ShapeSpec(colour="blue", shape="square", background="white", size_word="medium", extent=26.0,
                      centre=(22.0, 32.0))
CONTROL_SPEC = ShapeSpec(colour="green", shape="triangle", background="black", size_word="large", extent=34.0,
                         centre=(42.0, 21.0))
INPAINT_MARGIN = 6  # pixels of mask around the square, so its anti-aliased edge is repainted too


def init_image() -> np.ndarray:
    image, _ = render(INIT_SPEC)
    return image


def inpaint_mask() -> np.ndarray:
    """uint8 [H, W]: 255 inside the square's bounding box grown by INPAINT_MARGIN, 0 elsewhere."""
    x0, y0, x1, y1 = INIT_SPEC.bbox
    size = init_image().shape[0]
    mask = np.zeros((size, size), dtype=np.uint8)
    top, bottom = max(int(y0) - INPAINT_MARGIN, 0), min(int(np.ceil(y1)) + INPAINT_MARGIN, size)
    left, right = max(int(x0) - INPAINT_MARGIN, 0), min(int(np.ceil(x1)) + INPAINT_MARGIN, size)
    mask[top:bottom, left:right] = 255
    return mask


def control_image() -> np.ndarray:
    """uint8 [H, W, 3]: the silhouette coverage (0..1) as grey levels, as the ControlNet's training hints."""
    _, coverage = render(CONTROL_SPEC)
    grey = np.clip(np.rint(coverage * 255), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def write_inputs(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "toy-init.png": Image.fromarray(init_image(), "RGB"),
        "toy-inpaint-mask.png": Image.fromarray(inpaint_mask(), "L"),
        "toy-control.png": Image.fromarray(control_image(), "RGB"),
    }
    written = []
    for name, image in files.items():
        path = folder / name
        image.save(path, optimize=True)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "input"))
    args = parser.parse_args()
    for path in write_inputs(Path(args.out)):
        print(path)


if __name__ == "__main__":
    main()
