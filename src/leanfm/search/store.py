"""The results store: one SQLite file that searches and bench runs share.

``Store(path)`` holds, keyed by :class:`ResultKey` (model hash, recipe hash, dataset, protocol
hash, leanfm version), every measured run record (the JSON of one ``runs[]`` entry), so a later
search or bench reuses it instead of measuring again. It also holds the trials of each search
(claimed, done, rejected, failed) so an interrupted search resumes where it stopped, and a log
of every measurement stored, so "measured exactly once" can be checked.

Several processes (e.g. Ray workers) may share one file: it runs in WAL mode, every write is
one ``BEGIN IMMEDIATE`` transaction, and a busy file is waited on for ``busy_timeout_s``. Only
committed rows count, so a ``kill -9`` at any point loses at most the trial being measured:
its claim is taken over once its worker is known dead (its pid is gone on this host) or, for a
worker on another host, once its heartbeat is older than ``lease_s``. Open one Store per
process; a Store that crosses a fork or a pickle (Ray) reopens the file there.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import LeanfmError, os_reason
from .keys import (ResultKey, canonical_json, model_hash, protocol_hash, recipe_hash,  # noqa: F401 (re-exported)
                   search_id)

SCHEMA = 1
TERMINAL = ("done", "rejected", "failed")
_HOST = socket.gethostname()
_KEY_COLS = ("model", "recipe", "dataset", "protocol", "version")
_DDL = """
CREATE TABLE IF NOT EXISTS results (model TEXT, recipe TEXT, dataset TEXT, protocol TEXT, version TEXT,
  run TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (model, recipe, dataset, protocol, version));
CREATE TABLE IF NOT EXISTS measurements (id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT, recipe TEXT,
  dataset TEXT, protocol TEXT, version TEXT, search_id TEXT, trial INTEGER, worker TEXT, inserted INTEGER,
  created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS measurements_key ON measurements (model, recipe, dataset, protocol, version);
CREATE TABLE IF NOT EXISTS trials (search_id TEXT, trial INTEGER, params TEXT NOT NULL, recipe TEXT NOT NULL,
  state TEXT NOT NULL, reason TEXT, result TEXT, worker TEXT, host TEXT, pid INTEGER, pid_start TEXT,
  attempts INTEGER NOT NULL, claimed REAL, heartbeat REAL, finished REAL, PRIMARY KEY (search_id, trial));
CREATE TABLE IF NOT EXISTS model_hashes (path TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, digest TEXT NOT NULL);
"""


def _pid_start(pid: int) -> str | None:
    """Start time of a process (Linux ``/proc``), to tell a reused pid from the claimer; None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    return start is None or _pid_start(pid) in (None, start)


class Store:
    """A results store in the SQLite file ``path`` (created with its folder if missing).

    ``lease_s``: how old a claim's heartbeat may be before a trial claimed by a worker on
    another host is taken over (a worker on this host is checked by pid, and holds its claim as
    long as it lives). ``busy_timeout_s``: how long a write waits for another process's.
    """

    def __init__(self, path: str | Path, lease_s: float = 600.0, busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.lease_s = float(lease_s)
        self.busy_timeout_s = float(busy_timeout_s)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._connect()

    # --- connection ------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        where = f"results store '{self.path}'"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except OSError as e:
            raise LeanfmError(f"cannot open {where}: {os_reason(e)}") from None
        except sqlite3.Error as e:
            raise LeanfmError(f"cannot open {where}: {e}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable across a process kill
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA:
                raise LeanfmError(f"{where} was written by a newer leanfm (store schema {version}); upgrade leanfm")
            self._conn, self._pid = conn, os.getpid()
            with self._tx() as c:
                for statement in _DDL.split(";"):  # not executescript: it commits first
                    if statement.strip():
                        c.execute(statement)
                c.execute(f"PRAGMA user_version = {SCHEMA}")
        except sqlite3.DatabaseError as e:
            conn.close()
            self._conn = None
            raise LeanfmError(f"cannot use {where}: {e}") from None
        return conn

    def _retry_locked(self, fn):
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _tx(self):
        conn = self._connect()
        self._retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        return {"path": self.path, "lease_s": self.lease_s, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state):
        self.__init__(**state)

    # --- model hash cache ------------------------------------------------------------------
    def cached_model_hash(self, path: str, fingerprint: str) -> str | None:
        row = self._connect().execute("SELECT fingerprint, digest FROM model_hashes WHERE path = ?", (path,)).fetchone()
        return row[1] if row and row[0] == fingerprint else None

    def save_model_hash(self, path: str, fingerprint: str, digest: str) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO model_hashes VALUES (?, ?, ?)", (path, fingerprint, digest))

    def model_hash(self, path: str | Path) -> str:
        """:func:`leanfm.search.keys.model_hash`, cached in this store."""
        return model_hash(path, store=self)

    # --- results ---------------------------------------------------------------------------
    def get(self, key: ResultKey) -> dict | None:
        """The stored run record of ``key``, or None if it was never measured."""
        row = self._connect().execute(
            f"SELECT run FROM results WHERE {' AND '.join(c + ' = ?' for c in _KEY_COLS)}", _key(key)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: ResultKey, run: dict, search_id: str | None = None, trial: int | None = None,
            worker: str | None = None) -> bool:
        """Store a measured run; the first writer of a key wins. Returns whether this one was
        stored. Either way the measurement is logged (:meth:`count_measured`)."""
        with self._tx() as c:
            return self._put(c, key, run, search_id, trial, worker)

    def _put(self, c, key, run, search_id, trial, worker) -> bool:
        now = time.time()
        inserted = c.execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (*_key(key), json.dumps(run), now)).rowcount == 1
        c.execute("INSERT INTO measurements (model, recipe, dataset, protocol, version, search_id, trial, worker, "
                  "inserted, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (*_key(key), search_id, trial, worker, int(inserted), now))
        return inserted

    def count_measured(self, key: ResultKey) -> int:
        """How many measurements of ``key`` were stored (a second one means work done twice)."""
        return self._connect().execute(
            f"SELECT COUNT(*) FROM measurements WHERE {' AND '.join(c + ' = ?' for c in _KEY_COLS)}",
            _key(key)).fetchone()[0]

    def measurements(self, search_id: str | None = None) -> list[dict]:
        """The measurement log (of one search, or all), oldest first."""
        q = "SELECT * FROM measurements" + (" WHERE search_id = ?" if search_id else "") + " ORDER BY id"
        return self._rows(q, (search_id,) if search_id else ())

    # --- trials ----------------------------------------------------------------------------
    def claim(self, search_id: str, trial: int, params: Any, recipe_hash: str, worker: str) -> bool:
        """Take trial ``trial`` of a search for ``worker``. False when it is finished (done,
        rejected or failed) or claimed by a live worker; a claim whose worker is dead is taken
        over. Within one process, a claim is held per ``worker`` name. A trial number seen before
        with other params or recipe is refused (the search's sampler must be deterministic for a
        resume to be right)."""
        params_json = canonical_json(params)
        pid, now = os.getpid(), time.time()
        with self._tx() as c:
            row = c.execute("SELECT params, recipe, state, worker, host, pid, pid_start, heartbeat FROM trials "
                            "WHERE search_id = ? AND trial = ?", (search_id, trial)).fetchone()
            if row is None:
                c.execute("INSERT INTO trials (search_id, trial, params, recipe, state, worker, host, pid, pid_start, "
                          "attempts, claimed, heartbeat) VALUES (?, ?, ?, ?, 'claimed', ?, ?, ?, ?, 1, ?, ?)",
                          (search_id, trial, params_json, recipe_hash, worker, _HOST, pid, _pid_start(pid), now, now))
                return True
            old_params, old_recipe, state, old_worker, host, old_pid, old_start, beat = row
            if (old_params, old_recipe) != (params_json, recipe_hash):
                raise LeanfmError(f"trial {trial} of search {search_id[:12]} was {old_params}, now {params_json}: "
                                  "the search does not repeat its trials; start it in a new store or with another seed")
            if state in TERMINAL:
                return False
            if host == _HOST and old_pid == pid:  # this process holds it: only under the same worker name
                return old_worker == worker
            if not self._dead(host, old_pid, old_start, beat, now):
                return False
            c.execute("UPDATE trials SET worker = ?, host = ?, pid = ?, pid_start = ?, attempts = attempts + 1, "
                      "claimed = ?, heartbeat = ? WHERE search_id = ? AND trial = ?",
                      (worker, _HOST, pid, _pid_start(pid), now, now, search_id, trial))
            return True

    def _dead(self, host, pid, start, beat, now) -> bool:
        if host == _HOST and pid is not None:
            return not _pid_alive(pid, start)
        return now - (beat or 0) > self.lease_s

    def heartbeat(self, search_id: str, trial: int) -> bool:
        """Renew a claim (a worker on another host loses it after ``lease_s`` without one)."""
        return self._set(search_id, trial, "heartbeat = ?", (time.time(),))

    def finish(self, search_id: str, trial: int, result: Any = None, key: ResultKey | None = None,
               run: dict | None = None, worker: str | None = None) -> bool:
        """Mark a claimed trial done with ``result`` (e.g. its objective values). With ``key``
        and ``run``, the run is stored (:meth:`put`) in the same transaction, so a kill cannot
        leave a measured run whose trial is still open. False if the trial was not claimed (then
        the run is still stored if its key is new, and logged: work done twice shows)."""
        with self._tx() as c:
            if key is not None and run is not None:
                self._put(c, key, run, search_id, trial, worker)
            return self._update(c, search_id, trial, "state = 'done', result = ?, finished = ?",
                                (canonical_json(result), time.time()))

    def reject(self, search_id: str, trial: int, reason: str) -> bool:
        """Mark a claimed trial rejected without measuring it (e.g. over the budget)."""
        return self._set(search_id, trial, "state = 'rejected', reason = ?, finished = ?", (reason, time.time()))

    def fail(self, search_id: str, trial: int, error: str) -> bool:
        """Mark a claimed trial failed with its one-line error (not retried on resume)."""
        return self._set(search_id, trial, "state = 'failed', reason = ?, finished = ?", (error, time.time()))

    def _set(self, search_id, trial, assign, values) -> bool:
        with self._tx() as c:
            return self._update(c, search_id, trial, assign, values)

    @staticmethod
    def _update(c, search_id, trial, assign, values) -> bool:
        return c.execute(f"UPDATE trials SET {assign} WHERE search_id = ? AND trial = ? AND state = 'claimed'",
                         (*values, search_id, trial)).rowcount == 1

    def trials(self, search_id: str) -> list[dict]:
        """Every trial of a search, by number, with ``params`` and ``result`` decoded."""
        rows = self._rows("SELECT * FROM trials WHERE search_id = ? ORDER BY trial", (search_id,))
        for r in rows:
            r["params"] = json.loads(r["params"])
            r["result"] = json.loads(r["result"]) if r["result"] is not None else None
        return rows

    def _rows(self, query: str, args: tuple) -> list[dict]:
        cur = self._connect().execute(query, args)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def _key(key: ResultKey) -> tuple:
    return tuple(getattr(key, c) for c in _KEY_COLS)
