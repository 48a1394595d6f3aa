"""The fragment library: a cache of fragments in the fragments folder, found by prompt and reused for paraphrases.

Layout (``folder`` is ComfyUI's ``models/fragments``)::

    folder/<name>.json, <name>.safetensors     entries, saved by store.save_fragment (the node dropdown lists them)
    folder/.library/index.sqlite3              one row per entry (see _SCHEMA)
    folder/.library/lock                       fcntl lock held by every writer
    folder/.library/quarantine/                corrupt entries, renamed *.quarantined so no loader lists them

Key: ``fingerprint.fingerprint(base_sha256, embedding, params)``.  Lookup
(hypothesis H3): the exact key first, then the nearest entry of the same base
model by cosine of the pooled prompt embedding, accepted at ``threshold``
(0.9 by default).  Size cap: least recently used entries are evicted (an
access counter orders them, so ties in wall-clock time cannot reorder).

Crash safety (issue #16): every write goes through ``store.install``, all
library writers (``add``, ``register``, ``unpack``, eviction, quarantine)
hold the lock, and ``<name>.json`` is the one pointer that switches.  What a
kill (even ``kill -9``) at each step of adding or replacing an entry leaves:

1. while the new tensors are written to ``.<name>.safetensors.tmp-<pid>`` or
   fsynced: the old entry (or none), complete and loadable; the temporary is
   swept by the next writer.
2. after the tensors are renamed to a name the old manifest does not use
   (``<name>.safetensors`` when free, else ``<name>.<sha256[:16]>.safetensors``):
   still the old entry; the new file is an orphan the next writer deletes.
3. while the new manifest is written to ``.<name>.json.tmp-<pid>``: the old entry.
4. after the manifest rename (atomic): the new entry, complete; the old tensors
   file, until it is deleted, is an orphan swept like the others.
5. before the index row is written (``add``/``register``): the new entry's
   files, unindexed (visible by name, not found by auto mode, never evicted).
   When a replace comes with no row (``unpack`` of a pack without one), the old
   row is deleted before step 1, so no row ever answers with the wrong fragment.

Eviction writes ``.<name>.evict.tmp-<pid>`` (the digests of the two files) before
it deletes the row, then removes the manifest, then the tensors file: a kill
after the row delete leaves files the next writer's sweep removes, and only
if their bytes are still the recorded ones.

A row records the tensors digest it was made for; ``lookup`` does not serve a
row whose manifest now names other tensors (a ``save_fragment(overwrite=True)``
or a copy by hand replaced the fragment without a new row) and drops it.

Untrusted paths (issue #29): the index is a file in the user's folder and may
be edited.  Every row is checked before use (a row's name becomes a path, so
it must be a plain fragment name); readers skip a bad row with a warning,
eviction deletes it and touches no file.  A symlinked ``.library``, index,
journal or lock file is refused, never followed.

A reader therefore sees the old entry or the new one, never a mix; sqlite's
journal makes each row change atomic.  Only files the index names, and
orphans of this naming beside a manifest that names another file, are ever
deleted: fragments a user placed by hand are never touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ...errors import FragmentError, IntegrityError, ReadError
from ..format.hashing import sha256_file
from ..format.manifest import Fragment
from ..format.store import (
    MAX_MANIFEST_BYTES, OWN_TENSORS, check_name, ensure_folder, load_fragment, named_by, read_manifest, save_fragment
)
from ..format.untrusted import check_base, check_inside, check_plain_name, confined, parse_json
from .fingerprint import cosine, embedding_from_bytes, embedding_sha256, embedding_to_bytes, fingerprint, params_sha256

log = logging.getLogger(__name__)

LIBRARY_DIR = ".library"
DEFAULT_THRESHOLD = 0.9
DEFAULT_CAP_BYTES = 20 << 30
_READ_ATTEMPTS = 5  # a reader re-reads a manifest replaced under it; five replaces during one load is churn enough
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, name TEXT UNIQUE NOT NULL, base_sha256 TEXT NOT NULL, prompt TEXT NOT NULL,
    embedding BLOB NOT NULL, embedding_sha256 TEXT NOT NULL, params TEXT NOT NULL, params_sha256 TEXT NOT NULL,
    size INTEGER NOT NULL, created REAL NOT NULL, last_access REAL NOT NULL, access_seq INTEGER NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0, tensors_sha256 TEXT);
CREATE INDEX IF NOT EXISTS entries_by_base ON entries (base_sha256);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = ("key", "name", "base_sha256", "prompt", "embedding", "embedding_sha256", "params", "params_sha256",
            "size", "created", "last_access", "access_seq", "hits", "tensors_sha256")
_KEY = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_EMBEDDING = 65536  # floats; sharing.MAX_EMBEDDING, the largest row a pack may carry
_MAX_SIZE = 1 << 62
# The index, the files sqlite itself opens beside it, and the lock: a symlink planted under one of these
# names would send writes outside the library folder as surely as a symlinked index.
_COUNTERS = ("hits", "misses", "evictions", "quarantined", "adds")
_EVICT = ".evict"  # marker stem suffix: .<name>.evict.tmp-<pid>, written by an eviction before it removes anything
_INDEX_FILES = ("index.sqlite3", "index.sqlite3-journal", "index.sqlite3-wal", "index.sqlite3-shm", "lock")


@dataclass(frozen=True)
class LookupResult:
    """What ``lookup`` found: ``hit`` with the manifest to load, or a miss with the reason."""

    hit: bool
    manifest_path: Path | None
    similarity: float
    reason: str
    key: str | None = None


def library_dir(folder: str | os.PathLike) -> Path:
    return Path(folder) / LIBRARY_DIR


def _checked_library_dir(folder: str | os.PathLike, *, create: bool) -> Path:
    """``folder/.library`` after checking it is a real folder (created when ``create``), never a symlink.

    A symlinked ``.library`` would put the index, the lock and the quarantine wherever it points (issue #29).
    """
    directory = library_dir(folder)
    if directory.is_symlink():
        raise FragmentError(f"{directory}: expected the library folder itself, found a symlink to "
                            f"{os.readlink(directory)!r}; nothing was read or written through it")
    if directory.exists() and not directory.is_dir():
        raise FragmentError(f"{directory}: expected the library folder, found a file")
    if create:
        ensure_folder(directory)
    for name in _INDEX_FILES:
        path = directory / name
        if path.is_symlink():
            raise FragmentError(f"{path}: expected the library's own {name} file (or none), found a symlink to {os.readlink(path)!r}; nothing was read or written through it")
    return directory


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the library's exclusive lock (``fcntl.flock``; released by the kernel if the holder dies).

    >>> import tempfile
    >>> with locked(tempfile.mkdtemp()): pass
    """
    directory = _checked_library_dir(folder, create=True)
    path = directory / "lock"
    try:  # O_NOFOLLOW: a symlinked lock file must not create or lock a file outside the folder
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        found = f"a symlink to {os.readlink(path)!r}" if path.is_symlink() else str(exc)
        raise FragmentError(f"{path}: expected a lock file that can be opened, found {found}") from None
    with os.fdopen(fd, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: ComfyUI runs one process per folder there; sqlite still serialises rows
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _db(folder: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    directory = _checked_library_dir(folder, create=True)
    index = directory / "index.sqlite3"
    if index.exists() and not index.is_file():
        raise FragmentError(f"{index}: expected the library index file, found a directory or special file")
    try:  # connect inside the try: a folder in its place fails here, not in the first query
        con = sqlite3.connect(index, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise FragmentError(f"{index}: expected a readable library index, found: {exc}") from exc
    # An edited row's text that is not UTF-8 comes back as bytes, which _checked_row refuses for that row alone;
    # sqlite3's default decoding failed the whole query, so no reader, nor the eviction that drops bad rows, ran.
    con.text_factory = _text
    try:
        con.executescript(_SCHEMA)
        _migrate(con)
        yield con
    except sqlite3.DatabaseError as exc:
        raise FragmentError(f"{index}: library index unreadable: {exc}") from exc
    finally:
        con.close()


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _migrate(con: sqlite3.Connection) -> None:
    """Add ``tensors_sha256`` to an index made before it existed (its rows stay NULL: not checked for staleness)."""
    if any(row[1] == "tensors_sha256" for row in con.execute("PRAGMA table_info(entries)")):
        return
    try:
        con.execute("ALTER TABLE entries ADD COLUMN tensors_sha256 TEXT")
    except sqlite3.OperationalError:  # another process added it first
        if not any(row[1] == "tensors_sha256" for row in con.execute("PRAGMA table_info(entries)")):
            raise


def _has_index(folder: str | os.PathLike) -> bool:
    """Whether the library index exists; a ``FragmentError`` when ``.library`` or the index is not what it must be
    (reported as an empty library before, which hid the mistake)."""
    directory = _checked_library_dir(folder, create=False)
    index = directory / "index.sqlite3"
    if index.exists() and not index.is_file():
        raise FragmentError(f"{index}: expected the library index file, found a directory or special file")
    return index.exists()


def _index_source(folder: str | os.PathLike) -> str:
    return str(library_dir(folder) / "index.sqlite3")


def _checked_row(folder: str | os.PathLike, rowid: Any, row: tuple[Any, ...]) -> dict[str, Any]:
    """One index row, every field type- and range-checked (embedding decoded, params parsed); an
    ``IntegrityError`` naming the index, the row and the field otherwise.

    The index is a file in the user's folder and may have been edited: a row's ``name`` becomes a path
    (``<name>.json``), so it must be a plain fragment name (issue #29: ``../outside/victim`` was deleted).
    """
    source = f"{_index_source(folder)}: row {rowid}"
    entry = dict(zip(_COLUMNS, row))

    def bad(column: str, expected: str) -> IntegrityError:
        return IntegrityError(f"{source}: {column}: expected {expected}, found {str(entry.get(column))[:80]!r}")

    def is_int(x: Any, low: int, high: int) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and low <= x <= high

    if not isinstance(entry["key"], str) or not _KEY.fullmatch(entry["key"]):
        raise bad("key", "32 lowercase hex digits")
    try:
        check_name(entry["name"])
    except FragmentError:
        raise bad("name", "a plain fragment name (letters, digits, '.', '_', '-'; no path)") from None
    for column in ("base_sha256", "prompt", "embedding_sha256", "params_sha256"):
        if not isinstance(entry[column], str):
            raise bad(column, "text")
    blob = entry["embedding"]
    if not isinstance(blob, bytes) or not 0 < len(blob) <= 4 * _MAX_EMBEDDING or len(blob) % 4:
        raise bad("embedding", f"1 to {_MAX_EMBEDDING} float32 values as bytes")
    embedding = embedding_from_bytes(blob)
    if not bool(torch.isfinite(embedding).all()):
        raise bad("embedding", "finite float32 values")
    entry["embedding"] = embedding
    text = entry["params"]
    params = (parse_json(text, f"{source}: params", IntegrityError)
              if isinstance(text, str) and len(text) <= MAX_MANIFEST_BYTES else None)
    if not isinstance(params, dict):
        raise bad("params", "a JSON object")
    entry["params"] = params
    for column, high in (("size", _MAX_SIZE), ("access_seq", _MAX_SIZE), ("hits", _MAX_SIZE)):
        if not is_int(entry[column], 0, high):
            raise bad(column, f"an integer from 0 to {high}")
    for column in ("created", "last_access"):
        value = entry[column]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad(column, "a finite time stamp")
    sha = entry["tensors_sha256"]
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        raise bad("tensors_sha256", "64 lowercase hex digits or NULL")
    return entry


def _rows(folder: str | os.PathLike, con: sqlite3.Connection, where: str = "", args: tuple[Any, ...] = ()
          ) -> tuple[list[dict[str, Any]], list[tuple[Any, IntegrityError]]]:
    """Checked rows in LRU order, and the rows that fail the check as ``(rowid, error)``.

    Readers skip a bad row with a warning (one edited row must not hide the library or stop a queue);
    eviction deletes it.
    """
    good, bad = [], []
    query = f"SELECT rowid, {', '.join(_COLUMNS)} FROM entries {where} ORDER BY access_seq, rowid"
    for rowid, *row in con.execute(query, args).fetchall():
        try:
            good.append(_checked_row(folder, rowid, tuple(row)))
        except FragmentError as exc:
            bad.append((rowid, exc if isinstance(exc, IntegrityError) else IntegrityError(str(exc))))
    return good, bad


def _warn_skipped(bad: list[tuple[Any, IntegrityError]]) -> None:
    for _, exc in bad:
        log.warning("library: skipping an unusable index row (run `library --evict-to` to drop it): %s", exc)


def _bump(con: sqlite3.Connection, name: str, by: int = 1) -> None:
    con.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by))


def _next_seq(con: sqlite3.Connection) -> int:
    # Only well-formed counts: an edited row's 2**63 - 1 or text must not overflow the next one.
    return int(con.execute("SELECT COALESCE(MAX(access_seq), 0) + 1 FROM entries WHERE typeof(access_seq) = 'integer' "
                           "AND access_seq BETWEEN 0 AND ?", (_MAX_SIZE - 1,)).fetchone()[0])


def entries(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every indexed entry, least recently used first (embedding decoded to a tensor, params to a dict).

    A row that fails its checks (an edited index) is skipped with a warning naming it.

    >>> import tempfile; entries(tempfile.mkdtemp())
    []
    """
    if not _has_index(folder):
        return []
    with _db(folder) as con:
        good, bad = _rows(folder, con)
    _warn_skipped(bad)
    return good


def stats(folder: str | os.PathLike) -> dict[str, int]:
    """Entry count, bytes, and the hit / miss / eviction / quarantine counters (usable rows only).

    >>> import tempfile; stats(tempfile.mkdtemp())["entries"]
    0
    """
    result = {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0, "quarantined": 0, "adds": 0}
    if not _has_index(folder):
        return result
    with _db(folder) as con:
        good, bad = _rows(folder, con)
        counters = con.execute("SELECT name, value FROM counters").fetchall()
    _warn_skipped(bad)
    result.update({"entries": len(good), "bytes": sum(e["size"] for e in good)})
    for name, value in counters:
        if name in _COUNTERS and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SIZE:
            result[name] = value
        else:
            log.warning("library: %s: counter %s: expected one of %s with a count >= 0, found %s; ignored",
                        _index_source(folder), str(name)[:40], sorted(result), str(value)[:40])
    return result


def _sweep_temporaries(folder: Path) -> None:
    """Delete what writers that died left: temporaries (``.<name>.<ext>.tmp-<pid>``, see ``store.install``),
    orphan tensors files of this library's own naming that no manifest names (a kill between install steps),
    and the rest of an entry whose eviction was killed after its row was deleted (``_finish_eviction``).

    Orphans are only looked for under names with no live writer's ``.<name>.install.tmp-<pid>`` marker: a
    writer between renaming its tensors and its manifest has a new file no manifest names yet.
    """
    live: set[str] = set()
    died: set[str] = set()  # names a writer was installing when it died: their unnamed tensors files are its own
    for path in folder.glob(".*.tmp-*"):
        stem, _, pid = path.name.rpartition(".tmp-")
        if not pid.isdigit() or (path.is_dir() and not path.is_symlink()):
            continue  # writers leave files (or links planted under their names), never folders: not ours
        if _alive(int(pid)):
            if stem.endswith(".install"):
                live.add(stem[1 : -len(".install")])
            continue
        if stem.endswith(".install"):
            died.add(stem[1 : -len(".install")])
        if stem.endswith(_EVICT) and path.is_file() and not path.is_symlink():
            _finish_eviction(folder, stem[1 : -len(_EVICT)], path)
        log.info("library: removing %s left by a writer that died", path)
        path.unlink(missing_ok=True)
    for path in folder.glob("*.safetensors"):
        match = OWN_TENSORS.fullmatch(path.name)
        if match is None or match["stem"] in live or not path.is_file() or path.is_symlink():
            continue
        manifest = folder / f"{match['stem']}.json"
        if match["stem"] != path.name[: -len(".safetensors")] and (folder / f"{path.name[: -len('.safetensors')]}.json").exists():
            continue  # a fragment literally named like '<stem>.<16 hex>': its own plain tensors file
        named, _ = named_by(manifest)
        # Beside a readable manifest of the same name that names another file, or left by a writer that died
        # installing this name (a first add killed before its manifest).  A tensors file with no manifest
        # and no such marker may be a fragment a user is still copying in: never ours to delete.
        if (named is not None and named != path.name) or (match["stem"] in died and named != path.name):
            log.info("library: removing %s, an orphan of an interrupted replace of %s", path, manifest.name)
            path.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path, use_cache=False) if path.is_file() and not path.is_symlink() else None
    except (FragmentError, OSError):
        return None


def _finish_eviction(folder: Path, name: str, marker: Path) -> None:
    """Finish the eviction of ``name`` that a dead writer began (its ``marker`` records what it was removing).

    Only the exact files it was removing go: the manifest if its bytes still hash to the recorded
    digest, the tensors file if its bytes do and no manifest names it.  A fragment saved under that
    name since (other bytes) stays; an entry whose row is still there was never evicted and stays.
    """
    try:
        check_name(name)
        record = parse_json(marker.read_bytes()[:4096], str(marker), IntegrityError)
        tensors_name = check_plain_name(record["tensors"], str(marker), ".safetensors")
        manifest_sha, tensors_sha = str(record["manifest_sha256"]), str(record["tensors_sha256"])
    except (FragmentError, OSError, KeyError, TypeError) as exc:
        log.warning("library: %s: expected an eviction record, found an unreadable one (%s); its files are kept", marker, exc)
        return
    if _has_index(folder):
        with _db(folder) as con:
            if con.execute("SELECT 1 FROM entries WHERE name = ?", (name,)).fetchone() is not None:
                return
    manifest = folder / f"{name}.json"
    if _file_sha256(manifest) == manifest_sha:
        log.info("library: removing %s, evicted by a writer that died before removing it", manifest)
        manifest.unlink(missing_ok=True)
    tensors = folder / tensors_name
    if (named_by(manifest)[0] != tensors_name and not _owned_by_other(folder, name, tensors_name)
            and _file_sha256(tensors) == tensors_sha):
        log.info("library: removing %s, evicted by a writer that died before removing it", tensors)
        tensors.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: a pid no process can have ('.x.tmp-99999999999999999999')
        return False
    except PermissionError:
        return True
    return True


def add(
    folder: str | os.PathLike,
    fragment: Fragment,
    *,
    embedding: torch.Tensor,
    prompt: str,
    params: Mapping[str, Any] | None = None,
    cap_bytes: int = DEFAULT_CAP_BYTES,
) -> Path:
    """Save ``fragment`` into the library (replacing an entry with the same key), then evict down to ``cap_bytes``.

    The base hash is the manifest's own ``base_model.sha256``.  Returns the manifest path.

    >>> add("models/fragments", frag, embedding=pool_conditioning(positive), prompt="a dog",  # doctest: +SKIP
    ...     params={"ratio": 0.3})
    PosixPath('models/fragments/a_dog.json')
    """
    folder = Path(folder)
    base = str(fragment.manifest["base_model"]["sha256"])
    key = fingerprint(base, embedding, params)
    with locked(folder):
        _sweep_temporaries(folder)
        with _db(folder) as con:
            old = con.execute("SELECT name FROM entries WHERE key = ?", (key,)).fetchone()
            taken = con.execute("SELECT 1 FROM entries WHERE name = ? AND key != ?", (fragment.name, key)).fetchone()
        if old is not None:
            fragment.manifest = {**fragment.manifest, "name": old[0]}
        elif taken or (folder / f"{check_name(fragment.name)}.json").exists():
            fragment.manifest = {**fragment.manifest, "name": check_name(f"{fragment.name[:100]}-{key[:12]}")}
        path = save_fragment(fragment, folder, overwrite=True)
        size = _insert(folder, key, path, fragment.manifest, embedding, prompt, params)
        _evict_locked(folder, cap_bytes, keep={key})
    log.info("library: added %s (key %s, %d bytes)", path.name, key, size)
    return path


def register(
    folder: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    embedding: torch.Tensor,
    prompt: str,
    params: Mapping[str, Any] | None = None,
    cap_bytes: int = DEFAULT_CAP_BYTES,
) -> str:
    """Index a fragment already saved in ``folder`` (e.g. by FragmentExtractor); return its key.

    The files are verified first; from then on the library owns them and may evict them.

    >>> register("models/fragments", "models/fragments/dog.json", embedding=emb, prompt="a dog")  # doctest: +SKIP
    'c0ffee…'
    """
    folder = Path(folder)
    fragment = load_entry(folder, manifest_path)
    with locked(folder):
        return register_locked(folder, manifest_path, fragment.manifest, embedding=embedding, prompt=prompt,
                               params=params, cap_bytes=cap_bytes)


def register_locked(
    folder: str | os.PathLike,
    manifest_path: str | os.PathLike,
    manifest: Mapping[str, Any],
    *,
    embedding: torch.Tensor,
    prompt: str,
    params: Mapping[str, Any] | None = None,
    cap_bytes: int = DEFAULT_CAP_BYTES,
) -> str:
    """``register`` for a caller that holds ``locked(folder)`` and has just written and verified the fragment
    whose sealed ``manifest`` is at ``manifest_path`` (``unpack``: the row goes in under the same lock as the
    files, so no other writer sees the files unindexed and claims the key for another name)."""
    folder = Path(folder)
    key = fingerprint(str(manifest["base_model"]["sha256"]), embedding, params)
    name = _row_name(folder, manifest_path)
    with _db(folder) as con:
        other = con.execute("SELECT name FROM entries WHERE key = ? AND name != ?", (key, name)).fetchone()
    if other is not None:
        # Same key under another name: the index points at the newest, but files a user named and
        # saved are never deleted for that; they stay on disk, unindexed (and so never evicted).
        log.info("library: %s supersedes %s in the index; %s's files are kept", name, other[0], other[0])
    _insert(folder, key, Path(manifest_path), manifest, embedding, prompt, params)
    _evict_locked(folder, cap_bytes, keep={key})
    return key


def _row_name(folder: Path, manifest_path: str | os.PathLike) -> str:
    """The row name of the manifest at ``manifest_path``: its file stem (what ``lookup`` turns back into a path),
    checked to be a plain fragment name directly inside ``folder``."""
    path = check_inside(folder, manifest_path)
    if not path.name.endswith(".json"):
        raise IntegrityError(f"{path}: expected a fragment manifest named <name>.json, found {path.name!r}")
    return check_name(path.name[: -len(".json")])


def _insert(folder: Path, key: str, path: Path, manifest: Mapping[str, Any], embedding: torch.Tensor, prompt: str,
            params: Mapping[str, Any] | None) -> int:
    name = _row_name(folder, path)
    tensors = manifest["artifacts"]["tensors"]
    size = path.stat().st_size + confined(folder, tensors["file"], str(path)).stat().st_size
    now = time.time()
    with _db(folder) as con:
        con.execute("BEGIN IMMEDIATE")
        con.execute("DELETE FROM entries WHERE name = ? AND key != ?", (name, key))
        con.execute(
            f"INSERT OR REPLACE INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (key, name, str(manifest["base_model"]["sha256"]), prompt, embedding_to_bytes(embedding),
             embedding_sha256(embedding), json.dumps(dict(params or {}), sort_keys=True, default=str),
             params_sha256(params), size, now, now, _next_seq(con), 0, str(tensors["sha256"])),
        )
        _bump(con, "adds")
        con.execute("COMMIT")
    return size


def evict(folder: str | os.PathLike, cap_bytes: int) -> list[str]:
    """Remove least recently used entries until the library holds at most ``cap_bytes``; return their names.

    Rows that fail their checks (an edited index) are deleted first, their files left alone; what writers
    that died left behind is swept.

    >>> import tempfile; evict(tempfile.mkdtemp(), 0)
    []
    """
    if isinstance(cap_bytes, bool) or not isinstance(cap_bytes, int) or cap_bytes < 0:
        raise FragmentError(f"{library_dir(folder)}: eviction cap: expected a size >= 0 bytes, found {cap_bytes!r}")
    with locked(folder):
        _sweep_temporaries(Path(folder))
        return _evict_locked(Path(folder), cap_bytes, keep=set())


def _evict_locked(folder: Path, cap_bytes: int, keep: set[str]) -> list[str]:
    removed: list[str] = []
    with _db(folder) as con:
        rows, bad = _rows(folder, con)
        for rowid, exc in bad:
            # Nothing in a row that fails its checks can be trusted, its name least (it becomes a path): the
            # row goes, and no file is touched for it.  Files of that name, if any, stay on disk unindexed.
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM entries WHERE rowid = ?", (rowid,))
            con.execute("COMMIT")
            log.warning("library: dropped an unusable index row; no file was touched: %s", exc)
        total = sum(r["size"] for r in rows)
        for row in rows:
            key, name, size = row["key"], row["name"], row["size"]
            if total <= cap_bytes:
                break
            if key in keep:
                continue
            # The marker first: a kill after the row delete leaves files that only it ties to this eviction
            # (the next sweep finishes it, see _finish_eviction).  Then the row: once it is gone no reader is
            # sent to the files.
            marker = _eviction_marker(folder, name)
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM entries WHERE key = ?", (key,))
            _bump(con, "evictions")
            con.execute("COMMIT")
            _remove_files(folder, name)
            if marker is not None:
                marker.unlink(missing_ok=True)
            total -= size
            removed.append(name)
    if total > cap_bytes:
        log.warning("library %s: %d bytes over the %d-byte cap after eviction (the newest entry alone is larger)",
                    folder, total - cap_bytes, cap_bytes)
    for name in removed:
        log.info("library: evicted %s (least recently used)", name)
    return removed


def _eviction_marker(folder: Path, name: str) -> Path | None:
    """Write ``.<name>.evict.tmp-<pid>``: the digests of the exact files this eviction removes."""
    manifest = folder / f"{name}.json"
    tensors = _named_tensors(folder, name)
    record = {"tensors": tensors.name, "manifest_sha256": _file_sha256(manifest), "tensors_sha256": named_by(manifest)[1]}
    marker = folder / f".{name}{_EVICT}.tmp-{os.getpid()}"
    try:
        marker.unlink(missing_ok=True)  # a planted link under our own name must not be written through
        with open(marker, "x", encoding="utf-8") as fh:
            json.dump(record, fh)
    except OSError as exc:  # without it a kill may leak files (never delete wrong ones): evict anyway
        log.warning("library: %s: could not write the eviction record (%s)", marker, exc)
        return None
    return marker


def _remove_files(folder: Path, name: str) -> None:
    # ``name`` passed _checked_row: folder/<name>.json is a direct child, and unlink never follows a symlink
    # in the last component, so nothing outside the folder can be removed here.
    tensors = _named_tensors(folder, name)  # read before the manifest goes: a replaced entry's file is content-named
    for path in (folder / f"{check_name(name)}.json", tensors):  # manifest first: without it nothing loads the tensors
        if path.is_dir() and not path.is_symlink():  # a folder put there since: not the file the row was made for
            log.warning("library: %s: expected the evicted entry's file, found a folder; left in place", path)
            continue
        path.unlink(missing_ok=True)


def forget(folder: str | os.PathLike, name: str) -> bool:
    """Drop the row of entry ``name`` (its files stay, unindexed); True when there was one.

    >>> import tempfile; forget(tempfile.mkdtemp(), "dog")
    False
    """
    with locked(folder):
        return forget_locked(folder, name)


def forget_locked(folder: str | os.PathLike, name: str) -> bool:
    """``forget`` for a caller already holding ``locked(folder)`` (flock is per open file: taking it twice deadlocks)."""
    if not _has_index(folder):
        return False
    with _db(folder) as con:
        con.execute("BEGIN IMMEDIATE")
        gone = con.execute("DELETE FROM entries WHERE name = ?", (name,)).rowcount
        con.execute("COMMIT")
    if gone:
        log.info("library: %s replaced by a fragment without a library row; its row is dropped", name)
    return bool(gone)


def lookup(
    folder: str | os.PathLike,
    base_sha256: str,
    embedding: torch.Tensor,
    params: Mapping[str, Any] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    record: bool = True,
) -> LookupResult:
    """Find the fragment to reuse: exact key (when ``params`` is given), else the nearest same-base entry by cosine.

    With ``params`` given, the nearest search is limited to entries made with
    the same parameters.  ``record`` updates hit/miss counters and LRU order.

    >>> import tempfile; lookup(tempfile.mkdtemp(), "ab", torch.ones(4)).reason
    'library is empty'
    """
    folder = Path(folder)
    if not _has_index(folder):
        return LookupResult(False, None, -1.0, "library is empty")
    with _db(folder) as con:
        rows, bad = _rows(folder, con, "WHERE base_sha256 = ?", (base_sha256,))
    _warn_skipped(bad)
    exact = fingerprint(base_sha256, embedding, params) if params is not None else None
    wanted_params = params_sha256(params) if params is not None else None
    candidates: list[tuple[float, dict[str, Any]]] = []
    for row in rows:
        if row["key"] == exact:
            candidates.append((2.0, row))  # ahead of every cosine
        elif wanted_params is None or row["params_sha256"] == wanted_params:
            candidates.append((cosine(row["embedding"], embedding), row))
    candidates.sort(key=lambda c: -c[0])
    result: LookupResult | None = None
    for sim, row in candidates:
        if sim < threshold:
            result = LookupResult(False, None, sim, f"nearest cached fragment {row['name']!r} has cosine {sim:.3f} < {threshold}")
            break
        path = folder / f"{row['name']}.json"
        if _stale(path, row):
            # The file was replaced by another fragment without a new row (save_fragment(overwrite=True), a
            # copy by hand): the row describes the old one's prompt and must not serve the new one (issue #29).
            log.warning("library: %s was replaced by another fragment since it was indexed; its row is not used", path.name)
            if record:
                _drop_stale(folder, row)
            continue
        if sim > 1.5:
            result = LookupResult(True, path, 1.0, f"exact key {row['key']}", row["key"])
        else:
            result = LookupResult(True, path, sim, f"paraphrase of {row['name']!r}: cosine {sim:.3f} >= {threshold}", row["key"])
        break
    if result is None:
        result = LookupResult(False, None, -1.0, f"no cached fragment for base model {base_sha256[:16]}…")
    if record:
        _record(folder, result)
    return result


def _stale(manifest_path: Path, row: Mapping[str, Any]) -> bool:
    """Whether the manifest at ``manifest_path`` now names other tensors than the ones ``row`` was made for.
    A missing or unreadable manifest is not stale: loading it fails and quarantines, as before."""
    if row["tensors_sha256"] is None:  # a row from before the column: nothing to compare
        return False
    found = named_by(manifest_path)[1]
    return found is not None and found != row["tensors_sha256"]


def _drop_stale(folder: Path, row: Mapping[str, Any]) -> None:
    with locked(folder), _db(folder) as con:
        con.execute("BEGIN IMMEDIATE")
        # Only the row as read: a writer may have re-indexed the key since (then the digest differs).
        con.execute("DELETE FROM entries WHERE key = ? AND tensors_sha256 = ?", (row["key"], row["tensors_sha256"]))
        con.execute("COMMIT")


def _record(folder: Path, result: LookupResult) -> None:
    with locked(folder), _db(folder) as con:
        con.execute("BEGIN IMMEDIATE")
        _bump(con, "hits" if result.hit else "misses")
        if result.hit:
            con.execute("UPDATE entries SET hits = hits + 1, last_access = ?, access_seq = ? WHERE key = ?",
                        (time.time(), _next_seq(con), result.key))
        con.execute("COMMIT")


def load_entry(folder: str | os.PathLike, manifest_path: str | os.PathLike, base_sha256: str | None = None) -> Fragment:
    """Load a fragment from the folder with every untrusted-input check: confined paths, schema, header, hashes, base.

    >>> load_entry("models/fragments", "models/fragments/dog.json", base_sha256=digest)  # doctest: +SKIP
    """
    path = check_inside(folder, manifest_path)
    for attempt in range(_READ_ATTEMPTS):
        manifest = read_manifest(path)
        confined(folder, manifest["artifacts"]["tensors"]["file"], str(path))
        check_base(manifest, base_sha256, str(path))
        try:
            fragment = load_fragment(path)
        except (IntegrityError, ReadError):
            # Readers take no lock: a writer may have switched the manifest and deleted the tensors file we
            # were about to read (store.install step 4).  A manifest that changed meanwhile is read again.
            if attempt < _READ_ATTEMPTS - 1 and named_by(path) != (manifest["artifacts"]["tensors"]["file"],
                                                   manifest["artifacts"]["tensors"]["sha256"]):
                continue
            raise
        check_base(fragment.manifest, base_sha256, str(path))  # load_fragment read the manifest again
        return fragment
    raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover


def _named_tensors(folder: Path, name: str) -> Path:
    """The tensors file ``<name>.json`` names, when that can be read safely; else ``<name>.safetensors``.

    The manifest is corrupt by assumption, so only a plain in-folder name is
    taken, and never the tensors file of another entry (``<other>.safetensors``
    with an ``<other>.json`` beside it): a hostile manifest must not get a good
    fragment quarantined.
    """
    fallback = folder / f"{name}.safetensors"
    try:
        manifest = folder / f"{name}.json"
        if not manifest.is_file() or manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return fallback
        text = manifest.read_bytes()
        file_name = parse_json(text, f"{folder / name}.json")["artifacts"]["tensors"]["file"]
        check_plain_name(file_name, f"{folder / name}.json", ".safetensors")
        path = confined(folder, file_name, f"{folder / name}.json")
    except (FragmentError, OSError, KeyError, TypeError, IndexError):  # unreadable or odd: the conventional name
        return fallback
    if _owned_by_other(folder, name, file_name):
        return fallback
    return path


def _owned_by_other(folder: Path, name: str, file_name: str) -> bool:
    """Whether ``file_name`` is the tensors file of another entry than ``name``: ``<stem>.safetensors`` beside
    ``<stem>.json``, or a replaced entry's content-named ``<stem>.<16 hex>.safetensors`` that ``<stem>.json``
    names (a hand-made manifest naming it got it deleted with its own eviction: issue #29 review)."""
    stem = file_name[: -len(".safetensors")]
    if stem != name and (folder / f"{stem}.json").exists():
        return True
    match = OWN_TENSORS.fullmatch(file_name)
    return match is not None and match["stem"] != name and named_by(folder / f"{match['stem']}.json")[0] == file_name


def quarantine(folder: str | os.PathLike, manifest_path: str | os.PathLike, reason: str) -> list[Path]:
    """Move a corrupt entry's files to ``.library/quarantine`` (renamed ``*.quarantined``) and drop its row.

    >>> import tempfile; quarantine(tempfile.mkdtemp(), "gone.json", "test")
    []
    """
    folder = Path(folder)
    name = Path(manifest_path).name[: -len(".json")] if str(manifest_path).endswith(".json") else Path(manifest_path).stem
    target = library_dir(folder) / "quarantine"
    moved: list[Path] = []
    with locked(folder):
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise FragmentError(f"{target}: expected the quarantine folder itself, found a symlink or file; "
                                "nothing was moved")
        manifest = folder / f"{name}.json"
        if manifest.is_file():
            try:  # under the lock no writer moves: an entry replaced since the failed read may be fine now
                load_fragment(manifest)
                log.info("library: %s loads now (replaced since it failed: %s); not quarantined", name, reason)
                return []
            except FragmentError:
                pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for src in (folder / f"{name}.json", _named_tensors(folder, name)):  # both found before either moves
            if src.is_file() or src.is_symlink():
                target.mkdir(parents=True, exist_ok=True)
                dest = target / f"{stamp}-{os.getpid()}-{src.name}.quarantined"
                os.replace(src, dest)
                moved.append(dest)
        if _has_index(folder):
            with _db(folder) as con:
                con.execute("BEGIN IMMEDIATE")
                gone = con.execute("DELETE FROM entries WHERE name = ?", (name,)).rowcount
                if moved or gone:
                    _bump(con, "quarantined")
                con.execute("COMMIT")
    if moved:
        log.warning("library: quarantined %s (%s): %s", name, reason, ", ".join(str(p) for p in moved))
    return moved
