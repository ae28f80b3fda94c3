"""The prompt queue and the history, kept in SQLite (stdlib) so that both survive a restart, even `kill -9`.

Every change is one committed transaction in WAL mode, so a crash loses at most the change in flight. A prompt
that was running when the process died goes back to pending at its original priority and runs again.

Priority follows ComfyUI: the lowest `number` runs first; `front` prompts get negative numbers (later front
prompts first); ties run in submission order.

Secrets (API keys and tokens in extra_data, at any depth) are never written to disk and never returned by
listings: they are split off at submission (server.credentials) and the top-level ones are kept in memory only for
the worker (so after a restart they are gone).

Output numbering (local mode): while a prompt runs, each counter its saves take (SaveImage's `_00001_`) is recorded
against the queued prompt before the file is written (`PromptOutputNumbering`), and the records go with the queue
row. A prompt re-run after a crash reuses its records, so it writes the names of its first attempt instead of
counting up (the counterpart of server.outputs_commit's deduplication by prompt id in Ray mode), and no other
prompt takes a number a queued prompt holds.

JSON goes in through jsonsafe.dumps and comes out through jsonsafe.loads_lenient, so whatever is stored can be
served back; a row that cannot be read at all (a damaged database) is reported in place of its entry, never
raised to the caller.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentloom.engine import jsonsafe

from .credentials import split_secrets

log = logging.getLogger("latentloom.server")
HISTORY_LIMIT = 10_000
UNREADABLE = "StoredEntryUnreadable"

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    created REAL NOT NULL,
    started REAL
);
CREATE INDEX IF NOT EXISTS queue_order ON queue (state, number, seq);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    entry TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS output_claims (
    prompt_id TEXT NOT NULL REFERENCES queue (prompt_id) ON DELETE CASCADE,
    folder TEXT NOT NULL,
    basename TEXT NOT NULL,
    occurrence INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    files INTEGER NOT NULL,
    PRIMARY KEY (prompt_id, folder, basename, occurrence)
);
CREATE INDEX IF NOT EXISTS output_claims_by_name ON output_claims (folder, basename);
"""


def _read(text: str, what: str, prompt_id: str) -> Any:
    """A stored JSON column; None (logged) when the row is damaged beyond reading."""
    try:
        return jsonsafe.loads_lenient(text)
    except jsonsafe.JsonInputError as exc:
        log.warning("the stored %s of prompt %s cannot be read: %s", what, prompt_id, exc)
        return None


def unreadable_entry(prompt_id: str) -> dict:
    """The history entry reported in place of one that cannot be read: a failed prompt that says why."""
    error = {"prompt_id": prompt_id, "node_id": "", "node_type": "", "executed": [],
             "exception_type": UNREADABLE, "traceback": [], "current_inputs": {}, "current_outputs": [],
             "exception_message": "this history entry is damaged in the queue database and cannot be read; "
                                  "delete it by id (POST /history {\"delete\": [id]})",
             "timestamp": 0}
    return {"prompt": [0, prompt_id, {}, {}, []], "outputs": {}, "meta": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]}}


def _read_entry(text: str, prompt_id: str) -> dict:
    entry = _read(text, "history entry", prompt_id)
    return entry if isinstance(entry, dict) else unreadable_entry(prompt_id)


def _number_json(number: float) -> int | float:
    return int(number) if float(number).is_integer() else number


@dataclass
class QueueItem:
    number: float
    prompt_id: str
    prompt: dict
    extra_data: dict
    outputs: list[str]
    state: str = "pending"
    created: float = 0.0
    started: float | None = None
    secrets: dict = field(default_factory=dict)

    def as_tuple(self) -> list:
        """ComfyUI's queue item: [number, prompt_id, prompt, extra_data, outputs_to_execute] (no secrets)."""
        return [_number_json(self.number), self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        value = self.extra_data.get("client_id")
        return str(value) if value else None


class PromptOutputNumbering:
    """nodes.image_files.OutputNumbering for one run of one queued prompt (the local worker sets it around the run).

    Saves are told apart by their order per (folder, basename): a re-run of the same graph saves in the same order,
    so its n-th save gets the counter of the first attempt's n-th save and replaces that file. A prefix with a time
    token (`%second%`) names a new file on the re-run, as it would in ComfyUI. A pack's get_save_image_path does not
    say how many files follow, so its claim holds one number.
    """

    def __init__(self, store: QueueStore, prompt_id: str):
        self.store = store
        self.prompt_id = prompt_id
        self._occurrences: dict[tuple[str, str], int] = {}

    def counter(self, folder: Path, basename: str, free: int, files: int) -> int:
        key = (str(folder), basename)
        occurrence = self._occurrences.get(key, 0)
        self._occurrences[key] = occurrence + 1
        return self.store.claim_counter(self.prompt_id, key[0], basename, occurrence, free, files)


class DuplicatePromptId(ValueError):
    pass


class QueueStore:
    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._secrets: dict[str, dict] = {}
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")  # a prompt's output claims leave with its queue row
            self._db.executescript(SCHEMA)
            # A prompt that was running when the process died runs again.
            self._db.execute("UPDATE queue SET state='pending', started=NULL WHERE state='running'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Submission ---------------------------------------------------------------------------------------------

    def next_number(self, front: bool) -> int:
        """ComfyUI's counter: advances on every submission without an explicit number; front ones are negative."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='counter'").fetchone()
            counter = int(row[0]) if row else 0
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('counter', ?)", (str(counter + 1),))
            return -counter if front else counter

    def put(self, item: QueueItem) -> None:
        """Queue `item`; its extra_data loses its credentials here (kept in memory for the worker only)."""
        public, secret = split_secrets(item.extra_data)
        item.extra_data = public
        with self._lock:
            if self._db.execute("SELECT 1 FROM queue WHERE prompt_id=?", (item.prompt_id,)).fetchone():
                raise DuplicatePromptId(f"prompt_id '{item.prompt_id}' is already queued")
            item.created = item.created or time.time()
            self._db.execute(
                "INSERT INTO queue (prompt_id, number, prompt, extra_data, outputs, created) VALUES (?,?,?,?,?,?)",
                (item.prompt_id, float(item.number), jsonsafe.dumps(item.prompt), jsonsafe.dumps(public),
                 jsonsafe.dumps(item.outputs), item.created))
            if secret:
                self._secrets[item.prompt_id] = secret

    # Worker side --------------------------------------------------------------------------------------------

    def take_next(self) -> QueueItem | None:
        """Move the highest-priority pending prompt to running and return it (with its secrets)."""
        with self._lock:
            row = self._db.execute(
                "SELECT number, prompt_id, prompt, extra_data, outputs, state, created, started FROM queue "
                "WHERE state='pending' ORDER BY number, seq LIMIT 1").fetchone()
            if row is None:
                return None
            started = time.time()
            self._db.execute("UPDATE queue SET state='running', started=? WHERE prompt_id=?", (started, row[1]))
            item = self._item(row)
            item.state, item.started = "running", started
            item.secrets = self._secrets.pop(item.prompt_id, {})
            return item

    def finish(self, item: QueueItem, entry: dict, status: str) -> None:
        """Record the history entry and drop the prompt from the queue in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM queue WHERE prompt_id=?", (item.prompt_id,))
                # A reused prompt_id replaces its old entry (ComfyUI overwrites it too) and moves to the end.
                self._db.execute("DELETE FROM history WHERE prompt_id=?", (item.prompt_id,))
                self._db.execute(
                    "INSERT INTO history (prompt_id, entry, status, created, started, finished) VALUES (?,?,?,?,?,?)",
                    (item.prompt_id, jsonsafe.dumps(entry), status, item.created, item.started, time.time()))
                # Retention: everything at or below the (limit+1)-th newest row goes (an index lookup, not a scan).
                self._db.execute(
                    "DELETE FROM history WHERE seq <= (SELECT seq FROM history ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (HISTORY_LIMIT,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claim_counter(self, prompt_id: str, folder: str, basename: str, occurrence: int, free: int,
                      files: int) -> int:
        """The first counter of the `occurrence`-th save of `basename` into `folder` by the queued prompt: the one
        its earlier attempt recorded, else `free` moved past the numbers other queued prompts hold (a prompt
        interrupted by a crash may not have written its files yet). Recorded before the file is written."""
        with self._lock:
            row = self._db.execute(
                "SELECT counter FROM output_claims WHERE prompt_id=? AND folder=? AND basename=? AND occurrence=?",
                (prompt_id, folder, basename, occurrence)).fetchone()
            if row is not None:
                return int(row[0])
            held = self._db.execute(
                "SELECT MAX(counter + files) FROM output_claims WHERE folder=? AND basename=? AND prompt_id<>?",
                (folder, basename, prompt_id)).fetchone()[0]
            counter = max(free, held or 0)
            try:
                self._db.execute("INSERT INTO output_claims (prompt_id, folder, basename, occurrence, counter, files) "
                                 "VALUES (?,?,?,?,?,?)", (prompt_id, folder, basename, occurrence, counter, files))
            except sqlite3.IntegrityError:  # the prompt is no longer queued: nothing to re-run, nothing to record
                pass
            return counter

    def requeue(self, prompt_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE queue SET state='pending', started=NULL WHERE prompt_id=?", (prompt_id,))

    # Queue views and edits ----------------------------------------------------------------------------------

    def _item(self, row) -> QueueItem:
        """A queue row; damaged columns read as empty (the prompt then fails validation and says so)."""
        number, prompt_id, prompt, extra_data, outputs, state, created, started = row
        prompt_value = _read(prompt, "prompt", prompt_id)
        extra_value = _read(extra_data, "extra_data", prompt_id)
        outputs_value = _read(outputs, "outputs", prompt_id)
        return QueueItem(number, prompt_id, prompt_value if isinstance(prompt_value, dict) else {},
                         extra_value if isinstance(extra_value, dict) else {},
                         outputs_value if isinstance(outputs_value, list) else [], state, created, started)

    def items(self, state: str | None = None) -> list[QueueItem]:
        query = "SELECT number, prompt_id, prompt, extra_data, outputs, state, created, started FROM queue"
        args: tuple[str, ...] = ()
        if state:
            query += " WHERE state=?"
            args = (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY number, seq", args).fetchall()
        return [self._item(r) for r in rows]

    def counts(self) -> tuple[int, int]:
        """(pending, running)."""
        with self._lock:
            rows = dict(self._db.execute("SELECT state, COUNT(*) FROM queue GROUP BY state").fetchall())
        return rows.get("pending", 0), rows.get("running", 0)

    def remaining(self) -> int:
        pending, running = self.counts()
        return pending + running

    def delete_pending(self, prompt_ids: list[str]) -> int:
        with self._lock:
            removed = 0
            for prompt_id in prompt_ids:
                removed += self._db.execute("DELETE FROM queue WHERE prompt_id=? AND state='pending'",
                                            (str(prompt_id),)).rowcount
                self._secrets.pop(str(prompt_id), None)
            return removed

    def clear_pending(self) -> int:
        with self._lock:
            pending = [r[0] for r in self._db.execute("SELECT prompt_id FROM queue WHERE state='pending'")]
            for prompt_id in pending:
                self._secrets.pop(prompt_id, None)
            return self._db.execute("DELETE FROM queue WHERE state='pending'").rowcount

    def queued(self, prompt_id: str) -> QueueItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT number, prompt_id, prompt, extra_data, outputs, state, created, started FROM queue "
                "WHERE prompt_id=?", (prompt_id,)).fetchone()
        return self._item(row) if row else None

    # History --------------------------------------------------------------------------------------------------

    def history(self, max_items: int | None = None, offset: int | None = None) -> dict[str, dict]:
        """ComfyUI's slicing: oldest first; max_items alone = the last N; offset = start index."""
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
            start = 0
            if offset is not None and offset >= 0:
                start = offset
            elif max_items is not None:
                start = max(0, total - max_items)
            limit = -1 if max_items is None else max(0, max_items)
            rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ? OFFSET ?",
                                    (limit, start)).fetchall()
        return {prompt_id: _read_entry(entry, prompt_id) for prompt_id, entry in rows}

    def history_entry(self, prompt_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return _read_entry(row[0], prompt_id) if row else None

    def history_rows(self, statuses: set[str] | None, limit: int, offset: int) -> tuple[list[dict], int]:
        """Newest first, for the jobs API: ({prompt_id, entry, status, created, started, finished}, total)."""
        where, args = "", []
        if statuses is not None:
            where = f" WHERE status IN ({','.join('?' * len(statuses))})"
            args = sorted(statuses)
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM history" + where, args).fetchone()[0]
            rows = self._db.execute(
                "SELECT prompt_id, entry, status, created, started, finished FROM history" + where
                + " ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)).fetchall()
        keys = ("prompt_id", "entry", "status", "created", "started", "finished")
        out = []
        for row in rows:
            record = dict(zip(keys, row, strict=False))
            record["entry"] = _read_entry(record["entry"], record["prompt_id"])
            out.append(record)
        return out, total

    def history_record(self, prompt_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT prompt_id, entry, status, created, started, finished FROM history "
                                   "WHERE prompt_id=?", (prompt_id,)).fetchone()
        if row is None:
            return None
        record = dict(zip(("prompt_id", "entry", "status", "created", "started", "finished"), row, strict=False))
        record["entry"] = _read_entry(record["entry"], prompt_id)
        return record

    def delete_history(self, prompt_ids: list[str]) -> None:
        with self._lock:
            for prompt_id in prompt_ids:
                self._db.execute("DELETE FROM history WHERE prompt_id=?", (str(prompt_id),))

    def clear_history(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM history")
