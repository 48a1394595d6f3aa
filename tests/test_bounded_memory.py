"""Issue #29, item 1: untrusted JSON costs memory linear in its size, with a small constant.

Before the fix the depth pre-check skipped strings with a regex that kept about
120 bytes of backtracking state per character: a pack whose header held a 63 MB
metadata string was accepted after 37 s at 8.6 GB RSS, and a legal 15 MB
manifest cost 2.6 GB on every load.  Peak memory is measured with
``tracemalloc`` (every Python allocation, the regex engine's stack included)
around one call, and bounded by a small multiple of the input's size.
"""
from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from prompt_fragments.errors import FragmentError, IntegrityError, ManifestError
from prompt_fragments.fragment.format.manifest import seal
from prompt_fragments.fragment.format.store import MAX_MANIFEST_BYTES, load_fragment, save_fragment
from prompt_fragments.fragment.format.untrusted import (
    MAX_JSON_CONTAINERS, MAX_JSON_ITEMS, MAX_JSON_STRING, MAX_METADATA_STRING, json_depth, parse_json,
    read_safetensors_header
)
from prompt_fragments.fragment.library.sharing import META_LIBRARY, META_MANIFEST, TENSOR, pack, read_pack

from test_library import synthetic

MB = 1 << 20


def _peak(call: Callable[[], Any]) -> tuple[Any, int]:
    """``call()``'s result (or the FragmentError it raised) and the peak bytes traced while it ran."""
    gc.collect()
    tracemalloc.start()
    try:
        try:
            result: Any = call()
        except FragmentError as exc:
            result = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def _with_profiling(folder: Path, name: str, profiling: dict[str, Any]) -> Path:
    """A saved fragment whose manifest's free-form ``profiling`` block is replaced and re-sealed."""
    path = save_fragment(synthetic(name), folder)
    body = {k: v for k, v in json.loads(path.read_text()).items() if k != "integrity"}
    path.write_text(json.dumps(seal({**body, "profiling": profiling}), indent=1))
    return path


@pytest.mark.parametrize("key", ["x", META_MANIFEST])
def test_a_50_mb_string_in_a_pack_header_is_refused_in_memory_linear_in_its_size(tmp_path: Path, key: str) -> None:
    good = pack(save_fragment(synthetic("dog"), tmp_path / "src"), tmp_path / "good.fragment.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        meta, tensor = dict(fh.metadata()), fh.get_tensor(TENSOR)
    bad = tmp_path / "bad.fragment.safetensors"
    save_file({TENSOR: tensor}, str(bad), metadata={**meta, key: "a" * (50 * MB)})
    size = bad.stat().st_size
    del meta, tensor
    result, peak = _peak(lambda: read_pack(bad))
    # The file's bytes, their text and the parsed string: 3x.  e89ab0b: about 120x (6.1 GB more RSS, 23 s).
    assert peak <= 4 * size, f"peak {peak / MB:.0f} MiB for a {size / MB:.0f} MiB pack"
    assert isinstance(result, IntegrityError), result
    assert str(result).startswith(f"{bad}: expected JSON strings of at most {MAX_METADATA_STRING} characters, "
                                  f"found one of {50 * MB} characters")


def test_a_manifest_that_is_one_15_mb_string_is_refused_in_memory_linear_in_its_size(tmp_path: Path) -> None:
    path = _with_profiling(tmp_path, "long", {"prompt": "a" * (15 * MB)})
    size = path.stat().st_size
    result, peak = _peak(lambda: load_fragment(path))
    assert peak <= 4 * size, f"peak {peak / MB:.0f} MiB for a {size / MB:.0f} MiB manifest"  # e89ab0b: accepted, ~120x
    assert isinstance(result, ManifestError), result
    assert str(result).startswith(f"{path}: expected JSON strings of at most {MAX_JSON_STRING} characters, "
                                  f"found one of {15 * MB} characters starting 'aaaa")


def _legal_15_mb_profiling() -> dict[str, Any]:
    # Strings at the cap (the regex's worst case) and many ordinary small values (the parser's objects).
    return {"notes": ["n" * MAX_JSON_STRING] * 12,
            "samples": [f"a photo of a dog, sample {i}" for i in range(20_000)],
            "scores": [i / 7 for i in range(20_000)]}


def test_a_legal_15_mb_manifest_loads_and_packs_in_memory_linear_in_its_size(tmp_path: Path) -> None:
    path = _with_profiling(tmp_path, "big", _legal_15_mb_profiling())
    size = path.stat().st_size
    assert 13 * MB < size <= MAX_MANIFEST_BYTES
    fragment, peak = _peak(lambda: load_fragment(path))
    assert not isinstance(fragment, FragmentError), fragment
    assert fragment.manifest["profiling"]["notes"][0] == "n" * MAX_JSON_STRING
    # Bytes, text, parsed value, canonical JSON and its bytes for the self-hash: about 4.5x.  e89ab0b: ~11x.
    assert peak <= 6 * size, f"load: peak {peak / MB:.0f} MiB for a {size / MB:.0f} MiB manifest"

    # The pack carries the whole manifest as one metadata string, longer than any string a manifest may hold.
    packed = pack(path, tmp_path / "big.fragment.safetensors")
    with safe_open(str(packed), framework="pt") as fh:
        assert MAX_JSON_STRING < len(fh.metadata()[META_MANIFEST]) <= MAX_METADATA_STRING
    content, peak = _peak(lambda: read_pack(packed))
    assert not isinstance(content, FragmentError), content
    assert content.fragment.manifest == fragment.manifest
    assert peak <= 6 * packed.stat().st_size, f"read_pack: peak {peak / MB:.0f} MiB"


def test_the_string_cap_counts_keys_and_values_and_admits_the_cap_itself() -> None:
    assert parse_json(json.dumps({"k" * 8: ["v" * 8]}), "src", max_string=8) == {"k" * 8: ["v" * 8]}
    for text in (json.dumps({"k" * 9: 1}), json.dumps([["v" * 9]]), json.dumps("v" * 9)):
        with pytest.raises(ManifestError, match=r"^src: expected JSON strings of at most 8 characters, found one of 9"):
            parse_json(text, "src", max_string=8)
    # Escapes count as the characters they stand for: twelve characters of text, two of string.
    assert parse_json(r'["\u00e9\""]', "src", max_string=2) == ['é"']


def test_nesting_past_the_parser_limit_is_our_error_and_the_depth_is_counted_without_recursion() -> None:
    with pytest.raises(ManifestError, match=r"^src: expected JSON nested at most 64 levels deep, found deeper"):
        parse_json("[" * 200_000 + "]" * 200_000, "src")
    deep: Any = []
    for _ in range(100_000):  # far past the recursion limit: a recursive walk would raise
        deep = [deep]
    assert json_depth(deep) == 100_001
    with pytest.raises(IntegrityError, match=r"^h: expected JSON nested at most 3 levels deep, found 4"):
        parse_json('[[[["x"]]]]', "h", IntegrityError, max_depth=3)


def test_a_safetensors_header_keeps_its_string_cap_for_files_other_than_packs(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "t.safetensors"
    save_file({"k": torch.zeros(2)}, str(path), metadata={"note": "a" * (MAX_METADATA_STRING + 1)})
    with pytest.raises(IntegrityError, match=rf"^{path}: expected JSON strings of at most {MAX_METADATA_STRING}"):
        read_safetensors_header(path, allowed_dtypes=frozenset({"F32"}))


def _reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_reference_depth(v) for v in value), default=0)
    return 0


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=8)
                     | st.floats(allow_nan=False, allow_infinity=False),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                     max_leaves=30)


@settings(max_examples=30, deadline=None)
@given(_json)
def test_parse_json_reads_what_json_reads_and_measures_depth_like_a_recursive_walk(value: Any) -> None:
    text = json.dumps(value)
    assert parse_json(text, "src") == json.loads(text)
    assert json_depth(json.loads(text)) == _reference_depth(value)
    assert parse_json(text.encode(), "src", max_depth=_reference_depth(value)) == json.loads(text)


@pytest.mark.parametrize("unit, count", [("[[]],", MAX_JSON_CONTAINERS // 2 + 1), ('{"a":0},', MAX_JSON_CONTAINERS + 1),
                                         ('"ab",', MAX_JSON_ITEMS + 1), ("1.5,", MAX_JSON_ITEMS + 1)])
def test_millions_of_tiny_values_are_refused_before_they_are_built(unit: str, count: int) -> None:
    """Linear was not enough: each tiny container or item is a Python object of 24-64 bytes, so a header of
    ``[[]],`` repeated peaked near 34 bytes per character (2 GB for a 64 MiB header).  Counted first now."""
    text = "[" + unit * count + "0]"
    result, peak = _peak(lambda: parse_json(text, "big.json"))
    assert isinstance(result, ManifestError) and "big.json: expected at most" in str(result)
    assert peak <= 2 * len(text) + MB, f"{peak / MB:.0f} MiB traced for {len(text) / MB:.0f} MiB of text"


def test_a_document_just_under_the_counts_still_parses() -> None:
    text = "[" + "[]," * (MAX_JSON_CONTAINERS - 2) + "0]"
    assert len(parse_json(text, "ok.json")) == MAX_JSON_CONTAINERS - 1
