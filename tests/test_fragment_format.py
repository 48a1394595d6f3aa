"""Fragment files: round trip, verification against the base, and clear errors on bad or tampered input."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import comfyui_support as cs
from prompt_fragments.errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError, PruningError
from prompt_fragments.fragment.export import save_pruned_state_dict
from prompt_fragments.fragment.format.hashing import sha256_file, sha256_state_dict
from prompt_fragments.fragment.surgery.heads import prune_heads
from prompt_fragments.fragment.surgery.selection import select_heads
from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.profiling.profiler import HeadProfiler
from prompt_fragments.profiling.scoring import score_heads
from prompt_fragments.fragment.surgery.lowrank import LowRankLever
from prompt_fragments.fragment.surgery.heads import HeadLever

LOW_RANK_LAYER_SD15 = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"


def _fragment(kind: str = "sd15", seed: int = 0, ratio: float = 0.3):
    unet, make_inputs = cs.make_small_diffusers_unet(kind, seed=seed)
    with HeadProfiler(unet, buckets=2) as prof, torch.no_grad():
        for s in (1, 2):
            prof.begin_sample(s)
            unet(**make_inputs(seed=s))
    selection = select_heads(score_heads(prof.result()), ratio=ratio)
    attn_out = next(p for p in selection.pruned_only()) + ".to_out.0"
    low_rank = {LOW_RANK_LAYER_SD15: 0.9, attn_out: 0.95} if kind == "sd15" else {}
    frag = build_fragment(unet, [HeadLever(selection), LowRankLever(low_rank)], base=describe_base(unet, f"tiny-{kind}"),
                          name=f"tiny-{kind}")
    return unet, make_inputs, frag


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet, make_inputs, frag = _fragment()
    folder = tmp_path_factory.mktemp("fragments")
    in_memory = apply_fragment(unet, frag)
    manifest_path = save_fragment(frag, folder)
    return unet, make_inputs, frag, in_memory, manifest_path


def _copy_fragment(manifest_path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in manifest_path.parent.glob(manifest_path.stem + ".*"):
        (dest / f.name).write_bytes(f.read_bytes())
    return dest / manifest_path.name


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_round_trip_on_a_fresh_base_is_bit_identical(kind: str, tmp_path: Path) -> None:
    unet, make_inputs, frag = _fragment(kind)
    in_memory = apply_fragment(unet, frag)
    manifest_path = save_fragment(frag, tmp_path)
    fresh_base, _ = cs.make_small_diffusers_unet(kind, seed=0)  # rebuilt from scratch, same weights
    loaded = load_fragment(manifest_path)
    rebuilt = apply_fragment(fresh_base, loaded, base_sha256=sha256_state_dict(fresh_base))
    inputs = make_inputs(seed=9)
    with torch.no_grad():
        assert torch.equal(cs.unet_output(in_memory(**inputs)), cs.unet_output(rebuilt(**inputs)))
    assert loaded.kept == frag.kept


def test_manifest_records_original_indices_and_compression(saved) -> None:
    unet, _, frag, in_memory, manifest_path = saved
    manifest = json.loads(manifest_path.read_text())
    assert manifest["schema_version"] == 2 and manifest["base_model"]["sha256"] == sha256_state_dict(unet)
    modules = manifest["pruning"]["modules"]
    assert modules and all(sorted(e["kept"] + e["removed"]) == list(range(e["heads"])) for e in modules.values())
    for path, entry in modules.items():
        assert in_memory.get_submodule(path).heads == len(entry["kept"])
    layers = {r["layer"]: r for r in manifest["compression"]["low_rank"]}
    assert LOW_RANK_LAYER_SD15 in layers and 0.9 <= layers[LOW_RANK_LAYER_SD15]["energy_retained"] <= 1.0
    tensors = load_file(str(manifest_path.with_suffix(".safetensors")))
    assert set(k.split(".")[0] for k in tensors) == {"heads", "lowrank"}  # only what the base cannot give
    assert manifest["artifacts"]["tensors"]["sha256"] == sha256_file(manifest_path.with_suffix(".safetensors"))


def test_low_rank_inside_a_pruned_attention_is_applied(saved) -> None:
    unet, _, frag, in_memory, _ = saved
    layer = next(r["layer"] for r in frag.manifest["compression"]["low_rank"] if r["layer"].endswith("to_out.0"))
    module = in_memory.get_submodule(layer)
    assert isinstance(module, torch.nn.Sequential) and len(module) == 2
    assert module[0].in_features == in_memory.get_submodule(layer.rsplit(".", 2)[0]).to_q.out_features


def test_wrong_base_hash_and_wrong_architecture(saved) -> None:
    unet, _, frag, _, manifest_path = saved
    loaded = load_fragment(manifest_path)
    other, _ = cs.make_small_diffusers_unet("sd15", seed=1)
    with pytest.raises(BaseModelMismatchError, match="built for base model 'tiny-sd15' sha256 .*, found sha256"):
        apply_fragment(other, loaded, base_sha256=sha256_state_dict(other))
    sdxl, _ = cs.make_small_diffusers_unet("sdxl")
    with pytest.raises(BaseModelMismatchError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1: fragment 'tiny-sd15' prunes an attention module the model does not have"):
        apply_fragment(sdxl, loaded)


def test_tampered_tensors_file(saved, tmp_path: Path) -> None:
    manifest_path = _copy_fragment(saved[4], tmp_path)
    tensors_path = manifest_path.with_suffix(".safetensors")
    data = bytearray(tensors_path.read_bytes())
    data[-1] ^= 0xFF
    tensors_path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{tensors_path.name}: expected sha256 .*, found"):
        load_fragment(manifest_path)


def test_tampered_manifest(saved, tmp_path: Path) -> None:
    manifest_path = _copy_fragment(saved[4], tmp_path)
    manifest = json.loads(manifest_path.read_text())
    path = next(iter(manifest["pruning"]["modules"]))
    manifest["pruning"]["modules"][path]["kept"] = manifest["pruning"]["modules"][path]["kept"][:-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=f"{manifest_path.name}: manifest was modified after it was written"):
        load_fragment(manifest_path)


def _rewrite_tensors(manifest_path: Path, mutate) -> None:
    """Change the tensors file and re-seal both files, as a careless (not malicious-proof) tool would."""
    from prompt_fragments.fragment.format.manifest import seal

    tensors_path = manifest_path.with_suffix(".safetensors")
    tensors = load_file(str(tensors_path))
    mutate(tensors)
    save_file(tensors, str(tensors_path))
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["tensors"]["sha256"] = sha256_file(tensors_path, use_cache=False)
    manifest_path.write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "integrity"})))


def test_missing_out_of_range_and_duplicate_indices(saved, tmp_path: Path) -> None:
    path = next(iter(saved[2].manifest["pruning"]["modules"]))
    key = f"heads.{path}.kept"

    m1 = _copy_fragment(saved[4], tmp_path / "missing")
    _rewrite_tensors(m1, lambda t: t.pop(key))
    with pytest.raises(IntegrityError, match=f"missing tensor '{key}' for module {path}"):
        load_fragment(m1)

    m2 = _copy_fragment(saved[4], tmp_path / "range")
    _rewrite_tensors(m2, lambda t: t.__setitem__(key, torch.tensor([0, 99])))
    with pytest.raises(PruningError, match=rf"{path}: expected head indices in \[0, 3\], found \[99\]"):
        load_fragment(m2)

    m3 = _copy_fragment(saved[4], tmp_path / "dup")
    _rewrite_tensors(m3, lambda t: t.__setitem__(key, torch.tensor([1, 1])))
    with pytest.raises(PruningError, match=rf"{path}: duplicate head indices \[1\]"):
        load_fragment(m3)


def test_artifact_path_must_stay_beside_the_manifest(saved, tmp_path: Path) -> None:
    from prompt_fragments.fragment.format.manifest import seal

    manifest_path = _copy_fragment(saved[4], tmp_path)
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"]["tensors"]["file"] = "../elsewhere.safetensors"
    manifest_path.write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "integrity"})))
    with pytest.raises(ManifestError, match="artifacts.tensors.file must be a plain"):
        load_fragment(manifest_path)


def test_bad_manifest_json_and_schema(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match="bad.json: not a readable JSON manifest"):
        load_fragment(bad)
    bad.write_text(json.dumps({"schema_version": 1, "kind": "prompt-fragment"}))
    with pytest.raises(ManifestError, match="bad.json: missing required field 'name'"):
        load_fragment(bad)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_fragment(tmp_path / "absent.json")


def test_existing_fragment_is_never_overwritten_by_default(saved, tmp_path: Path) -> None:
    _, _, frag, _, manifest_path = saved
    dest = _copy_fragment(manifest_path, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FragmentError, match="already exists"):
        save_fragment(frag, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    save_fragment(frag, tmp_path, overwrite=True)
    assert load_fragment(dest).kept == frag.kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_make_fragment_refuses_a_taken_or_bad_name_before_it_judges(saved, tmp_path: Path) -> None:
    from prompt_fragments.fragment.pipeline import Judging, make_fragment

    _, _, frag, _, manifest_path = saved
    _copy_fragment(manifest_path, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls: list[str] = []
    judging = Judging(lambda f, s: calls.append("judge"), "toy", [0], [1], prepare=lambda: calls.append("prepare"))
    with pytest.raises(FragmentError, match="already exists"):
        make_fragment(None, None, base={}, name=frag.name, directory=tmp_path, judging=judging)
    with pytest.raises(ManifestError, match="no path"):
        make_fragment(None, None, base={}, name="../outside", directory=tmp_path, judging=judging)
    assert calls == [] and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_fragment_names_cannot_escape_the_folder(saved, tmp_path: Path) -> None:
    frag = saved[2]
    for name in ("../evil", "/abs", "a/b", ".hidden", ""):
        frag_copy = type(frag)(manifest={**frag.manifest, "name": name}, tensors=frag.tensors)
        with pytest.raises(ManifestError, match="expected 1-128 characters"):
            save_fragment(frag_copy, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_standalone_pruned_state_dict(saved, tmp_path: Path) -> None:
    unet, make_inputs, frag, in_memory, _ = saved
    out = save_pruned_state_dict(tmp_path / "unet.safetensors", unet, frag)
    exported = load_file(str(out))
    # Loading the export into the pruned architecture reproduces the fragment model exactly.
    target = apply_fragment(cs.make_small_diffusers_unet("sd15", seed=5)[0], frag)
    target.load_state_dict(exported)
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(cs.unet_output(target(**inputs)), cs.unet_output(in_memory(**inputs)))
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        heads = json.loads(fh.metadata()["prompt_fragments.heads"])
    assert heads == {p: len(k) for p, k in frag.kept.items()}


def test_streaming_file_hash_uses_constant_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as fh:
        for i in range(64):
            fh.write(bytes([i]) * (1 << 20))
    tracemalloc.start()
    digest = sha256_file(big, use_cache=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    import hashlib

    assert digest == hashlib.sha256(big.read_bytes()).hexdigest()
    assert peak < 8 << 20, f"hashing a 64 MiB file peaked at {peak} bytes"


def test_state_dict_hash_sees_every_weight() -> None:
    unet, _ = cs.make_small_diffusers_unet("sd15")
    before = sha256_state_dict(unet)
    pruned = prune_heads(unet, {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": [0]})
    assert sha256_state_dict(pruned) != before == sha256_state_dict(unet)


def test_manifest_without_pruning_modules_is_a_manifest_error(saved, tmp_path: Path) -> None:
    # Found by the fuzz test: a resealed manifest with "pruning": {} used to escape as a bare KeyError.
    from prompt_fragments.fragment.format.manifest import seal

    manifest_path = _copy_fragment(saved[4], tmp_path)
    manifest = json.loads(manifest_path.read_text())
    manifest["pruning"] = {}
    manifest_path.write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "integrity"})))
    with pytest.raises(ManifestError, match="missing required field 'pruning.modules'"):
        load_fragment(manifest_path)
