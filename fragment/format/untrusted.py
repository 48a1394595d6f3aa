"""Checks for files that may come from strangers: JSON schema, safetensors headers, sizes and paths.

A fragment shared on the internet is untrusted input.  Nothing in it is
used before it passes these checks (issue #6):

* the manifest against ``manifest_schema.json`` (types, bounds, name and
  file-name patterns, unique head indices) — called from
  ``manifest.validate_manifest``, so every reader gets it;
* a safetensors file's header, read by hand before ``safetensors`` touches
  the data: size caps, dtype allow-list, shapes, offsets that tile the data
  exactly (no overlap, no gap, nothing past the end).  safetensors never
  unpickles, and pickle formats are refused by name;
* every path a fragment names stays inside its folder: plain names only,
  no ``..``, no absolute paths, no symlink that resolves elsewhere;
* every JSON text (manifest, safetensors header, pack metadata, library
  row) is parsed by ``parse_json``: nesting depth is bounded before any
  recursive walk (hashing, schema), integers longer than
  ``MAX_INT_DIGITS`` digits, ``NaN``, ``Infinity`` and floats that overflow
  are refused (issue #16), so no ``RecursionError`` or ``OverflowError``
  can come out of a later step.  Parsing costs memory linear in the text
  with a small constant, and each string's length is capped (issue #29).

Each check raises a ``FragmentError`` subclass naming the file with
expected versus found.  This module imports no other part of the pack
except ``errors`` so ``manifest.py`` and ``store.py`` can both use it.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from ...errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError, ReadError, base_mismatch_remedy

SCHEMA_FILE = Path(__file__).with_name("manifest_schema.json")
MAX_HEADER_BYTES = 64 << 20  # safetensors' own limit is 100 MB; a fragment's header is kilobytes
MAX_TENSORS = 200_000
MAX_FILE_BYTES = 16 << 30  # a quantised SDXL fragment is a few GB at most
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# A manifest written by the pack is about 6 levels deep; 64 leaves room for open blocks and stays far
# below Python's recursion limit (json.dumps, jsonschema and the schedule parser all recurse).
MAX_JSON_DEPTH = 64
# 2**64 has 20 digits; nothing a fragment records needs more, and int -> float of 400 digits overflows.
MAX_INT_DIGITS = 24
# A manifest's strings are names, hashes, dtypes and prompts: kilobytes.  A megabyte is far above any of them
# and keeps one string from being most of a 16 MiB manifest.
MAX_JSON_STRING = 1 << 20
# The one container of whole documents: a pack's safetensors metadata holds the sealed manifest (at most
# MAX_MANIFEST_BYTES characters, as ``sharing.read_pack`` requires) and the library row as single strings.
MAX_MANIFEST_BYTES = 16 << 20
MAX_METADATA_STRING = MAX_MANIFEST_BYTES
# Each parsed value is a Python object of 24 to 64 bytes plus a pointer: millions of tiny containers or items
# made a 13 MB text peak near 26x its size.  A fragment's largest legal document (a safetensors header of
# MAX_TENSORS tensors: three containers each) stays far below these, and ``str.count`` checks them before
# anything is built.  Brackets and commas inside strings are counted too, which only errs towards refusing.
MAX_JSON_CONTAINERS = 1_000_000
MAX_JSON_ITEMS = 4_000_000


def json_depth(value: Any) -> int:
    """The deepest nesting of lists and objects in a parsed JSON value, walked level by level (no recursion).

    >>> json_depth({"a": [1, {"b": "[[["}]})
    3
    >>> json_depth("[[["), json_depth([])
    (0, 1)
    """
    return _measure(value)[0]


def _measure(value: Any, max_string: int | None = None) -> tuple[int, str | None]:
    """``(depth, first string longer than max_string or None)``; keys count as strings.

    Breadth first with one list per level: the memory is a pointer per container, never a frame.
    """
    level = [value] if isinstance(value, (list, dict)) else []
    if isinstance(value, str) and max_string is not None and len(value) > max_string:
        return 0, value
    depth = 0
    while level:
        depth += 1
        below: list[Any] = []
        for node in level:
            if isinstance(node, dict):
                if max_string is not None:
                    for key in node:
                        if len(key) > max_string:
                            return depth, key
                children = node.values()
            else:
                children = node
            for child in children:
                if isinstance(child, (list, dict)):
                    below.append(child)
                elif max_string is not None and isinstance(child, str) and len(child) > max_string:
                    return depth, child
        level = below
    return depth, None


def parse_json(text: str | bytes, source: str, error: type[FragmentError] = ManifestError,
               max_depth: int = MAX_JSON_DEPTH, what: str = "document", max_string: int = MAX_JSON_STRING) -> Any:
    """Parse untrusted JSON: bounded depth and string length, no NaN / Infinity, no huge numbers; ``error`` names ``source``.

    Memory is linear in the text: ``json.loads`` (C; it raises ``RecursionError`` on nesting past the
    interpreter's limit instead of overflowing the stack) parses first, then the value is measured without
    recursion.  Nothing recursive of ours sees the value before its depth is checked.

    >>> parse_json('{"a": [1, 2.5]}', "m.json")
    {'a': [1, 2.5]}
    >>> parse_json('[NaN]', "m.json")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.ManifestError: m.json: expected JSON numbers to be finite, found NaN
    >>> parse_json('["abcdef"]', "m.json", max_string=4)
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.ManifestError: m.json: expected JSON strings of at most 4 characters, found one of 6 characters starting 'abcdef'
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source}: expected UTF-8 JSON text, found undecodable bytes at offset {exc.start}") from None
    containers = text.count("[") + text.count("{")
    if containers > MAX_JSON_CONTAINERS:
        raise error(f"{source}: expected at most {MAX_JSON_CONTAINERS} JSON arrays and objects, "
                    f"found {containers} opening brackets")
    items = text.count(",")
    if items > MAX_JSON_ITEMS:
        raise error(f"{source}: expected at most {MAX_JSON_ITEMS} JSON items, found {items} commas")

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise error(f"{source}: expected integers of at most {MAX_INT_DIGITS} digits, found one of {len(digits.lstrip('-'))} digits")
        return int(digits)

    def parse_float(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise error(f"{source}: expected JSON numbers to be finite, found {literal[:40]} (overflows)")
        return value

    def parse_constant(name: str) -> float:
        raise error(f"{source}: expected JSON numbers to be finite, found {name}")

    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except ValueError as exc:  # JSONDecodeError; the hooks raise FragmentErrors, which are not ValueErrors
        raise error(f"{source}: not a readable JSON {what}: expected JSON, found unreadable text ({exc})") from None
    except RecursionError:  # the C scanner's guard: far deeper than max_depth, too deep to count
        raise error(f"{source}: expected JSON nested at most {max_depth} levels deep, "
                    "found deeper nesting than the JSON parser can read") from None
    depth, long_string = _measure(value, max_string)
    if long_string is not None:
        raise error(f"{source}: expected JSON strings of at most {max_string} characters, "
                    f"found one of {len(long_string)} characters starting {long_string[:40]!r}")
    if depth > max_depth:
        raise error(f"{source}: expected JSON nested at most {max_depth} levels deep, found {depth}")
    return value

# dtype name in a safetensors header -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FRAGMENT_DTYPES = frozenset({"F32", "F16", "BF16", "F8_E4M3", "I64", "I8", "U8"})  # U8: packed low-bit codes


@lru_cache(maxsize=1)
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError as exc:  # a dependency since issue #6; say how to fix it
        raise ManifestError("jsonschema is not installed: pip install -r requirements.txt") from exc
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema, format_checker=None)


def check_schema(manifest: Any, source: str = "manifest") -> None:
    """Validate a parsed manifest against the shipped JSON schema; raise ``ManifestError`` on the first problem.

    >>> check_schema({"schema_version": 1}, "x.json")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.ManifestError: x.json: schema: at (root): 'kind' is a required property
    """
    import jsonschema

    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(manifest))
    except RecursionError as exc:
        raise ManifestError(f"{source}: schema: expected a shallow JSON object, found nesting too deep to check") from exc
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ManifestError(f"{source}: schema: at {where}: {error.message[:300]}")


def read_safetensors_header(
    path: str | os.PathLike,
    *,
    allowed_dtypes: frozenset[str] = FRAGMENT_DTYPES,
    max_bytes: int = MAX_FILE_BYTES,
) -> dict[str, tuple[str, list[int]]]:
    """Parse and check a safetensors header without loading data; return ``name -> (dtype, shape)``.

    >>> import tempfile, torch; from safetensors.torch import save_file
    >>> p = Path(tempfile.mkdtemp()) / "t.safetensors"; save_file({"k": torch.zeros(2, dtype=torch.int64)}, str(p))
    >>> read_safetensors_header(p)
    {'k': ('I64', [2])}
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise IntegrityError(f"{path}: expected a .safetensors file, found a pickle-based format ({path.suffix}); refused")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            return _check_header(fh, size, str(path), allowed_dtypes, max_bytes)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{path}: cannot read safetensors file: {exc}") from exc
    except OSError as exc:  # EIO, EACCES: says nothing about the bytes, so not quarantined (auto_mode)
        raise ReadError(f"{path}: cannot read safetensors file right now: {exc}") from exc


def check_safetensors_bytes(data: bytes, source: str, *, allowed_dtypes: frozenset[str] = FRAGMENT_DTYPES,
                            max_bytes: int = MAX_FILE_BYTES) -> dict[str, tuple[str, list[int]]]:
    """``read_safetensors_header`` for a file held in memory (a packed fragment's inner file).

    >>> check_safetensors_bytes(b"\\x02\\x00\\x00\\x00\\x00\\x00\\x00\\x00{}", "inner")
    {}
    """
    return _check_header(io.BytesIO(data), len(data), source, allowed_dtypes, max_bytes)


def _check_header(fh: BinaryIO, size: int, path: str, allowed_dtypes: frozenset[str],
                  max_bytes: int) -> dict[str, tuple[str, list[int]]]:
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise IntegrityError(f"{path}: expected a safetensors file of at least 8 bytes, found {size}")
    (header_len,) = struct.unpack("<Q", prefix)
    if size > max_bytes:
        raise IntegrityError(f"{path}: expected at most {max_bytes} bytes, found {size}")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise IntegrityError(f"{path}: expected a header of at most {min(MAX_HEADER_BYTES, size - 8)} bytes, found {header_len}")
    raw = fh.read(header_len)
    header = parse_json(raw, path, IntegrityError, what="safetensors header", max_string=MAX_METADATA_STRING)
    del raw  # up to 64 MiB that the tensor checks below do not need
    if not isinstance(header, dict):
        raise IntegrityError(f"{path}: expected a JSON object header, found {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise IntegrityError(f"{path}: expected __metadata__ to map strings to strings")
    if len(header) > MAX_TENSORS:
        raise IntegrityError(f"{path}: expected at most {MAX_TENSORS} tensors, found {len(header)}")
    data_len = size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    out: dict[str, tuple[str, list[int]]] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise IntegrityError(f"{path}: tensor {name!r}: expected an object, found {type(info).__name__}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in allowed_dtypes:  # a list is unhashable: check the type first
            raise IntegrityError(f"{path}: tensor {name!r}: expected dtype in {sorted(allowed_dtypes)}, found {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
            raise IntegrityError(f"{path}: tensor {name!r}: expected a shape of at most 8 non-negative integers, found {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_len):
            raise IntegrityError(f"{path}: tensor {name!r}: expected data offsets within [0, {data_len}], found {offsets!r}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise IntegrityError(f"{path}: tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes, found {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = (dtype, list(shape))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            raise IntegrityError(f"{path}: tensor {name!r}: expected data at byte {position}, found {start} (overlap or gap)")
        position = end
    if position != data_len:
        raise IntegrityError(f"{path}: expected {data_len} data bytes to be used by tensors, found {position}")
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 48)


def check_plain_name(name: Any, source: str, suffix: str | None = None) -> str:
    """A file name that cannot leave its folder: no separators, no ``..``, not absolute, optional suffix.

    >>> check_plain_name("dog.safetensors", "m.json", ".safetensors")
    'dog.safetensors'
    >>> check_plain_name("../x.json", "pack")
    Traceback (most recent call last):
    ...
    prompt_fragments.errors.IntegrityError: pack: expected a plain file name inside the fragments folder, found '../x.json'
    """
    ok = (isinstance(name, str) and 0 < len(name) <= 255 and "/" not in name and "\\" not in name and "\x00" not in name
          and name not in (".", "..") and ".." not in name and not os.path.isabs(name) and not name.startswith("."))
    if not ok:
        raise IntegrityError(f"{source}: expected a plain file name inside the fragments folder, found {name!r}")
    if suffix is not None and not name.endswith(suffix):
        raise IntegrityError(f"{source}: expected a {suffix} file name, found {name!r}")
    return name


def confined(folder: str | os.PathLike, name: str, source: str) -> Path:
    """``folder / name`` after checking it stays in ``folder`` (a symlink resolving elsewhere is refused).

    >>> import tempfile; d = tempfile.mkdtemp(); confined(d, "a.json", "x").name
    'a.json'
    """
    check_plain_name(name, source)
    root = Path(folder).resolve()
    path = Path(folder) / name
    resolved = path.resolve()
    if resolved.parent != root:
        raise IntegrityError(f"{path}: expected a file inside {root}, found it resolves to {resolved}")
    return path


def check_inside(folder: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` itself, after checking it resolves to a direct child of ``folder``.

    >>> import tempfile; d = tempfile.mkdtemp(); check_inside(d, Path(d) / "a.json").name
    'a.json'
    """
    path = Path(path)
    if path.parent.resolve() != Path(folder).resolve():
        raise IntegrityError(f"{path}: expected a file directly inside the fragments folder {Path(folder).resolve()}, found it elsewhere")
    return confined(folder, path.name, str(path))


def check_base(manifest: Mapping[str, Any], base_sha256: str | None, source: str) -> None:
    """Refuse a fragment made from another base model (no-op when ``base_sha256`` is None).

    >>> check_base({"base_model": {"sha256": "ab"}}, "ab", "x.json")
    """
    if base_sha256 is None:
        return
    block = manifest.get("base_model", {})
    expected = str(block.get("sha256"))
    if expected != base_sha256:
        raise BaseModelMismatchError(
            f"{source}: fragment built for base model sha256 {expected[:16]}…, found sha256 {base_sha256[:16]}…; "
            f"{base_mismatch_remedy(block)}"
        )
