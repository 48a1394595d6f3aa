"""Issue #29, review of the merged fixes: what still got through a second hostile pass.

Each test here failed on the merged main (a733f40) before its fix: a foreign exception (not a
``FragmentError``) from the library or the command line on a file or folder a stranger or a typo can put
in the fragments folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from prompt_fragments.cli import main
from prompt_fragments.fragment.library import index as library

from test_library import BASE, emb, synthetic


def _library(tmp_path: Path) -> Path:
    folder = tmp_path / "frags"
    library.add(folder, synthetic("dog"), embedding=emb(0), prompt="a dog")
    return folder


# ---- folders where the library expects files -----------------------------------------------------------------

@pytest.mark.parametrize("name", [".x.tmp-999999999", ".dog.evict.tmp-999999999", ".dog.install.tmp-999999999"])
def test_a_folder_named_like_a_dead_writers_temporary_is_left_alone(tmp_path: Path, name: str) -> None:
    # the sweep unlinked every '.*.tmp-<dead pid>': a folder raised IsADirectoryError out of add and evict
    folder = _library(tmp_path)
    (folder / name).mkdir()
    (folder / name / "inside").write_text("a user's file")
    library.add(folder, synthetic("cat"), embedding=emb(1), prompt="a cat")
    assert sorted(library.evict(folder, 0)) == ["cat", "dog"]
    assert (folder / name / "inside").read_text() == "a user's file"


@pytest.mark.parametrize("which", ["manifest", "tensors"])
def test_evicting_an_entry_whose_file_is_now_a_folder_raises_no_foreign_error(tmp_path: Path, which: str) -> None:
    folder = _library(tmp_path)
    target = folder / "dog.json" if which == "manifest" else next(folder.glob("dog*.safetensors"))
    target.unlink()
    target.mkdir()
    (target / "inside").write_text("kept")
    assert library.evict(folder, 0) == ["dog"]
    assert (target / "inside").read_text() == "kept"
    assert library.entries(folder) == []


# ---- the command line ------------------------------------------------------------------------------------------

def test_reuse_with_an_undecodable_paraphrases_file_is_one_line_error(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "x.json"
    manifest.write_text("{}")
    paraphrases = tmp_path / "p.txt"
    paraphrases.write_bytes(b"\xff\xfe\x00 not utf-8")
    assert main(["reuse", str(manifest), "--paraphrases-file", str(paraphrases)]) == 2
    err = capsys.readouterr().err
    assert str(paraphrases) in err and "UTF-8" in err and "Traceback" not in err


# ---- verify: every lever's stored floats are finite and fit float16 -----------------------------------------------

def _low_rank_fragment():
    import torch
    import torch.nn as nn

    from prompt_fragments.fragment.build import build_fragment, describe_base
    from prompt_fragments.fragment.surgery.lowrank import LowRankLever

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 16))
    return model, build_fragment(model, [LowRankLever({"0": 0.9})], base=describe_base(model, "tiny"), name="tiny")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("key", ["lowrank.0.down", "lowrank.0.up"])
def test_a_low_rank_factor_that_is_not_finite_in_float16_is_refused_by_read_and_verify(tmp_path: Path, key: str,
                                                                                        value: float) -> None:
    # Only low-bit and fp8/int8 values were checked: a NaN factor loaded and `verify` said OK (1e30 passes a float32
    # forward and overflows in the float16 a host runs).
    from test_loadable import _variant, _write_entry, _write_pack

    from prompt_fragments.errors import IntegrityError
    from prompt_fragments.fragment.build import fragment_replacements
    from prompt_fragments.fragment.format.store import load_fragment
    from prompt_fragments.fragment.library.sharing import read_pack

    model, frag = _low_rank_fragment()
    assert key in frag.tensors
    manifest, tensors, raw = _variant(frag, tensors=lambda t: t[key].view(-1).__setitem__(3, value))
    pack = _write_pack(tmp_path / "tiny.fragment.safetensors", manifest, raw)
    with pytest.raises(IntegrityError, match=rf"tiny\.fragment\.safetensors\[tensors\]: {key}: expected finite values within ±65504 \(float16\), found (nan|inf|1e\+30)$"):
        read_pack(pack)
    with pytest.raises(IntegrityError, match=key):
        load_fragment(_write_entry(tmp_path / "lib", manifest, raw))
    with pytest.raises(IntegrityError, match=key):
        fragment_replacements(model, type(frag)(manifest, tensors))
    assert main(["verify", str(pack)]) == 2


@pytest.mark.parametrize("target", ["index.sqlite3", "lock", "quarantine/x.fragment.safetensors"])
def test_pack_out_into_the_library_folder_is_refused(tmp_path: Path, target: str, capsys) -> None:
    # pack --out refused other fragments' files but wrote over the library index: every row was lost
    import sqlite3

    folder = _library(tmp_path)
    (folder / ".library" / "quarantine").mkdir(exist_ok=True)
    before = {p: p.read_bytes() for p in (folder / ".library").rglob("*") if p.is_file()}
    assert main(["pack", str(folder / "dog.json"), "--out", str(folder / ".library" / target)]) == 2
    assert ".library folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (folder / ".library").rglob("*") if p.is_file()} == before
    assert sqlite3.connect(folder / ".library" / "index.sqlite3").execute("SELECT name FROM entries").fetchall() == [("dog",)]
    assert library.lookup(folder, BASE, emb(0)).hit


# ---- another entry's content-named tensors file -------------------------------------------------------------------

def _dog_naming_victims_file(tmp_path: Path) -> tuple[Path, str]:
    """``victim`` replaced once (its tensors file is content-named ``victim.<16 hex>.safetensors``) and a hand-made,
    valid entry ``dog`` whose manifest names that same file."""
    import json

    from prompt_fragments.fragment.format.manifest import seal

    folder = tmp_path / "frags"
    library.add(folder, synthetic("victim"), embedding=emb(0), prompt="victim")
    library.add(folder, synthetic("victim", kept={"down.0.attn1": [0, 1]}), embedding=emb(0), prompt="victim")
    manifest = json.loads((folder / "victim.json").read_text())
    shared = manifest["artifacts"]["tensors"]["file"]
    assert shared.startswith("victim.") and shared != "victim.safetensors"
    (folder / "dog.json").write_text(json.dumps(seal({**{k: v for k, v in manifest.items() if k != "integrity"}, "name": "dog"})))
    library.register(folder, folder / "dog.json", embedding=emb(5), prompt="dog")
    return folder, shared


def test_evicting_an_entry_never_deletes_another_entrys_content_named_tensors(tmp_path: Path) -> None:
    from prompt_fragments.fragment.format.store import load_fragment

    folder, shared = _dog_naming_victims_file(tmp_path)
    assert library.lookup(folder, BASE, emb(0)).manifest_path.name == "victim.json"  # victim most recently used
    size = next(e["size"] for e in library.entries(folder) if e["name"] == "victim")
    assert library.evict(folder, size) == ["dog"]
    assert (folder / shared).is_file()
    load_fragment(folder / "victim.json")


def test_quarantining_an_entry_never_moves_another_entrys_content_named_tensors(tmp_path: Path) -> None:
    from prompt_fragments.fragment.format.store import load_fragment

    import json

    folder, shared = _dog_naming_victims_file(tmp_path)
    manifest = json.loads((folder / "dog.json").read_text())
    manifest["profiling"] = {"edited": True}  # no longer matches its seal: dog fails to load, still names the file
    (folder / "dog.json").write_text(json.dumps(manifest))
    moved = library.quarantine(folder, folder / "dog.json", "test")
    assert [p.name.endswith("-dog.json.quarantined") for p in moved] == [True]
    assert (folder / shared).is_file()
    load_fragment(folder / "victim.json")


# ---- a packed library row ----------------------------------------------------------------------------------------

def _pack_with_row(tmp_path: Path, row_text: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prompt_fragments.fragment.format.store import save_fragment
    from prompt_fragments.fragment.library.sharing import META_LIBRARY, TENSOR, pack

    manifest = save_fragment(synthetic("dog"), tmp_path / "src")
    good = pack(manifest, tmp_path / "good.fragment.safetensors")
    with safe_open(str(good), "pt") as fh:
        metadata, tensor = fh.metadata(), fh.get_tensor(TENSOR)
    out = tmp_path / "dog.fragment.safetensors"
    save_file({TENSOR: tensor}, str(out), metadata={**metadata, META_LIBRARY: row_text})
    return out


@pytest.mark.parametrize("row_text", [
    '{"prompt": "dog", "embedding": [1e300, 1.0], "params": {}}',  # float32 inf once indexed: FragmentError after the write
    '{"prompt": "\\ud800", "embedding": [1.0, 2.0], "params": {}}',  # lone surrogate: UnicodeEncodeError in sqlite
])
def test_a_packed_row_the_index_cannot_hold_is_refused_before_anything_is_written(tmp_path: Path, row_text: str,
                                                                                   capsys) -> None:
    from prompt_fragments.errors import ManifestError
    from prompt_fragments.fragment.library.sharing import read_pack

    pack_path = _pack_with_row(tmp_path, row_text)
    with pytest.raises(ManifestError, match=r"dog\.fragment\.safetensors: library row: expected a UTF-8 prompt string"):
        read_pack(pack_path)
    folder = tmp_path / "lib"
    assert main(["unpack", str(pack_path), str(folder)]) == 2
    assert "library row" in capsys.readouterr().err
    assert not (folder / "dog.json").exists() and library.entries(folder) == []


def test_a_packed_row_with_large_integer_embedding_values_is_indexed_as_float32(tmp_path: Path) -> None:
    # JSON integers went to torch.tensor as int64: 10**19 raised ValueError out of unpack, after the files were written
    import torch

    pack_path = _pack_with_row(tmp_path, '{"prompt": "dog", "embedding": [10000000000000000000, 3, 4], "params": {}}')
    folder = tmp_path / "lib"
    assert main(["unpack", str(pack_path), str(folder)]) == 0
    (entry,) = library.entries(folder)
    assert entry["embedding"].dtype == torch.float32 and bool(torch.isfinite(entry["embedding"]).all())
    assert library.lookup(folder, BASE, torch.tensor([1.0, 0.0, 0.0])).hit


# ---- an index row edited to hold text that is not UTF-8 ----------------------------------------------------------

@pytest.mark.parametrize("column", ["prompt", "name", "params", "key"])
def test_a_row_with_undecodable_text_is_skipped_and_dropped_not_the_whole_library(tmp_path: Path, column: str) -> None:
    # sqlite3 failed the whole query on it: every reader and `library --evict-to` (the repair) raised
    import sqlite3

    folder = _library(tmp_path)
    library.add(folder, synthetic("cat"), embedding=emb(1), prompt="a cat")
    con = sqlite3.connect(folder / ".library" / "index.sqlite3")
    con.execute(f"UPDATE entries SET {column} = CAST(X'FF61' AS TEXT) WHERE name = 'dog'")
    con.commit()
    con.close()
    assert [e["name"] for e in library.entries(folder)] == ["cat"]
    assert library.lookup(folder, BASE, emb(1)).manifest_path.name == "cat.json"
    assert main(["library", str(folder), "--evict-to", str(10 ** 9)]) == 0
    assert sqlite3.connect(folder / ".library" / "index.sqlite3").execute("SELECT COUNT(*) FROM entries").fetchone() == (1,)
    assert (folder / "dog.json").is_file()  # the row goes, its files stay


@pytest.mark.parametrize("pid", ["99999999999999999999", "4294967296"])
def test_a_temporary_named_with_a_pid_no_process_can_have_is_swept(tmp_path: Path, pid: str) -> None:
    # os.kill raised OverflowError out of every writer's sweep
    folder = _library(tmp_path)
    (folder / f".x.tmp-{pid}").write_text("left over")
    assert library.evict(folder, 0) == ["dog"]
    assert not (folder / f".x.tmp-{pid}").exists()
