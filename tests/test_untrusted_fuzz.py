"""Fragments from strangers (issue #6): property-based fuzzing of manifest, tensors and pack loading.

Properties: whatever the bytes, loading raises only the pack's own
``FragmentError`` family (or succeeds), and no file appears outside the
fragments folder.  Manifests are re-sealed after mutation so the fuzzer gets
past the self-hash and reaches the deeper checks.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from prompt_fragments.fragment.library.auto_mode import load_or_fallback
from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.format.hashing import sha256_file
from prompt_fragments.fragment.library.index import load_entry
from prompt_fragments.fragment.format.manifest import seal
from prompt_fragments.fragment.library.sharing import META_MANIFEST, TENSOR, read_pack, unpack
from prompt_fragments.fragment.format.store import save_fragment

from test_library import synthetic

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Issue #16: values that broke the loaders with foreign exceptions (NaN / Infinity, 400-digit integers, deep
# nesting) and a wrong JSON type for every field (each of these is a type some field does not expect).
hostile_leaves = (st.sampled_from([float("nan"), float("inf"), float("-inf"), 10 ** 400, -(10 ** 400), 2 ** 64, -1, 0])
                  | st.integers(-(10 ** 60), 10 ** 60))
deep_values = st.integers(60, 400).map(lambda d: json.loads("[" * d + "]" * d) if d < 900 else [])
# st.builds, not st.just: _set mutates what it is given, and a shared {} would grow into a cycle.
any_values = (json_values | hostile_leaves | deep_values | st.lists(hostile_leaves, max_size=3)
              | st.builds(dict) | st.builds(list))
evil_names = st.sampled_from(["../x", "/etc/passwd", "a/b", "..", ".hidden", "x.ckpt", "dog\x00.json", "ok", "ok.safetensors"])
# Where to put a fuzzed value: paths into the manifest the loader acts on.
targets = st.sampled_from([
    ("name",), ("kind",), ("schema_version",), ("base_model",), ("base_model", "sha256"), ("pruning",),
    ("pruning", "modules"), ("pruning", "modules", "down.0.attn1"), ("pruning", "modules", "down.0.attn1", "kept"),
    ("pruning", "modules", "down.0.attn1", "heads"), ("pruning", "modules", "down.0.attn1", "dim_head"),
    ("pruning", "modules", "../../x"), ("compression",), ("compression", "low_rank"), ("compression", "kv_fold"),
    ("compression", "ff"), ("compression", "precision"), ("artifacts",), ("artifacts", "tensors"),
    ("artifacts", "tensors", "file"), ("artifacts", "tensors", "sha256"), ("reuse",), ("reuse", "h3"),
    ("profiling", "x"), ("quality", "ssim"), ("integrity",), ("integrity", "manifest_sha256"), ("created",),
    ("compression", "low_rank", 0), ("pruning", "modules", "down.0.attn1", "removed"), ("base_model", "hash_kind"),
    ("schedule",), ("schedule", "timestep_heads"), ("schedule", "timestep_heads", "buckets"),
    ("schedule", "timestep_heads", "kept"), ("schedule", "timestep_heads", "kept", "0"),
    ("schedule", "timestep_heads", "kept", "0", "down.0.attn1"), ("schedule", "step_reuse"),
    ("schedule", "step_reuse", "total_steps"), ("schedule", "step_reuse", "reuse_steps"),
    ("schedule", "step_reuse", "shallow"), ("schedule", "step_reuse", "timesteps"),
    ("schedule", "cfg_cutoff"), ("schedule", "cfg_cutoff", "timestep"), ("schedule", "calibration"),
])


def _sandbox() -> tuple[tempfile.TemporaryDirectory, Path, Path]:
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    folder = root / "fragments"
    manifest = save_fragment(synthetic("dog"), folder)
    return tmp, folder, manifest


def _outside(root: Path, folder: Path) -> set[Path]:
    return {p for p in root.rglob("*") if folder not in p.parents and p != folder}


def _set(obj: dict, path: tuple, value) -> None:
    """Put ``value`` at ``path``, making objects on the way; an index into a list picks (or makes) an item.
    A path an earlier edit made impossible (a name into a list) is skipped."""
    for key, nxt_key in zip(path[:-1], path[1:]):
        if isinstance(obj, list):
            if not isinstance(key, int):
                return
            if not obj:
                obj.append({})
            key = min(key, len(obj) - 1)
            nxt = obj[key]
        elif isinstance(obj, dict):
            nxt = obj.get(key)
        else:
            return
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not isinstance(nxt_key, int)):
            nxt = {}
            obj[key] = nxt
        obj = nxt
    last = path[-1]
    if isinstance(obj, list):
        if isinstance(last, int):
            obj[min(last, len(obj)):] = [value]
    elif isinstance(obj, dict):
        obj[last] = value


def _only_our_errors(folder: Path, manifest: Path) -> None:
    try:
        load_entry(folder, manifest)
    except FragmentError:
        pass
    outcome = load_or_fallback(folder, manifest)  # never raises: falls back (and may quarantine)
    assert outcome.fragment is not None or outcome.status.startswith("FALLBACK")


@FUZZ
@given(edits=st.lists(st.tuples(targets, any_values | evil_names), min_size=1, max_size=4), reseal=st.booleans())
def test_fuzzed_manifests_raise_only_fragment_errors(edits, reseal: bool) -> None:
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        root = Path(tmp.name)
        before = _outside(root, folder)
        manifest = json.loads(manifest_path.read_text())
        for path, value in edits:
            _set(manifest, path, value)
        if reseal:
            manifest = seal({k: v for k, v in manifest.items() if k != "integrity"})
        manifest_path.write_text(json.dumps(manifest))
        _only_our_errors(folder, manifest_path)
        assert _outside(root, folder) == before


@FUZZ
@given(data=st.data(), mode=st.sampled_from(["flip", "truncate", "header", "random"]))
def test_fuzzed_tensor_files_raise_only_fragment_errors(data, mode: str) -> None:
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        root = Path(tmp.name)
        before = _outside(root, folder)
        tensors = manifest_path.with_suffix(".safetensors")
        raw = bytearray(tensors.read_bytes())
        if mode == "flip":
            for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
                raw[i] ^= data.draw(st.integers(1, 255))
        elif mode == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        elif mode == "header":
            header = data.draw(json_values)
            text = json.dumps(header).encode()
            raw = bytearray(len(text).to_bytes(8, "little") + text + bytes(data.draw(st.binary(max_size=64))))
        else:
            raw = bytearray(data.draw(st.binary(max_size=256)))
        tensors.write_bytes(bytes(raw))
        manifest = json.loads(manifest_path.read_text())  # re-record the hash so parsing is reached
        manifest["artifacts"]["tensors"]["sha256"] = sha256_file(tensors, use_cache=False)
        manifest_path.write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "integrity"})))
        _only_our_errors(folder, manifest_path)
        assert _outside(root, folder) == before


@FUZZ
@given(edits=st.lists(st.tuples(targets, json_values | evil_names), max_size=3),
       inner=st.sampled_from(["keep", "flip", "random"]), outer_flip=st.booleans(), data=st.data())
def test_fuzzed_packs_never_write_outside_the_folder(edits, inner: str, outer_flip: bool, data) -> None:
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        root = Path(tmp.name)
        manifest = json.loads(manifest_path.read_text())
        raw = bytearray(manifest_path.with_suffix(".safetensors").read_bytes())
        if inner == "flip":
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0x5A
        elif inner == "random":
            raw = bytearray(data.draw(st.binary(min_size=1, max_size=128)))
        for path, value in edits:
            _set(manifest, path, value)
        if isinstance(manifest.get("artifacts"), dict) and isinstance(manifest["artifacts"].get("tensors"), dict):
            manifest["artifacts"]["tensors"]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
        sealed = seal({k: v for k, v in manifest.items() if k != "integrity"})
        pack_path = root / "in.fragment.safetensors"
        save_file({TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, str(pack_path),
                  metadata={"prompt_fragments.pack": "1", META_MANIFEST: json.dumps(sealed)})
        if outer_flip:
            b = bytearray(pack_path.read_bytes())
            b[data.draw(st.integers(0, len(b) - 1))] ^= 0xFF
            pack_path.write_bytes(bytes(b))
        before = _outside(root, folder)
        dest = folder / "incoming"
        for call in (lambda: read_pack(pack_path), lambda: unpack(pack_path, dest, overwrite=True)):
            try:
                call()
            except FragmentError:
                pass
        assert _outside(root, folder) == before
        if dest.exists():  # whatever landed is a whole, verifiable fragment with a plain name
            for p in dest.glob("*.json"):
                load_entry(dest, p)


# --- issue #16: every loader, JSON text the serializer cannot produce, library rows, schedules ------------------

raw_tokens = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400, "-" + "9" * 30,
                              "[" * 990 + "]" * 990, "[" * 200 + "]" * 200, '{"a":' * 300 + "1" + "}" * 300,
                              "[" * 5000 + "]" * 5000, '"\\ud800"', "1" * 5000])
raw_slots = st.sampled_from(['"profiling": {}', '"quality": {}', '"reuse": {}', '"schema_version": 1',
                             '"low_rank": []'])


def _inject(text: str, slot: str, token: str) -> str:
    key = slot.split(":")[0]
    return text.replace(slot, f"{key}: {token}", 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slot=raw_slots, token=raw_tokens, where=st.sampled_from(["manifest", "pack", "header", "row"]))
def test_raw_hostile_json_text_raises_only_fragment_errors_at_every_loader(slot: str, token: str, where: str) -> None:
    """Text json.dumps never writes (NaN, 1e999, 400-digit ints, a thousand levels) at each JSON boundary."""
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        root = Path(tmp.name)
        text = manifest_path.read_text()
        tensors = manifest_path.with_suffix(".safetensors").read_bytes()
        if where == "manifest":
            manifest_path.write_text(_inject(text, slot, token))
            _only_our_errors(folder, manifest_path)
            return
        if where == "header":
            header = '{"heads.down.0.attn1.kept": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}, "x": ' + token + "}"
            raw = len(header.encode()).to_bytes(8, "little") + header.encode() + bytes(8)
            manifest_path.with_suffix(".safetensors").write_bytes(raw)
            m = json.loads(text)
            m["artifacts"]["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
            manifest_path.write_text(json.dumps(seal({k: v for k, v in m.items() if k != "integrity"})))
            _only_our_errors(folder, manifest_path)
            return
        pack_path = root / "in.fragment.safetensors"
        meta = {"prompt_fragments.pack": "1", META_MANIFEST: text}
        if where == "pack":
            meta[META_MANIFEST] = _inject(text, slot, token)
        else:
            meta["prompt_fragments.library"] = '{"prompt": "p", "params": {"x": ' + token + '}, "embedding": [' + token + ', 1.0]}'
        save_file({TENSOR: torch.frombuffer(bytearray(tensors), dtype=torch.uint8)}, str(pack_path), metadata=meta)
        for call in (lambda: read_pack(pack_path), lambda: unpack(pack_path, folder / "incoming", overwrite=True)):
            try:
                call()
            except FragmentError as exc:
                assert str(exc).startswith(str(pack_path)), exc  # where: the pack's path first


library_rows = st.fixed_dictionaries({}, optional={
    "prompt": any_values | st.text(max_size=30), "params": any_values,
    "embedding": any_values | st.lists(hostile_leaves | st.floats(), min_size=1, max_size=6)})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=library_rows | any_values)
def test_fuzzed_library_rows_raise_only_fragment_errors(row) -> None:
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        root = Path(tmp.name)
        pack_path = root / "in.fragment.safetensors"
        tensors = manifest_path.with_suffix(".safetensors").read_bytes()
        meta = {"prompt_fragments.pack": "1", META_MANIFEST: manifest_path.read_text(),
                "prompt_fragments.library": json.dumps(row)}
        save_file({TENSOR: torch.frombuffer(bytearray(tensors), dtype=torch.uint8)}, str(pack_path), metadata=meta)
        dest = root / "dest"
        try:
            unpack(pack_path, dest)
        except FragmentError:
            return
        for p in dest.glob("*.json"):  # accepted: a whole fragment, and the row it indexed answers lookups
            load_entry(dest, p)


header_fields = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["I64", "F32", "U8", "F64"]) | any_values,
    "shape": st.lists(st.integers(-2, 4) | hostile_leaves, max_size=3) | any_values,
    "data_offsets": st.lists(st.integers(-1, 16) | hostile_leaves, min_size=2, max_size=2) | any_values})
headers = st.dictionaries(st.sampled_from(["heads.down.0.attn1.kept", "heads.down.0.attn2.kept", "x", "__metadata__"]),
                          header_fields | any_values, max_size=3)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=headers, data=st.binary(max_size=48))
def test_structured_safetensors_headers_raise_only_fragment_errors(header, data: bytes) -> None:
    """Header objects shaped like real ones with a wrong JSON type in each field (a list dtype raised TypeError)."""
    tmp, folder, manifest_path = _sandbox()
    with tmp:
        tensors = manifest_path.with_suffix(".safetensors")
        text = json.dumps(header).encode()
        raw = len(text).to_bytes(8, "little") + text + data
        tensors.write_bytes(raw)
        m = json.loads(manifest_path.read_text())
        m["artifacts"]["tensors"]["sha256"] = hashlib.sha256(raw).hexdigest()
        manifest_path.write_text(json.dumps(seal({k: v for k, v in m.items() if k != "integrity"})))
        _only_our_errors(folder, manifest_path)
