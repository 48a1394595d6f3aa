"""Issue #29: nothing outside the fragments folder, ever; tampered index rows; an index that stays consistent.

Each test is one finding of the issue's second hostile round, and failed on e89ab0b:

* a library row named ``../outside/victim`` (or an absolute path) made ``library --evict-to 0`` delete a
  file outside the folder; a symlinked ``.library``, index, lock or quarantine was followed;
* tampered index rows raised JSONDecodeError / ValueError / TypeError from ``library`` and eviction;
* ``save_fragment(overwrite=True)`` left a row serving the new fragment for the old prompt; ``unpack``
  registered its row after the lock; a killed eviction left a tensors file no sweep removed (the kill itself
  is in test_kill_points.py); ``pack --out`` overwrote another fragment's tensors file.

Policy checked for bad rows: readers (``entries``, ``stats``, ``lookup``) skip them with a warning naming the
index, the row and the field; eviction deletes the row and touches no file.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prompt_fragments.cli import main
from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.format.measurements import update_fragment_file
from prompt_fragments.fragment.format.store import check_name, load_fragment, save_fragment
from prompt_fragments.fragment.library import index as library
from prompt_fragments.fragment.library import sharing
from prompt_fragments.fragment.library.auto_mode import auto_select
from prompt_fragments.fragment.library.fingerprint import normalise
from prompt_fragments.fragment.library.sharing import META_MANIFEST, TENSOR, pack, unpack

from test_library import BASE, emb, synthetic
from test_untrusted_fuzz import any_values, hostile_leaves

OTHER = {"mid.attn1": [1, 2]}


def _index(folder: Path) -> Path:
    return folder / ".library" / "index.sqlite3"


def _set_column(folder: Path, column: str, value: Any, where: str = "") -> None:
    con = sqlite3.connect(_index(folder), isolation_level=None)
    try:
        con.execute(f"UPDATE entries SET {column} = ? {where}", (value,))
    finally:
        con.close()


def _library_with(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "lib"
    for i, name in enumerate(names):
        library.add(folder, synthetic(name), embedding=emb(i + 1), prompt=name)
    return folder


def _victim(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    save_fragment(synthetic("victim"), outside)  # a real fragment: eviction removes <name>.json and its tensors
    return outside


# --- 1. nothing outside the folder ---------------------------------------------------------------

@pytest.mark.parametrize("row_name", ["../outside/victim", "ABSOLUTE", "sub/../../outside/victim"])
def test_a_row_named_outside_the_folder_never_deletes_outside(tmp_path: Path, row_name: str, capsys, caplog) -> None:
    folder = _library_with(tmp_path, "dog")
    outside = _victim(tmp_path)
    before = sorted(p.name for p in outside.iterdir())
    name = str(outside / "victim") if row_name == "ABSOLUTE" else row_name
    _set_column(folder, "name", name)
    with caplog.at_level(logging.WARNING):
        assert main(["library", str(folder), "--evict-to", "0"]) == 0
    assert sorted(p.name for p in outside.iterdir()) == before
    load_fragment(outside / "victim.json")
    load_fragment(folder / "dog.json")  # the row was bad, not the fragment: its files are kept
    assert "row 1: name: expected a plain fragment name" in caplog.text and "index.sqlite3" in caplog.text
    assert library.entries(folder) == []  # the bad row was dropped by the eviction


def test_a_row_whose_manifest_is_a_symlink_out_of_the_folder_deletes_only_the_link(tmp_path: Path) -> None:
    folder = _library_with(tmp_path, "dog")
    outside = _victim(tmp_path)
    for suffix in (".json", ".safetensors"):
        (folder / f"dog{suffix}").unlink()
        (folder / f"dog{suffix}").symlink_to(outside / f"victim{suffix}")
    assert library.evict(folder, 0) == ["dog"]
    load_fragment(outside / "victim.json")
    assert not (folder / "dog.json").is_symlink()


def test_a_lookup_hit_is_always_a_manifest_directly_inside_the_folder(tmp_path: Path) -> None:
    folder = _library_with(tmp_path, "dog")
    _victim(tmp_path)
    _set_column(folder, "name", "../outside/victim")
    result = library.lookup(folder, BASE, emb(1), record=False)
    assert not result.hit and result.manifest_path is None
    assert auto_select(folder, BASE, emb(1)).fragment is None


@pytest.mark.parametrize("what", [".library", "index.sqlite3", "lock", "index.sqlite3-journal"])
def test_a_symlinked_library_folder_or_file_is_refused_and_nothing_is_written_through_it(tmp_path: Path, what: str) -> None:
    folder = _library_with(tmp_path, "dog")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == ".library":
        (folder / ".library").rename(elsewhere / "lib")
        (folder / ".library").symlink_to(elsewhere / "lib")
    else:
        path = folder / ".library" / what
        if path.exists():
            path.rename(elsewhere / what)
        path.symlink_to(elsewhere / what)
    before = {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()}
    calls = [lambda: library.add(folder, synthetic("cat"), embedding=emb(5), prompt="cat"),
             lambda: library.entries(folder), lambda: library.stats(folder), lambda: library.evict(folder, 0),
             lambda: library.lookup(folder, BASE, emb(1)), lambda: library.forget(folder, "dog")]
    for call in calls:
        with pytest.raises(FragmentError) as info:
            call()
        message = str(info.value)
        assert what in message and "expected" in message and "found a symlink to" in message, message
    assert {p: p.read_bytes() for p in elsewhere.rglob("*") if p.is_file()} == before
    assert not (folder / "cat.json").exists()
    assert "library unusable" in auto_select(folder, BASE, emb(1)).status
    assert main(["library", str(folder)]) == 2


def test_a_symlinked_quarantine_folder_is_refused_and_nothing_moves_out(tmp_path: Path) -> None:
    folder = _library_with(tmp_path, "dog")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / ".library" / "quarantine").symlink_to(elsewhere)
    (folder / "dog.safetensors").write_bytes(b"corrupt")
    out = auto_select(folder, BASE, emb(1))
    assert out.fragment is None and "could not quarantine" in out.status and "quarantine" in out.status
    assert list(elsewhere.iterdir()) == []
    assert (folder / "dog.json").exists()


def test_install_does_not_write_through_a_planted_temporary_symlink(tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    folder.mkdir()
    target = tmp_path / "target"
    for name in (f".dog.install.tmp-{os.getpid()}", f".dog.safetensors.tmp-{os.getpid()}", f".dog.json.tmp-{os.getpid()}"):
        (folder / name).symlink_to(target / name)
    target.mkdir()
    save_fragment(synthetic("dog"), folder)
    load_fragment(folder / "dog.json")
    assert list(target.iterdir()) == []


# --- 2. tampered rows ----------------------------------------------------------------------------

TAMPERED = [
    ("params", "{not json"), ("params", "[1, 2]"), ("params", b"\x00"), ("params", "1" * 500),
    ("embedding", b"abc"), ("embedding", "text"), ("embedding", b""), ("embedding", b"\x00\x00\xc0\x7f"),
    ("size", "abc"), ("size", -5), ("size", 2.5), ("hits", 1.5), ("size", 2 ** 63 - 1),
    ("name", b"dog"), ("name", ""), ("name", "a\nb"), ("key", 7), ("key", "KEY"), ("prompt", b"\xff"),
    ("hits", "x"), ("access_seq", "x"), ("access_seq", 2 ** 63 - 1), ("created", "yesterday"), ("base_sha256", b"ab"), ("tensors_sha256", "zz"),
]


@pytest.mark.parametrize("column,value", TAMPERED, ids=[f"{c}={str(v)[:12]}" for c, v in TAMPERED])
def test_a_tampered_row_is_skipped_by_readers_and_dropped_by_eviction(tmp_path: Path, column: str, value: Any,
                                                                      caplog) -> None:
    folder = _library_with(tmp_path, "dog", "cat")
    _set_column(folder, column, value, "WHERE prompt = 'dog'" if column != "prompt" else "WHERE name = 'dog'")
    with caplog.at_level(logging.WARNING):
        assert [e["name"] for e in library.entries(folder)] == ["cat"]
        assert library.stats(folder)["entries"] == 1
        assert library.lookup(folder, BASE, emb(2)).hit
        assert not library.lookup(folder, BASE, emb(1), threshold=0.999).hit
        assert re.search(rf"index\.sqlite3: row \d+: {column}: .*expected", caplog.text), caplog.text
        assert main(["library", str(folder)]) == 0
        assert main(["library", str(folder), "--evict-to", str(10 ** 12)]) == 0
    assert [e["name"] for e in library.entries(folder)] == ["cat"]
    con = sqlite3.connect(_index(folder))
    assert con.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1  # the bad row is gone
    con.close()
    for name in ("dog", "cat"):  # no file was touched for the bad row
        load_fragment(folder / f"{name}.json")


def test_tampered_counters_are_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    folder = _library_with(tmp_path, "dog")
    con = sqlite3.connect(_index(folder), isolation_level=None)
    con.execute("UPDATE counters SET value = 'many' WHERE name = 'adds'")
    con.execute("INSERT INTO counters VALUES ('entries', 99)")
    con.close()
    with caplog.at_level(logging.WARNING):
        result = library.stats(folder)
    assert result["adds"] == 0 and result["entries"] == 1 and "counter adds" in caplog.text


index_values = (st.none() | st.integers(-(2 ** 63), 2 ** 63 - 1) | st.floats(allow_nan=False) | st.text(max_size=40)
                | st.binary(max_size=40) | any_values.map(json.dumps)
                | st.sampled_from(["../x", "/etc/passwd", "a/b", "..", ".hidden", "ok", "{}", "[]", '{"a": 1}']))
columns = st.sampled_from(library._COLUMNS)


@functools.lru_cache(maxsize=1)
def _fuzz_template() -> Path:
    """One library of dog and cat and an outside victim, copied for each example (saving them is the slow part)."""
    root = Path(tempfile.mkdtemp(prefix="rows-"))
    _library_with(root, "dog", "cat")
    _victim(root)
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(columns, index_values, st.sampled_from(["dog", "cat"])), min_size=1, max_size=4))
def test_fuzzed_index_rows_raise_nothing_and_what_is_accepted_is_well_typed(tmp_path_factory, edits) -> None:
    """Every function that reads rows, on rows with any SQLite value in any column: no exception at all
    (bad rows are skipped or dropped), and every row it accepts loads as well-typed values."""
    tmp_path = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(_fuzz_template(), tmp_path, dirs_exist_ok=True)
    folder, outside = tmp_path / "lib", tmp_path / "outside"
    for column, value, prompt in edits:
        try:
            _set_column(folder, column, value, f"WHERE prompt = '{prompt}'" if column != "prompt" else f"WHERE rowid = {1 + (prompt == 'cat')}")
        except sqlite3.IntegrityError:  # NOT NULL / UNIQUE: SQLite itself refuses this edit
            pass
    accepted = library.entries(folder)
    for e in accepted:
        check_name(e["name"])
        assert e["embedding"].dtype == torch.float32 and 0 < e["embedding"].numel() and torch.isfinite(e["embedding"]).all()
        assert isinstance(e["params"], dict) and isinstance(e["prompt"], str) and isinstance(e["base_sha256"], str)
        assert isinstance(e["size"], int) and e["size"] >= 0 and isinstance(e["hits"], int)
    stats = library.stats(folder)
    assert stats["entries"] == len(accepted) and stats["bytes"] == sum(e["size"] for e in accepted)
    for seed in (1, 2):
        result = library.lookup(folder, BASE, emb(seed))
        if result.hit:
            assert result.manifest_path.parent == folder and result.manifest_path.name.endswith(".json")
            assert result.manifest_path.name[:-5] in {e["name"] for e in accepted}
    removed = library.evict(folder, 0)
    assert set(removed) <= {e["name"] for e in accepted}
    load_fragment(outside / "victim.json")
    for name in {"dog", "cat"} - set(removed):
        if (folder / f"{name}.json").exists():
            load_fragment(folder / f"{name}.json")
    assert library.entries(folder) == []


packed_rows = st.fixed_dictionaries({"prompt": st.text(max_size=30)}, optional={
    "params": st.dictionaries(st.text(max_size=8), st.integers(-5, 5) | st.text(max_size=5), max_size=3) | any_values,
    "embedding": st.lists(st.floats(-1e6, 1e6, allow_nan=False) | hostile_leaves, min_size=1, max_size=6) | any_values})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(row=packed_rows)
def test_a_packed_row_that_is_accepted_indexes_exactly_what_it_says(tmp_path_factory, row) -> None:
    """Extends test_untrusted_fuzz's row fuzz (which asserted nothing about accepted rows): an accepted row is
    listed with its prompt and params, its embedding normalised, and answers its own prompt with this fragment."""
    tmp_path = tmp_path_factory.mktemp("row")
    src = save_fragment(synthetic("dog", OTHER), tmp_path / "src")
    pack_path = tmp_path / "in.fragment.safetensors"
    meta = {"prompt_fragments.pack": "1", META_MANIFEST: src.read_text(), "prompt_fragments.library": json.dumps(row)}
    raw = (tmp_path / "src" / "dog.safetensors").read_bytes()
    save_file({TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, str(pack_path), metadata=meta)
    dest = tmp_path / "dest"
    try:
        unpack(pack_path, dest)
    except FragmentError:
        assert library.entries(dest) == []  # refused: nothing indexed
        return
    (entry,) = library.entries(dest)
    assert entry["name"] == "dog" and entry["prompt"] == row["prompt"]
    assert entry["params"] == row.get("params", {})
    embedding = torch.tensor([float(x) for x in row["embedding"]])
    if float(embedding.norm()) > 0 and torch.isfinite(embedding / embedding.norm()).all():
        torch.testing.assert_close(entry["embedding"], normalise(embedding))
        result = library.lookup(dest, BASE, embedding, row.get("params", {}), record=False)
        assert result.hit and result.manifest_path == dest / "dog.json", result.reason
        assert library.load_entry(dest, result.manifest_path).kept == OTHER


# --- 3. the index stays consistent ---------------------------------------------------------------

def test_save_fragment_overwrite_without_a_new_row_does_not_serve_the_old_prompt(tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    library.add(folder, synthetic("dog"), embedding=emb(1), prompt="dog", params={"r": 1})
    save_fragment(synthetic("dog", OTHER), folder, overwrite=True)  # another fragment, no row of its own
    for params in ({"r": 1}, None):
        result = library.lookup(folder, BASE, emb(1), params, record=False)
        assert not result.hit, result.reason
    out = auto_select(folder, BASE, emb(1), {"r": 1})
    assert out.fragment is None and out.status.startswith("MISS")
    assert library.entries(folder) == []  # the stale row is dropped on first use
    assert load_fragment(folder / "dog.json").kept == OTHER  # the new fragment itself stays


def test_re_saving_the_same_fragment_with_new_measurements_keeps_its_row(tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    path = library.add(folder, synthetic("dog"), embedding=emb(1), prompt="dog", params={"r": 1})
    update_fragment_file(path, performance={"batch_speedup": 1.5})
    result = library.lookup(folder, BASE, emb(1), {"r": 1})
    assert result.hit and result.manifest_path == path
    assert [e["name"] for e in library.entries(folder)] == ["dog"]


def test_unpack_indexes_its_row_before_another_writer_can_take_the_key(tmp_path: Path, monkeypatch) -> None:
    """A same-key add that runs the moment unpack releases its lock: before the fix it saw the name taken,
    saved 'dog-<key>', and then lost its row to unpack's late register: an entry never indexed."""
    folder = tmp_path / "lib"
    folder.mkdir()
    src = save_fragment(synthetic("dog", OTHER), tmp_path / "src")
    row = {"prompt": "dog", "embedding": emb(1).tolist(), "params": {"r": 1}}
    packed = pack(src, tmp_path / "dog.fragment.safetensors", library_row=row)
    real_locked = sharing.locked

    class ThenAdd:
        def __init__(self, where):
            self.inner = real_locked(where)

        def __enter__(self):
            return self.inner.__enter__()

        def __exit__(self, *exc):
            out = self.inner.__exit__(*exc)
            library.add(folder, synthetic("dog"), embedding=emb(1), prompt="dog", params={"r": 1})
            return out

    monkeypatch.setattr(sharing, "locked", ThenAdd)
    unpack(packed, folder)
    indexed = {e["name"] for e in library.entries(folder)}
    on_disk = {p.name[:-5] for p in folder.glob("*.json")}
    assert on_disk == indexed, (on_disk, indexed)
    assert library.lookup(folder, BASE, emb(1), {"r": 1}, record=False).hit


def test_an_eviction_that_died_after_its_row_delete_is_finished_by_the_next_sweep(tmp_path: Path, monkeypatch) -> None:
    folder = _library_with(tmp_path, "dog", "cat")
    real_unlink = Path.unlink

    def die_at_tensors(self, missing_ok=False):
        if self.name == "dog.safetensors":
            raise KeyboardInterrupt("killed")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", die_at_tensors)
    monkeypatch.setattr(library, "_alive", lambda pid: pid != os.getpid())  # the marker's writer is dead
    with pytest.raises(KeyboardInterrupt):
        library.evict(folder, library.stats(folder)["bytes"] - 1)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert (folder / "dog.safetensors").exists() and not (folder / "dog.json").exists()
    library.evict(folder, 1 << 40)  # any writer sweeps
    assert not (folder / "dog.safetensors").exists()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".library")) == ["cat.json", "cat.safetensors"]
    load_fragment(folder / "cat.json")


def test_a_dead_eviction_record_never_removes_a_fragment_saved_under_that_name_since(tmp_path: Path, monkeypatch) -> None:
    folder = _library_with(tmp_path, "dog", "cat")
    monkeypatch.setattr(library, "_alive", lambda pid: pid != 424242)
    (folder / ".dog.evict.tmp-424242").write_text(json.dumps(
        {"tensors": "dog.safetensors", "manifest_sha256": "0" * 64, "tensors_sha256": "0" * 64}))
    library.forget(folder, "dog")
    library.evict(folder, 1 << 40)
    load_fragment(folder / "dog.json")  # other bytes than recorded: a fragment saved since, kept
    assert not (folder / ".dog.evict.tmp-424242").exists()


@pytest.mark.parametrize("victim", ["cat.safetensors", "cat.json", "cat.0123456789abcdef.safetensors", "renamed.safetensors"])
def test_pack_out_onto_another_fragments_file_is_refused(tmp_path: Path, victim: str, capsys) -> None:
    src = save_fragment(synthetic("dog"), tmp_path)
    cat = save_fragment(synthetic("cat", OTHER), tmp_path)
    if victim == "renamed.safetensors":  # a tensors file of any name, known only from the manifest naming it
        m = json.loads(cat.read_text())
        (tmp_path / "cat.safetensors").rename(tmp_path / victim)
        m["artifacts"]["tensors"]["file"] = victim
        from prompt_fragments.fragment.format.manifest import seal
        cat.write_text(json.dumps(seal({k: v for k, v in m.items() if k != "integrity"})))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert main(["pack", str(src), "--out", str(tmp_path / victim)]) == 2
    err = capsys.readouterr().err
    assert victim in err and "cat.json" in err and "expected an output path" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert load_fragment(cat).kept == OTHER
    # an ordinary pack path beside them is still fine
    assert main(["pack", str(src), "--out", str(tmp_path / "dog.fragment.safetensors")]) == 0
