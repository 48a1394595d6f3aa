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

A reader therefore sees the old entry or the new one, never a mix; sqlite's
journal makes each row change atomic.  Only files the index names, and
orphans of this naming beside a manifest that names another file, are ever
deleted: fragments a user placed by hand are never touched.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ...errors import FragmentError, IntegrityError, ReadError
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
    hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS entries_by_base ON entries (base_sha256);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = ("key", "name", "base_sha256", "prompt", "embedding", "embedding_sha256", "params", "params_sha256",
            "size", "created", "last_access", "access_seq", "hits")


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


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the library's exclusive lock (``fcntl.flock``; released by the kernel if the holder dies).

    >>> import tempfile
    >>> with locked(tempfile.mkdtemp()): pass
    """
    directory = ensure_folder(library_dir(folder))
    try:
        fh = open(directory / "lock", "a+b")
    except OSError as exc:
        raise FragmentError(f"{directory / 'lock'}: expected a lock file that can be opened, found: {exc}") from exc
    with fh:
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
    directory = ensure_folder(library_dir(folder))
    index = directory / "index.sqlite3"
    if index.exists() and not index.is_file():
        raise FragmentError(f"{index}: expected the library index file, found a directory or special file")
    try:  # connect inside the try: a folder in its place fails here, not in the first query
        con = sqlite3.connect(index, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise FragmentError(f"{index}: expected a readable library index, found: {exc}") from exc
    try:
        con.executescript(_SCHEMA)
        yield con
    except sqlite3.DatabaseError as exc:
        raise FragmentError(f"{index}: library index unreadable: {exc}") from exc
    finally:
        con.close()


def _has_index(folder: str | os.PathLike) -> bool:
    """Whether the library index exists; a ``FragmentError`` when ``.library`` or the index is not what it must be
    (reported as an empty library before, which hid the mistake)."""
    directory = library_dir(folder)
    if directory.exists() and not directory.is_dir():
        raise FragmentError(f"{directory}: expected the library folder, found a file")
    index = directory / "index.sqlite3"
    if index.exists() and not index.is_file():
        raise FragmentError(f"{index}: expected the library index file, found a directory or special file")
    return index.exists()


def _bump(con: sqlite3.Connection, name: str, by: int = 1) -> None:
    con.execute("INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?", (name, by, by))


def _next_seq(con: sqlite3.Connection) -> int:
    return int(con.execute("SELECT COALESCE(MAX(access_seq), 0) + 1 FROM entries").fetchone()[0])


def entries(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every indexed entry, least recently used first (embedding decoded to a tensor, params to a dict).

    >>> import tempfile; entries(tempfile.mkdtemp())
    []
    """
    if not _has_index(folder):
        return []
    with _db(folder) as con:
        rows = con.execute(f"SELECT {', '.join(_COLUMNS)} FROM entries ORDER BY access_seq").fetchall()
    out = []
    for row in rows:
        entry = dict(zip(_COLUMNS, row))
        entry["embedding"] = embedding_from_bytes(entry["embedding"])
        entry["params"] = json.loads(entry["params"])
        out.append(entry)
    return out


def stats(folder: str | os.PathLike) -> dict[str, int]:
    """Entry count, bytes, and the hit / miss / eviction / quarantine counters.

    >>> import tempfile; stats(tempfile.mkdtemp())["entries"]
    0
    """
    result = {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0, "quarantined": 0, "adds": 0}
    if not _has_index(folder):
        return result
    with _db(folder) as con:
        count, size = con.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries").fetchone()
        result.update({"entries": int(count), "bytes": int(size)})
        result.update({k: int(v) for k, v in con.execute("SELECT name, value FROM counters")})
    return result


def _sweep_temporaries(folder: Path) -> None:
    """Delete what writers that died left: temporaries (``.<name>.<ext>.tmp-<pid>``, see ``store.install``) and
    orphan tensors files of this library's own naming that no manifest names (a kill between install steps).

    Orphans are only looked for under names with no live writer's ``.<name>.install.tmp-<pid>`` marker: a
    writer between renaming its tensors and its manifest has a new file no manifest names yet.
    """
    live: set[str] = set()
    died: set[str] = set()  # names a writer was installing when it died: their unnamed tensors files are its own
    for path in folder.glob(".*.tmp-*"):
        stem, _, pid = path.name.rpartition(".tmp-")
        if not pid.isdigit():
            continue
        if _alive(int(pid)):
            if stem.endswith(".install"):
                live.add(stem[1 : -len(".install")])
            continue
        if stem.endswith(".install"):
            died.add(stem[1 : -len(".install")])
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
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
    """Index a fragment already saved in ``folder`` (e.g. by FragmentExtractor or ``unpack``); return its key.

    The files are verified first; from then on the library owns them and may evict them.

    >>> register("models/fragments", "models/fragments/dog.json", embedding=emb, prompt="a dog")  # doctest: +SKIP
    'c0ffee…'
    """
    folder = Path(folder)
    fragment = load_entry(folder, manifest_path)
    key = fingerprint(str(fragment.manifest["base_model"]["sha256"]), embedding, params)
    with locked(folder):
        with _db(folder) as con:
            other = con.execute("SELECT name FROM entries WHERE key = ? AND name != ?", (key, fragment.name)).fetchone()
        if other is not None:
            # Same key under another name: the index points at the newest, but files a user named and
            # saved are never deleted for that; they stay on disk, unindexed (and so never evicted).
            log.info("library: %s supersedes %s in the index; %s's files are kept", fragment.name, other[0], other[0])
        _insert(folder, key, Path(manifest_path), fragment.manifest, embedding, prompt, params)
        _evict_locked(folder, cap_bytes, keep={key})
    return key


def _insert(folder: Path, key: str, path: Path, manifest: Mapping[str, Any], embedding: torch.Tensor, prompt: str,
            params: Mapping[str, Any] | None) -> int:
    size = path.stat().st_size + (folder / manifest["artifacts"]["tensors"]["file"]).stat().st_size
    now = time.time()
    with _db(folder) as con:
        con.execute("BEGIN IMMEDIATE")
        con.execute("DELETE FROM entries WHERE name = ? AND key != ?", (manifest["name"], key))
        con.execute(
            f"INSERT OR REPLACE INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (key, manifest["name"], str(manifest["base_model"]["sha256"]), prompt, embedding_to_bytes(embedding),
             embedding_sha256(embedding), json.dumps(dict(params or {}), sort_keys=True, default=str),
             params_sha256(params), size, now, now, _next_seq(con), 0),
        )
        _bump(con, "adds")
        con.execute("COMMIT")
    return size


def evict(folder: str | os.PathLike, cap_bytes: int) -> list[str]:
    """Remove least recently used entries until the library holds at most ``cap_bytes``; return their names.

    >>> import tempfile; evict(tempfile.mkdtemp(), 0)
    []
    """
    if isinstance(cap_bytes, bool) or not isinstance(cap_bytes, int) or cap_bytes < 0:
        raise FragmentError(f"{library_dir(folder)}: eviction cap: expected a size >= 0 bytes, found {cap_bytes!r}")
    with locked(folder):
        return _evict_locked(Path(folder), cap_bytes, keep=set())


def _evict_locked(folder: Path, cap_bytes: int, keep: set[str]) -> list[str]:
    removed: list[str] = []
    with _db(folder) as con:
        rows = con.execute("SELECT key, name, size FROM entries ORDER BY access_seq").fetchall()
        total = sum(r[2] for r in rows)
        for key, name, size in rows:
            if total <= cap_bytes:
                break
            if key in keep:
                continue
            # Row first: once it is gone no reader is sent to the files; a crash now leaks files, never corrupts.
            con.execute("BEGIN IMMEDIATE")
            con.execute("DELETE FROM entries WHERE key = ?", (key,))
            _bump(con, "evictions")
            con.execute("COMMIT")
            _remove_files(folder, name)
            total -= size
            removed.append(name)
    if total > cap_bytes:
        log.warning("library %s: %d bytes over the %d-byte cap after eviction (the newest entry alone is larger)",
                    folder, total - cap_bytes, cap_bytes)
    for name in removed:
        log.info("library: evicted %s (least recently used)", name)
    return removed


def _remove_files(folder: Path, name: str) -> None:
    tensors = _named_tensors(folder, name)  # read before the manifest goes: a replaced entry's file is content-named
    for path in (folder / f"{name}.json", tensors):  # manifest first: without it nothing will try to load the tensors
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
        rows = con.execute(
            "SELECT key, name, embedding, params_sha256 FROM entries WHERE base_sha256 = ?", (base_sha256,)
        ).fetchall()
    exact = fingerprint(base_sha256, embedding, params) if params is not None else None
    wanted_params = params_sha256(params) if params is not None else None
    best: tuple[float, str, str] | None = None
    for key, name, blob, p_sha in rows:
        if key == exact:
            best = (1.0, key, name)
            break
        if wanted_params is not None and p_sha != wanted_params:
            continue
        sim = cosine(embedding_from_bytes(blob), embedding)
        if best is None or sim > best[0]:
            best = (sim, key, name)
    if best is None:
        result = LookupResult(False, None, -1.0, f"no cached fragment for base model {base_sha256[:16]}…")
    elif best[1] == exact:
        result = LookupResult(True, folder / f"{best[2]}.json", 1.0, f"exact key {best[1]}", best[1])
    elif best[0] >= threshold:
        result = LookupResult(True, folder / f"{best[2]}.json", best[0],
                              f"paraphrase of {best[2]!r}: cosine {best[0]:.3f} >= {threshold}", best[1])
    else:
        result = LookupResult(False, None, best[0], f"nearest cached fragment {best[2]!r} has cosine {best[0]:.3f} < {threshold}")
    if record:
        _record(folder, result)
    return result


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
    stem = file_name[: -len(".safetensors")]
    if stem != name and (folder / f"{stem}.json").exists():
        return fallback
    return path


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
