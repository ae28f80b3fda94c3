"""Committing the files Ray workers produce into the server's output and temp folders (where /view finds them).

A worker ships the bytes of each new file with the `executed` event that names it (server.ray_pool). Here each
file gets its final name and is written atomically (a hidden part file, then a rename), so a worker dying
mid-write never leaves a partial file. Names follow ComfyUI's `<base>_<counter:05>_.<ext>` numbering, counted
against the server's folder under one lock, so workers writing the same prefix at once never collide.

Deduplication: the committed name of a file is remembered by (prompt, node, UI key, position). When a prompt runs
again after its worker died, its files overwrite the names of the first attempt instead of taking new counters, so
a retried prompt leaves exactly the files a single run leaves. A cached `executed` event (no new bytes) is mapped
back through the worker's own record of staged name -> committed entry. This record lives in the server's memory:
it covers a worker's death, not the server's. Local mode keeps its counterpart in the queue database
(server.queue_store.PromptOutputNumbering), so there a prompt re-run after the server was killed keeps its names.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from latentloom.engine.files import write_atomically
from latentloom.nodes.image_files import next_counter  # SaveImage's numbering rule, shared

from .ray_pool import FileKey, file_entries, file_key

__all__ = ["COUNTED_NAME", "OutputCommitter", "next_counter"]
COUNTED_NAME = re.compile(r"^(?P<base>.+)_(?P<counter>\d{5,})_(?P<ext>\.[A-Za-z0-9]+)$")


class OutputCommitter:
    def __init__(self, roots: dict[str, Path]):
        self.roots = {kind: Path(root).resolve() for kind, root in roots.items()}
        self._lock = threading.Lock()
        self._by_prompt: dict[str, dict[tuple, dict]] = {}   # prompt -> (node, key, position) -> committed entry
        self._by_worker: dict[str, dict[FileKey, dict]] = {}  # worker -> staged (type, subfolder, name) -> entry

    def commit(self, worker_id: str, prompt_id: str, node: str, ui: dict | None,
               files: dict[FileKey, bytes]) -> dict | None:
        """`ui` with its file entries renamed to their committed names, after writing the shipped `files`."""
        if not ui:
            return ui
        renamed = {key: list(values) if isinstance(values, list) else values for key, values in ui.items()}
        with self._lock:
            prompt_names = self._by_prompt.setdefault(prompt_id, {})
            worker_names = self._by_worker.setdefault(worker_id, {})
            for key, index, entry in file_entries(ui):
                staged = file_key(entry)
                committed = None
                if staged in files:
                    committed = self._place(prompt_names.get((node, key, index)), staged, files[staged])
                    worker_names[staged] = committed
                else:
                    committed = worker_names.get(staged)
                if committed is not None:
                    prompt_names[(node, key, index)] = committed
                    renamed[key][index] = {**entry, **committed}
        return renamed

    def rewrite(self, worker_id: str, prompt_id: str, node: str, ui: dict | None) -> dict | None:
        """The committed form of UI data already seen in `executed` events (for the history entry)."""
        return self.commit(worker_id, prompt_id, node, ui, {})

    def forget_prompt(self, prompt_id: str) -> None:
        with self._lock:
            self._by_prompt.pop(prompt_id, None)

    def forget_worker(self, worker_id: str) -> None:
        with self._lock:
            self._by_worker.pop(worker_id, None)

    def _place(self, previous: dict | None, staged: FileKey, data: bytes) -> dict:
        """Write one file; returns its committed {"filename", "subfolder", "type"}. Caller holds the lock."""
        kind, subfolder, name = staged
        root = self.roots[kind]
        folder = Path(os.path.normpath(root / subfolder))
        if not folder.is_relative_to(root):
            raise ValueError(f"worker output '{subfolder}/{name}' points outside the {kind} folder")
        if previous is not None and previous["type"] == kind and previous["subfolder"] == subfolder:
            final = previous["filename"]        # a retried prompt: same name as its first attempt
        else:
            match = COUNTED_NAME.match(name)
            final = name
            if match:
                counter = next_counter(folder, match["base"])
                final = f"{match['base']}_{counter:05}_{match['ext']}"
        path = folder / final
        if not path.resolve().is_relative_to(root) or "/" in final or final in ("", ".", ".."):
            raise ValueError(f"worker output name '{final}' is not a plain file name")
        write_atomically(path, data)
        return {"filename": final, "subfolder": subfolder, "type": kind}
