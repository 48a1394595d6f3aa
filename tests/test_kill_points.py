"""Issue #16, fault injection: a writer killed at every write step leaves the old entry or the new one, complete.

The child process replaces an entry; every call to ``os.fsync``, ``os.replace``
and ``os.unlink`` (the steps of ``store.install``) and the index row write is
a numbered step.  Run ``k`` ends the child with ``os._exit`` (no cleanup, as a
``kill -9``) just before step ``k``; runs go on until the child finishes.
After each, the folder must hold one complete, loadable entry, old or new, and
the index must never serve a fragment for another fragment's prompt.  The
shipped code has no test hooks: the child monkeypatches ``os`` itself.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable

import pytest

from prompt_fragments.fragment.library import index as library
from prompt_fragments.fragment.library.auto_mode import load_or_fallback
from prompt_fragments.fragment.library.sharing import pack, unpack
from prompt_fragments.fragment.format.store import load_fragment, save_fragment

from test_library import BASE, emb, synthetic

OLD = {"down.0.attn1": [0, 1, 2]}
NEW = {"down.0.attn1": [4, 5], "mid.attn1": [1]}
KILLED = 113
PARAMS = {"ratio": 0.3}


def _kill_at(k: int, action: Callable[[], None]) -> None:
    """Child: run ``action`` with every write step counted; exit without cleanup just before step ``k``."""
    import prompt_fragments.fragment.library.index as lib

    count = [0]

    def step(real):
        def counted(*args, **kwargs):
            count[0] += 1
            if count[0] == k:
                os._exit(KILLED)
            return real(*args, **kwargs)
        return counted

    os.fsync, os.replace, os.unlink = step(os.fsync), step(os.replace), step(os.unlink)
    lib._insert = step(lib._insert)
    action()
    os._exit(0)


def _add_new(folder: Path) -> Callable[[], None]:
    return lambda: library.add(folder, synthetic("dog", NEW), embedding=emb(1), prompt="dog", params=PARAMS)


def _unpack_new(folder: Path, packed: Path) -> Callable[[], None]:
    return lambda: unpack(packed, folder, overwrite=True)


def _prepare(tmp_path: Path, scenario: str) -> tuple[Path, Callable[[], None]]:
    folder = tmp_path / "lib"
    library.add(folder, synthetic("dog", OLD), embedding=emb(1), prompt="dog", params=PARAMS)
    if scenario == "add-same-key":
        return folder, _add_new(folder)
    src = save_fragment(synthetic("dog", NEW), tmp_path / "src")
    row = {"prompt": "new dog", "embedding": emb(2).tolist(), "params": PARAMS} if scenario == "unpack-with-row" else None
    packed = pack(src, tmp_path / "dog.fragment.safetensors", library_row=row)
    return folder, _unpack_new(folder, packed)


def _check_folder(folder: Path, scenario: str) -> str:
    """The folder holds dog, old or new and complete; rows serve only their own fragment. Returns 'old'/'new'."""
    kept = load_fragment(folder / "dog.json").kept
    assert kept in (OLD, NEW)
    state = "old" if kept == OLD else "new"
    for e, prompt_kept in ((emb(1), OLD if scenario != "add-same-key" else None), (emb(2), NEW)):
        hit = library.lookup(folder, BASE, e, PARAMS, threshold=0.999, record=False)
        if hit.hit:
            served = library.load_entry(folder, hit.manifest_path).kept
            # the same key re-added serves whichever is on disk; a row made for another prompt never does
            assert prompt_kept is None or served == prompt_kept, (scenario, hit.reason, served)
    return state


@pytest.mark.parametrize("scenario", ["add-same-key", "unpack-no-row", "unpack-with-row"])
def test_a_writer_killed_before_any_step_leaves_old_or_new_complete(tmp_path: Path, scenario: str) -> None:
    ctx = mp.get_context("fork")
    states: list[str] = []
    for k in range(1, 200):
        run = tmp_path / f"k{k}"
        folder, action = _prepare(run, scenario)
        proc = ctx.Process(target=_kill_at, args=(k, action))
        proc.start()
        proc.join(120)
        assert proc.exitcode in (KILLED, 0), proc.exitcode
        states.append(_check_folder(folder, scenario))
        # The next writer sweeps what the dead one left: afterwards every tensors file is named by a manifest.
        library.add(folder, synthetic("cat", {"mid.attn1": [0]}), embedding=emb(7), prompt="cat")
        named = {load_fragment(m).manifest["artifacts"]["tensors"]["file"] for m in folder.glob("*.json")}
        assert {p.name for p in folder.glob("*.safetensors")} == named
        assert not list(folder.glob(".*.tmp-*"))
        assert _check_folder(folder, scenario) == states[-1]
        if proc.exitcode == 0:
            break
    else:
        pytest.fail("the writer never finished")
    assert states[-1] == "new" and states[0] == "old"
    assert len(states) >= 6  # the harness reached the write steps (fsyncs, renames, unlinks, row)


def _replacer(folder: str, kept: dict, count: int) -> None:
    for _ in range(count):
        library.add(folder, synthetic("dog", kept), embedding=emb(1), prompt="dog", params=PARAMS)


def test_two_writers_replacing_the_same_key_while_a_reader_loads(tmp_path: Path) -> None:
    library.add(tmp_path, synthetic("dog", OLD), embedding=emb(1), prompt="dog", params=PARAMS)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_replacer, args=(str(tmp_path), kept, 15)) for kept in (OLD, NEW)]
    for p in procs:
        p.start()
    loads = 0
    while any(p.is_alive() for p in procs) or loads < 5:
        out = load_or_fallback(tmp_path, tmp_path / "dog.json")
        assert out.fragment is not None, out.status  # a reader racing a replace is never quarantined
        assert out.fragment.kept in (OLD, NEW)
        loads += 1
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [e["name"] for e in library.entries(tmp_path)] == ["dog"]
    assert library.stats(tmp_path)["quarantined"] == 0
    library.evict(tmp_path, 1 << 40)  # a writer's sweep: nothing stray remains
    library.add(tmp_path, synthetic("cat", {"mid.attn1": [0]}), embedding=emb(7), prompt="cat")
    named = {load_fragment(m).manifest["artifacts"]["tensors"]["file"] for m in tmp_path.glob("*.json")}
    assert {p.name for p in tmp_path.glob("*.safetensors")} == named


def test_a_first_add_killed_before_its_manifest_leaves_no_orphan(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for k in range(1, 200):
        folder = tmp_path / f"k{k}"
        library.add(folder, synthetic("cat", {"mid.attn1": [0]}), embedding=emb(7), prompt="cat")
        proc = ctx.Process(target=_kill_at, args=(k, _add_new(folder)))
        proc.start()
        proc.join(120)
        assert proc.exitcode in (KILLED, 0), proc.exitcode
        if (folder / "dog.json").exists():
            assert load_fragment(folder / "dog.json").kept == NEW
        library.add(folder, synthetic("cow", {"mid.attn1": [2]}), embedding=emb(8), prompt="cow")  # sweeps
        named = {load_fragment(m).manifest["artifacts"]["tensors"]["file"] for m in folder.glob("*.json")}
        assert {p.name for p in folder.glob("*.safetensors")} == named, k
        if proc.exitcode == 0:
            break
    assert k >= 4


def test_a_tensors_file_without_manifest_or_marker_is_never_swept(tmp_path: Path) -> None:
    # A user copying a fragment in: the .safetensors arrives before its .json.
    save_fragment(synthetic("copied"), tmp_path / "src")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "copied.safetensors").write_bytes((tmp_path / "src" / "copied.safetensors").read_bytes())
    library.add(tmp_path / "lib", synthetic("cow", {"mid.attn1": [2]}), embedding=emb(8), prompt="cow")
    assert (tmp_path / "lib" / "copied.safetensors").exists()


def _evict_dog(folder: Path) -> Callable[[], None]:
    return lambda: library.evict(folder, library.stats(folder)["bytes"] - 1)  # dog is least recently used


@pytest.mark.parametrize("scenario", ["evict", "unpack-fresh-with-row"])
def test_an_eviction_or_a_first_unpack_killed_at_every_step_leaves_old_or_new_and_the_sweep_finishes(
        tmp_path: Path, scenario: str) -> None:
    """Issue #29: eviction and a first unpack under the same harness.  After each kill and the next writer's
    sweep: dog is there, complete and indexed (old for eviction, new for unpack), or gone with no file of its
    left (a killed eviction used to leave dog.safetensors that no sweep removed); cat is untouched."""
    ctx = mp.get_context("fork")
    states: list[str] = []
    for k in range(1, 200):
        folder = tmp_path / f"k{k}" / "lib"
        if scenario == "evict":
            library.add(folder, synthetic("dog", OLD), embedding=emb(1), prompt="dog", params=PARAMS)
            library.add(folder, synthetic("cat", {"mid.attn1": [0]}), embedding=emb(7), prompt="cat")
            action = _evict_dog(folder)
        else:
            library.add(folder, synthetic("cat", {"mid.attn1": [0]}), embedding=emb(7), prompt="cat")
            src = save_fragment(synthetic("dog", NEW), tmp_path / f"k{k}" / "src")
            row = {"prompt": "dog", "embedding": emb(1).tolist(), "params": PARAMS}
            packed = pack(src, tmp_path / f"k{k}" / "dog.fragment.safetensors", library_row=row)
            action = _unpack_new(folder, packed)
        proc = ctx.Process(target=_kill_at, args=(k, action))
        proc.start()
        proc.join(120)
        assert proc.exitcode in (KILLED, 0), proc.exitcode
        library.evict(folder, 1 << 40)  # the next writer sweeps (and evicts nothing)
        assert load_fragment(folder / "cat.json").kept == {"mid.attn1": [0]}
        named = {load_fragment(m).manifest["artifacts"]["tensors"]["file"] for m in folder.glob("*.json")}
        assert {p.name for p in folder.glob("*.safetensors")} == named, k
        assert not list(folder.glob(".*.tmp-*"))
        indexed = {e["name"] for e in library.entries(folder)}
        if (folder / "dog.json").exists():
            kept = load_fragment(folder / "dog.json").kept
            assert kept == (OLD if scenario == "evict" else NEW)
            # eviction: dog is still indexed; unpack: a kill before its row leaves it unindexed (step 5), never
            # indexed under another fragment's row
            assert "dog" in indexed or scenario != "evict", k
            hit = library.lookup(folder, BASE, emb(1), PARAMS, threshold=0.999, record=False)
            if hit.hit:
                assert library.load_entry(folder, hit.manifest_path).kept == kept
            states.append("old" if scenario == "evict" else "new")
        else:
            assert "dog" not in indexed
            states.append("new" if scenario == "evict" else "old")
        if proc.exitcode == 0:
            break
    else:
        pytest.fail("the writer never finished")
    assert states[0] == "old" and states[-1] == "new" and len(states) >= 4, states
