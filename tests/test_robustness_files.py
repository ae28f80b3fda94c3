"""Issue 18, files: writes into the output folder are atomic (a hidden part file, then a rename), so a process
killed mid-write leaves nothing visible and the re-run writes the only copy; part files are cleared later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from latentloom.engine.files import atomic_writer, is_part_name, remove_stale_parts, write_atomically
from latentloom.server.outputs_commit import next_counter
from tests.server_support import make_app

REPO = Path(__file__).resolve().parents[1]
# SaveImage's own write path (nodes.image_files.save_images) on a large noisy image: slow enough to be killed.
SLOW_SAVE = """
import sys
import torch
from pathlib import Path
from latentloom.nodes.image_files import save_images

size = int(sys.argv[2])
images = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
print(save_images(images, Path(sys.argv[1]), "crash", "output", 9, None), flush=True)
"""


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "a.png"
    with pytest.raises(RuntimeError), atomic_writer(target) as handle:
        handle.write(b"half")
        raise RuntimeError("disk on fire")
    assert list((tmp_path / "out").iterdir()) == []
    write_atomically(target, b"whole")
    write_atomically(target, b"again")  # replaces in one step
    assert target.read_bytes() == b"again" and os.listdir(target.parent) == ["a.png"]


def test_part_files_of_the_longest_names_fit(tmp_path):
    name = "é" * 120 + ".png"  # 244 bytes: the part file must still fit in 255
    write_atomically(tmp_path / name, b"x")
    assert visible(tmp_path) == [name]


def test_stale_parts_are_removed_but_recent_ones_kept(tmp_path):
    old = tmp_path / "sub" / ".img_00001_.png.0123abcd.part"
    old.parent.mkdir()
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = tmp_path / ".img_00002_.png.89abcdef.part"
    recent.write_bytes(b"in flight")
    keep = tmp_path / ".hidden_but_mine"
    keep.write_bytes(b"not ours")
    assert remove_stale_parts(tmp_path) == 1
    assert not old.exists() and recent.exists() and keep.exists()
    assert is_part_name(recent.name) and not is_part_name(keep.name)



def test_custom_node_packs_save_models_atomically(tmp_path):
    """comfy.utils.save_torch_file (what packs' model and LoRA save nodes call) writes through our part files, as
    our own writers do: a failed save leaves the previous file whole and nothing else, and a reader of the old
    file keeps it. (Recent safetensors' own save_file renames a temporary file too, but under a name that /view
    and the stale-part clean-up do not know as unfinished.)"""
    from safetensors.torch import load_file

    from latentloom.nodes.comfy_compat.comfy.utils import load_torch_file, save_torch_file

    target = tmp_path / "loras" / "pack_lora.safetensors"
    save_torch_file({"a": torch.arange(6.0).reshape(2, 3)}, str(target), metadata={"by": "pack"})
    first = target.read_bytes()
    with pytest.raises(NotImplementedError):  # the second tensor cannot be copied out: the save fails midway
        save_torch_file({"a": torch.ones(2, 3), "b": torch.empty(4, device="meta")}, str(target))
    assert target.read_bytes() == first and os.listdir(target.parent) == [target.name]
    with open(target, "rb") as old_reader:
        save_torch_file({"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.float16)[::2]}, str(target))
        assert old_reader.read() == first
    assert os.listdir(target.parent) == [target.name]
    loaded = load_file(str(target))
    assert torch.equal(loaded["a"], torch.ones(2, 3)) and torch.equal(loaded["b"], torch.zeros(2, dtype=torch.float16))
    state, metadata = load_torch_file(str(target), return_metadata=True)
    assert set(state) == {"a", "b"} and metadata is None


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_9_during_save_image_leaves_no_partial_png_and_the_rerun_one_copy(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(output), "3000"], env=env,
                               stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        part = None
        while part is None and time.monotonic() < deadline:
            assert process.poll() is None, "the write finished before it could be interrupted"
            part = next((p for p in output.iterdir() if is_part_name(p.name) and p.stat().st_size > 0), None)
            time.sleep(0.005)
        assert part is not None, "no write was seen in progress"
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert visible(output) == []  # the killed write is not in sight
    assert next_counter(output, "crash") == 1  # and does not take a number
    with TestClient(make_app(tmp_path, start_worker=False)) as client:
        assert client.get("/internal/files/output").json() == []
        assert client.get("/view", params={"filename": part.name}).status_code == 404

    rerun = subprocess.run([sys.executable, "-c", SLOW_SAVE, str(output), "64"], env=env, capture_output=True,
                           timeout=120, check=True)
    assert b"crash_00001_.png" in rerun.stdout
    assert visible(output) == ["crash_00001_.png"]  # the retried save leaves exactly one copy
    with Image.open(output / "crash_00001_.png") as image:
        image.load()
        assert image.size == (64, 64)
