"""The wheel works on its own: built from the sources, installed into a fresh virtual environment, its
`latentloom run` renders the bundled default graph on the bundled toy model from an empty folder, and it claims no
top-level name but `latentloom` (ComfyUI custom node packs `import nodes`, `server`, ...).

The fresh environment reuses the dependencies already installed for the tests through a .pth line naming their
site-packages folder: a plain path line, so the .pth files in that folder (among them the editable install's
import hook, which would map latentloom.* back to the source folders) are not run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# What the build reads: the project file, the files it names, and the folders mapped to latentloom.*.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "engine", "nodes", "server", "models", "graphs", "input")


def build_wheel(folder: Path) -> Path:
    """Build from a copy, so the build's own folders (build/, *.egg-info) never land in the working tree."""
    source = folder / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "uploads"))
        else:
            shutil.copy2(path, source / name)
    wheels = folder / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("latentloom-*.whl")
    return wheel


def fresh_environment(folder: Path, wheel: Path) -> Path:
    environment = folder / "env"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.run([str(python), "-c", ask], check=True, capture_output=True,
                                        text=True).stdout.strip())
    (site_packages / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True)
    return environment


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(folder)
    return wheel, fresh_environment(folder, wheel)


def isolated_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def test_wheel_holds_only_the_latentloom_namespace(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "latentloom-0.1.0.dist-info/"
    assert [n for n in names if not n.startswith(("latentloom/", dist_info))] == []
    assert "latentloom/__init__.py" not in names  # a namespace package: other distributions may add to it
    for expected in ("latentloom/engine/api.py", "latentloom/nodes/__init__.py", "latentloom/server/cli.py",
                     "latentloom/graphs/txt2img.json", "latentloom/models/checkpoints/toy-shapes.safetensors"):
        assert expected in names
    assert not any("__pycache__" in n or n.startswith("latentloom/tests/") for n in names)
    # Every source package is in the wheel (pyproject lists them one by one for the package-dir mapping).
    sources = {str(init.parent.relative_to(REPO)) for folder in ("engine", "nodes", "server")
               for init in (REPO / folder).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert sorted(f"latentloom/{source}/__init__.py" for source in sources if
                  f"latentloom/{source}/__init__.py" not in names) == []


def test_installed_wheel_runs_the_default_graph_from_an_empty_folder(installed, tmp_path):
    _, environment = installed
    done = subprocess.run([str(environment / "bin" / "latentloom"), "run", "--json", "--no-progress"],
                          cwd=tmp_path, env=isolated_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert written == ["output/txt2img_00001_.png"], written
    from PIL import Image

    graph = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    latent = next(node["inputs"] for node in graph.values() if node["class_type"] == "EmptyLatentImage")
    with Image.open(tmp_path / "output" / "txt2img_00001_.png") as image:
        assert image.size == (latent["width"], latent["height"])
        darkest, brightest = image.convert("L").getextrema()
        assert brightest - darkest > 64  # a picture, not a blank canvas


def test_latentloom_comes_from_the_wheel_and_claims_no_other_top_level_name(installed, tmp_path):
    _, environment = installed
    probe = """
import importlib, json
import latentloom.engine, latentloom.nodes, latentloom.server
found = {}
for name in ("nodes", "server", "engine"):
    try:
        importlib.import_module(name)
        found[name] = "imported"
    except ModuleNotFoundError as error:
        found[name] = error.name
import torch  # the dependencies come through the .pth line
print(json.dumps({"paths": [latentloom.engine.__file__, latentloom.nodes.__file__, latentloom.server.__file__],
                  "top_level": found}))
"""
    done = subprocess.run([str(environment / "bin" / "python"), "-c", probe], cwd=tmp_path, env=isolated_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    for path in report["paths"]:
        assert Path(path).is_relative_to(environment), path  # the wheel's copy, not the source folders
    assert report["top_level"] == {"nodes": "nodes", "server": "server", "engine": "engine"}
