"""Writing files so that no reader ever sees a partial one: the bytes go to a hidden part file beside the target,
are flushed to disk, and are renamed over the target in one step (atomic on POSIX and Windows). A process killed
mid-write leaves at most a hidden `.<name>.<random>.part` file, which listings skip and `remove_stale_parts`
clears up later.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PART_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")


PART_NAME_BYTES = 255 - len(".") - len(".01234567.part")  # the part file of a 255-byte name must fit too


def part_path(path: Path) -> Path:
    name = path.name
    while len(name.encode("utf-8", "surrogateescape")) > PART_NAME_BYTES:
        name = name[:-1]
    return path.parent / f".{name}.{uuid.uuid4().hex[:8]}.part"


def is_part_name(name: str) -> bool:
    """Whether `name` is an unfinished write of `atomic_writer` (never a file to serve)."""
    return bool(PART_NAME.match(name))


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """`with atomic_writer(p) as handle: ...` writes `p` whole or not at all (an exception removes the part)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    try:
        with open(part, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def remove_stale_parts(folder: str | os.PathLike[str], older_than_seconds: float = 3600.0) -> int:
    """Delete part files left by killed writers (recursively); recent ones may belong to a live writer."""
    root = Path(folder)
    if not root.is_dir():
        return 0
    cutoff = time.time() - older_than_seconds
    removed = 0
    for directory, _, names in os.walk(root):
        for name in names:
            if not is_part_name(name):
                continue
            path = Path(directory) / name
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
    return removed
