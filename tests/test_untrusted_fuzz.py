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

from prompt_fragments.fragment.auto_mode import load_or_fallback
from prompt_fragments.fragment.errors import FragmentError
from prompt_fragments.fragment.hashing import sha256_file
from prompt_fragments.fragment.library import load_entry
from prompt_fragments.fragment.manifest import seal
from prompt_fragments.fragment.sharing import META_MANIFEST, TENSOR, read_pack, unpack
from prompt_fragments.fragment.store import save_fragment

from test_library import synthetic

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
evil_names = st.sampled_from(["../x", "/etc/passwd", "a/b", "..", ".hidden", "x.ckpt", "dog\x00.json", "ok", "ok.safetensors"])
# Where to put a fuzzed value: paths into the manifest the loader acts on.
targets = st.sampled_from([
    ("name",), ("kind",), ("schema_version",), ("base_model",), ("base_model", "sha256"), ("pruning",),
    ("pruning", "modules"), ("pruning", "modules", "down.0.attn1"), ("pruning", "modules", "down.0.attn1", "kept"),
    ("pruning", "modules", "down.0.attn1", "heads"), ("pruning", "modules", "down.0.attn1", "dim_head"),
    ("pruning", "modules", "../../x"), ("compression",), ("compression", "low_rank"), ("compression", "kv_fold"),
    ("compression", "ff_channels"), ("compression", "quantization"), ("artifacts",), ("artifacts", "tensors"),
    ("artifacts", "tensors", "file"), ("artifacts", "tensors", "sha256"), ("reuse",), ("reuse", "h3"),
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
    for key in path[:-1]:
        nxt = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(nxt, dict):
            nxt = {}
            obj[key] = nxt
        obj = nxt
    obj[path[-1]] = value


def _only_our_errors(folder: Path, manifest: Path) -> None:
    try:
        load_entry(folder, manifest)
    except FragmentError:
        pass
    outcome = load_or_fallback(folder, manifest)  # never raises: falls back (and may quarantine)
    assert outcome.fragment is not None or outcome.status.startswith("FALLBACK")


@FUZZ
@given(edits=st.lists(st.tuples(targets, json_values | evil_names), min_size=1, max_size=4), reseal=st.booleans())
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
