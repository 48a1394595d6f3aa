"""Issue #16: hostile and broken fragments, one regression test per finding.

Every case here raised a foreign exception, lost data or served the wrong
fragment before the fix.  The rule checked: untrusted input raises only the
``FragmentError`` family with where / expected / found; ``load_or_fallback``
never raises for it; nothing already on disk is lost.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prompt_fragments.cli import main
from prompt_fragments.fragment.library import index as library
from prompt_fragments.fragment.format import store
from prompt_fragments.fragment.library.auto_mode import load_or_fallback
from prompt_fragments.errors import FragmentError, IntegrityError, ManifestError
from prompt_fragments.fragment.format.hashing import sha256_file
from prompt_fragments.fragment.format.manifest import seal, validate_manifest
from prompt_fragments.fragment.library.sharing import META_LIBRARY, META_MANIFEST, TENSOR, check_row, pack, read_pack, unpack
from prompt_fragments.fragment.format.store import check_name, load_fragment, save_fragment
from prompt_fragments.fragment.surgery.heads import kept_key
from prompt_fragments.fragment.format.untrusted import check_safetensors_bytes

from test_library import BASE, emb, synthetic


def _reseal(manifest: dict[str, Any]) -> dict[str, Any]:
    return seal({k: v for k, v in manifest.items() if k != "integrity"})


def _rewrite_pack(src: Path, dst: Path, *, manifest: Callable[[dict], dict] | None = None,
                  row_text: str | None = None) -> Path:
    """A copy of pack ``src`` with its manifest changed (and re-sealed) or its library row text replaced."""
    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensor = fh.get_tensor(TENSOR)
    if manifest is not None:
        meta[META_MANIFEST] = json.dumps(_reseal(manifest(json.loads(meta[META_MANIFEST]))))
    if row_text is not None:
        meta[META_LIBRARY] = row_text
    save_file({TENSOR: tensor}, str(dst), metadata=meta)
    return dst


def _header_file(header: dict[str, Any], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- finding 1: foreign exceptions -------------------------------------------------------------

def test_deeply_nested_json_in_an_open_block_is_a_manifest_error_and_is_quarantined(tmp_path: Path) -> None:
    # About a thousand levels: json.loads still parses it, hashing it (json.dumps, a few frames deeper)
    # raised RecursionError.  The band of depths where that happens is narrow and moves with the caller's
    # stack, so every depth around the limit is tried.  Past json.loads' own limit (issue #29: it parses
    # first, so memory stays linear) the depth is too deep to count and the message says so.
    path = save_fragment(synthetic("deep"), tmp_path)
    text = path.read_text()
    for depth in range(850, 1001):
        nested = "[" * depth + "]" * depth
        path.write_text(text.replace('"profiling": {}', f'"profiling": {{"x": {nested}}}', 1))
        with pytest.raises(ManifestError, match=rf"deep\.json: .*nested at most \d+ levels deep, "
                                                rf"found ({depth + 2}|deeper nesting than the JSON parser can read)"):
            library.load_entry(tmp_path, path)
    out = load_or_fallback(tmp_path, path)
    assert out.fragment is None and out.status.startswith("FALLBACK") and out.quarantined


def test_a_header_dtype_that_is_a_list_is_an_integrity_error(tmp_path: Path) -> None:
    bad = _header_file({"k": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(IntegrityError, match=r"inner: tensor 'k': expected dtype .* found \['F32'\]"):
        check_safetensors_bytes(bad, "inner")
    # The same through the loader: a tensors file with that header and a manifest that hashes it.
    frag = synthetic("listdtype", kept={})
    path = save_fragment(frag, tmp_path)
    tensors = tmp_path / "listdtype.safetensors"
    tensors.write_bytes(bad)
    m = json.loads(path.read_text())
    m["artifacts"]["tensors"].update(sha256=sha256_file(tensors, use_cache=False), bytes=len(bad))
    path.write_text(json.dumps(_reseal(m)))
    with pytest.raises(IntegrityError, match="listdtype.safetensors"):
        load_fragment(path)
    out = load_or_fallback(tmp_path, path)
    assert out.fragment is None and out.quarantined


def test_a_400_digit_number_in_a_library_row_is_a_manifest_error(tmp_path: Path) -> None:
    src = save_fragment(synthetic("rowdog"), tmp_path / "a")
    good = pack(src, tmp_path / "good.fragment.safetensors", library_row={"prompt": "a dog", "embedding": [0.5] * 4, "params": {}})
    huge = "9" * 400
    bad = _rewrite_pack(good, tmp_path / "bad.fragment.safetensors",
                        row_text=f'{{"prompt": "a dog", "params": {{}}, "embedding": [{huge}, 1.0]}}')
    with pytest.raises(ManifestError, match="bad.fragment.safetensors"):
        read_pack(bad)
    with pytest.raises(ManifestError, match="library row"):
        check_row({"prompt": "p", "embedding": [10 ** 400], "params": {}}, "row")
    assert main(["unpack", str(bad), str(tmp_path / "dest")]) == 2


def test_parse_json_refuses_depth_huge_ints_and_nan_with_where() -> None:
    from prompt_fragments.fragment.format.untrusted import parse_json

    for text, found in (("[" * 200 + "]" * 200, "nest"), ("[" + "1" * 400 + "]", "digits"),
                        ('{"a": NaN}', "NaN"), ('{"a": -Infinity}', "Infinity"), ("[1e999]", "finite")):
        with pytest.raises(ManifestError, match=rf"^src: .*{found}"):
            parse_json(text, "src")
    assert parse_json('{"a": [1, 2.5, "x"]}', "src") == {"a": [1, 2.5, "x"]}


# --- finding 5: names ending in a newline -------------------------------------------------------

def test_a_name_with_a_trailing_newline_is_refused_by_check_and_schema() -> None:
    with pytest.raises(ManifestError, match="fragment name 'evil\\\\n'"):
        check_name("evil\n")
    frag = synthetic("evil")
    m = dict(frag.manifest, name="evil\n",
             artifacts={"tensors": {"file": "evil.safetensors", "sha256": "0" * 64}})
    with pytest.raises(ManifestError, match="x.json: schema: at name"):
        validate_manifest(_reseal(m), "x.json")


# --- finding 6: ordinary path mistakes ----------------------------------------------------------

def test_path_mistakes_are_one_line_errors_not_tracebacks(tmp_path: Path, capsys) -> None:
    src = save_fragment(synthetic("pathdog"), tmp_path / "src")
    packed = pack(src, tmp_path / "p.fragment.safetensors")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["unpack", str(packed), str(a_file)]) == 2
    assert "a-file" in capsys.readouterr().err
    assert main(["pack", str(src), "--out", str(tmp_path / "missing" / "x.fragment.safetensors")]) == 2
    assert "missing" in capsys.readouterr().err
    index_dir = tmp_path / "idx"
    (index_dir / ".library" / "index.sqlite3").mkdir(parents=True)
    assert main(["library", str(index_dir)]) == 2
    assert "index.sqlite3" in capsys.readouterr().err
    lib_file = tmp_path / "libfile"
    lib_file.mkdir()
    (lib_file / ".library").write_text("x")
    assert main(["library", str(lib_file)]) == 2
    assert ".library" in capsys.readouterr().err
    with pytest.raises(FragmentError, match=r"\.library"):
        library.add(lib_file, synthetic("x"), embedding=emb(1), prompt="x")


# --- finding 8: small things ---------------------------------------------------------------------

def test_a_negative_evict_to_is_refused(tmp_path: Path, capsys) -> None:
    library.add(tmp_path, synthetic("keep"), embedding=emb(1), prompt="keep")
    with pytest.raises(FragmentError, match="expected a size >= 0 bytes, found -1"):
        library.evict(tmp_path, -1)
    assert main(["library", str(tmp_path), "--evict-to", "-5"]) == 2
    assert [e["name"] for e in library.entries(tmp_path)] == ["keep"]


def test_quarantine_moves_the_tensors_file_the_manifest_names(tmp_path: Path) -> None:
    path = save_fragment(synthetic("qdog"), tmp_path)
    named = tmp_path / "qdog-data.safetensors"
    (tmp_path / "qdog.safetensors").rename(named)
    m = json.loads(path.read_text())
    m["artifacts"]["tensors"]["file"] = named.name
    path.write_text(json.dumps(_reseal(m)))
    load_fragment(path)  # a valid fragment so far
    named.write_bytes(named.read_bytes()[:-3] + b"xyz")
    out = load_or_fallback(tmp_path, path)
    assert out.fragment is None
    assert sorted(re.sub(r"^\d{8}-\d{6}-\d+-", "", p.name) for p in out.quarantined) == [
        "qdog-data.safetensors.quarantined", "qdog.json.quarantined"]
    assert not named.exists() and not path.exists()


def test_a_transient_read_error_falls_back_without_quarantine(tmp_path: Path, monkeypatch) -> None:
    path = save_fragment(synthetic("eio"), tmp_path)

    def failing_load(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "load_file", failing_load)
    out = load_or_fallback(tmp_path, path)
    assert out.fragment is None and out.status.startswith("FALLBACK") and "Input/output error" in out.status
    assert out.quarantined == [] and path.exists() and (tmp_path / "eio.safetensors").exists()
    monkeypatch.undo()
    assert load_fragment(path).name == "eio"


def test_nan_and_infinity_in_a_manifest_are_refused(tmp_path: Path) -> None:
    for i, value in enumerate((float("nan"), float("inf"))):
        frag = synthetic(f"nan{i}")
        frag.manifest["profiling"] = {"score": value}
        path = save_fragment(frag, tmp_path)
        with pytest.raises(ManifestError, match=rf"nan{i}\.json.*(NaN|Infinity)"):
            library.load_entry(tmp_path, path)


# --- finding 7: verify is as strict as the loader -----------------------------------------------

@pytest.mark.parametrize("schedule", [
    {"step_reuse": {"total_steps": 4, "reuse_steps": [99999]}},
    {"timestep_heads": {"buckets": 2, "kept": {"0": {"down.0.attn1": 5}}}},
    {"timestep_heads": {"buckets": 2, "kept": {"0": {"down.0.attn1": [6, 7]}}}},  # heads the fragment pruned
    {"timestep_heads": {"buckets": 2, "kept": {"0": {"down.0.attn1": [0]}, "7": {"down.0.attn1": [0]}}}},  # bucket >= buckets
    {"timestep_heads": {"buckets": 2, "kept": {"0": [1, 2]}}},  # a list where the parser expects module -> heads
])
def test_verify_refuses_a_schedule_block_the_loader_refuses(tmp_path: Path, schedule: dict, capsys) -> None:
    src = save_fragment(synthetic("sched"), tmp_path / "a")
    good = pack(src, tmp_path / "good.fragment.safetensors")
    bad = _rewrite_pack(good, tmp_path / "bad.fragment.safetensors", manifest=lambda m: {**m, "schedule": schedule})
    with pytest.raises(FragmentError, match=r"bad\.fragment\.safetensors.*schedule"):
        read_pack(bad)
    assert main(["verify", str(bad)]) == 2
    # The loader refuses the same file with the same rule.
    path = tmp_path / "a" / "sched.json"
    path.write_text(json.dumps(_reseal({**json.loads(path.read_text()), "schedule": schedule})))
    with pytest.raises(FragmentError, match="schedule"):
        load_fragment(path)


def test_rank_zero_low_rank_factors_recorded_as_rank_eight_are_refused(tmp_path: Path) -> None:
    frag = synthetic("lr", kept={})
    frag.tensors = {"lowrank.mid.proj.down": torch.zeros(0, 8), "lowrank.mid.proj.up": torch.zeros(8, 0)}
    frag.manifest["compression"]["low_rank"] = [{"layer": "mid.proj", "rank": 8}]
    path = save_fragment(frag, tmp_path)
    with pytest.raises(IntegrityError, match=r"lowrank\.mid\.proj\.down: expected .*rank 8.* found .*\[0, 8\]"):
        load_fragment(path)


# --- finding 2 and 4: overwrite paths ----------------------------------------------------------

def test_unpack_overwrite_onto_a_directory_keeps_the_old_tensors(tmp_path: Path) -> None:
    src = save_fragment(synthetic("ow", kept={"down.0.attn1": [0, 1]}), tmp_path / "a")
    packed = pack(src, tmp_path / "ow.fragment.safetensors")
    dest = tmp_path / "dest"
    save_fragment(synthetic("ow"), dest)
    old = (dest / "ow.safetensors").read_bytes()
    (dest / "ow.json").unlink()
    (dest / "ow.json").mkdir()
    with pytest.raises(FragmentError, match=r"ow\.json: expected a regular file"):
        unpack(packed, dest, overwrite=True)
    assert (dest / "ow.safetensors").read_bytes() == old


def test_pack_out_onto_the_fragments_own_files_is_refused(tmp_path: Path) -> None:
    src = save_fragment(synthetic("self"), tmp_path)
    for target in (tmp_path / "self.safetensors", src):
        assert main(["pack", str(src), "--out", str(target)]) == 2
        assert load_fragment(src).name == "self"


def test_unpack_overwrite_without_a_row_drops_the_stale_row(tmp_path: Path) -> None:
    folder = tmp_path / "lib"
    e = emb(3)
    old = save_fragment(synthetic("same"), folder)
    library.register(folder, old, embedding=e, prompt="old prompt", params={"r": 1})
    assert library.lookup(folder, BASE, e, {"r": 1}, record=False).hit
    other = save_fragment(synthetic("same", kept={"mid.attn1": [2]}), tmp_path / "other")
    packed = pack(other, tmp_path / "same.fragment.safetensors")  # no library row
    unpack(packed, folder, overwrite=True)
    assert load_fragment(folder / "same.json").kept == {"mid.attn1": [2]}
    result = library.lookup(folder, BASE, e, {"r": 1}, record=False)
    assert not result.hit, result.reason
    assert library.entries(folder) == []


def test_a_fragment_saved_with_no_modules_and_kept_key_round_trips(tmp_path: Path) -> None:
    # Guard for the tests above: the synthetic fragment with kept={} is itself valid.
    path = save_fragment(synthetic("empty", kept={}), tmp_path)
    assert load_fragment(path).tensors == {} and kept_key("a") == "heads.a.kept"


def test_auto_mode_with_an_unusable_library_folder_says_so_and_uses_the_full_model(tmp_path: Path) -> None:
    from prompt_fragments.fragment.library.auto_mode import auto_select

    save_fragment(synthetic("dog"), tmp_path)
    (tmp_path / ".library").write_text("not a folder")
    out = auto_select(tmp_path, BASE, emb(1))
    assert out.fragment is None and out.status.startswith("MISS (full model): library unusable") and ".library" in out.status
