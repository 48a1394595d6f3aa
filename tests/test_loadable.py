"""Issue #29 items 3 and 4: one check decides "loadable", ``verify`` runs it, and only FragmentErrors leave a loader.

The fragment here is a real one of the `demo` base (the committed reference model): heads pruned in one
attention module, some layers in low bits (one with a channel scale), some in fp8, and a run-time schedule
with per-bucket head sets and step reuse.  Each hostile variant is written as a pack by hand (the writer
refuses them now) and then checked three ways: ``verify --base demo`` (it said "compatible" before the
fix), the loader (``read_pack`` / ``load_fragment`` / ``fragment_replacements``) and ``load_or_fallback``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save as save_bytes, save_file

pytest.importorskip("diffusers")

from prompt_fragments.cli import main
from prompt_fragments.errors import BaseModelMismatchError, FragmentError, IntegrityError, ManifestError, ReadError
from prompt_fragments.fragment.build import (
    build_fragment, check_loadable, describe_base, fragment_replacements,
)
from prompt_fragments.fragment.format.manifest import Fragment, seal, validate_manifest
from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.fragment.library.auto_mode import load_or_fallback
from prompt_fragments.fragment.library.sharing import META_MANIFEST, META_PACK, TENSOR, check_against_base, read_pack
from prompt_fragments.fragment.schedule.apply import apply_schedule, with_schedule
from prompt_fragments.fragment.schedule.state import Schedule
from prompt_fragments.fragment.surgery.heads import HeadLever
from prompt_fragments.fragment.surgery.low_bit import LowBitLever, low_bit_keys
from prompt_fragments.fragment.surgery.precision import PrecisionLever, quant_keys
from prompt_fragments.fragment.surgery.selection import Selection
from prompt_fragments.profiling.discovery import find_attention
from prompt_fragments.reference.model import load_reference, predict

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.function_scoped_fixture])


# ---- the fragment and its hostile variants --------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    """``(model, fragment, pruned attention path, an unpruned one, a low-bit layer with a channel scale, an fp8 layer)``."""
    model = load_reference()
    unet = model.unet
    sites = find_attention(unet)
    pruned, unpruned = sites[0], sites[1]
    kept = {s.path: list(range(s.heads)) for s in sites}
    kept[pruned.path] = list(range(pruned.heads // 2))
    selection = Selection(kept=kept, heads={s.path: s.heads for s in sites})
    frag = build_fragment(unet, [HeadLever(selection), LowBitLever(ratio=0.2, group=16), PrecisionLever("fp8", ratio=0.3)],
                          base=describe_base(unet, "demo"), name="hostile")
    low_bit = frag.manifest["compression"]["low_bit"]["layers"]
    fp8 = sorted(frag.manifest["compression"]["precision"]["layers"])[0]
    # One low-bit layer gets a channel scale of ones (the same weights): the field a hostile file sets to 1e-45.
    scaled = next(p for p, e in sorted(low_bit.items()) if e["kind"] == "linear")
    low_bit[scaled]["channel_scale"] = True
    tensors = dict(frag.tensors)
    tensors[low_bit_keys(scaled)[3]] = torch.ones(low_bit[scaled]["shape"][1])
    schedule = Schedule(buckets=2, bucket_heads={0: {pruned.path: kept[pruned.path][:1]}, 1: {unpruned.path: [0, 1]}},
                        total_steps=6, reuse_steps=(2, 4), shallow=1)
    frag = with_schedule(Fragment(frag.manifest, tensors), schedule)
    return model, frag, pruned.path, unpruned.path, scaled, fp8


def _body(manifest: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy({k: v for k, v in manifest.items() if k not in ("integrity", "artifacts")})


def _sealed(manifest: dict[str, Any], raw: bytes) -> dict[str, Any]:
    artifacts = {"tensors": {"file": f"{manifest['name']}.safetensors", "sha256": hashlib.sha256(raw).hexdigest(),
                             "bytes": len(raw)}}
    return seal({**manifest, "artifacts": artifacts})


def _variant(frag: Fragment, edit: Callable[[dict], Any] | None = None,
             tensors: Callable[[dict], Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], bytes]:
    """The fragment's manifest and tensors after ``edit`` / ``tensors`` (in place), re-sealed over the new bytes."""
    manifest, t = _body(frag.manifest), {k: v.clone() for k, v in frag.tensors.items()}
    if edit is not None:
        edit(manifest)
    if tensors is not None:
        tensors(t)
    raw = save_bytes({k: v.contiguous() for k, v in t.items()})
    return _sealed(manifest, raw), t, raw


def _write_pack(path: Path, manifest: dict[str, Any], raw: bytes) -> Path:
    save_file({TENSOR: torch.frombuffer(bytearray(raw), dtype=torch.uint8)}, str(path),
              metadata={META_PACK: "1", META_MANIFEST: json.dumps(manifest)})
    return path


def _write_entry(folder: Path, manifest: dict[str, Any], raw: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest["artifacts"]["tensors"]["file"]).write_bytes(raw)
    path = folder / f"{manifest['name']}.json"
    path.write_text(json.dumps(manifest))
    return path


def _probe(model, timesteps: tuple[int, ...] = (999, 600, 200)) -> Callable:
    """What ``verify --base demo`` runs: calls across the noise range, so bucket masks switch and a step replays."""
    context = model.encode([""])

    def probe(small, state):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        outs = []
        for t in timesteps:
            state.begin_call(float(t), tuple(x.shape))
            outs.append(predict(small, x, t, context))
        state.reset()
        return outs

    return probe


def _set_schedule(*keys: str, value: Any) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        block = m["schedule"]
        for k in keys[:-1]:
            if not isinstance(block.get(k), dict):  # an earlier edit put a non-object here: make the way again
                block[k] = {}
            block = block[k]
        block[keys[-1]] = value
    return edit


def test_the_demo_fragment_is_loadable_and_verifies_with_a_finite_forward(demo, tmp_path: Path, capsys) -> None:
    model, frag, *_ = demo
    manifest, tensors, raw = _variant(frag)
    assert check_loadable(manifest, tensors, "x", base=model.unet).reuse_steps == (2, 4)
    pack = _write_pack(tmp_path / "good.fragment.safetensors", manifest, raw)
    assert "forward finite" in check_against_base(read_pack(pack).fragment, model.unet, label="demo", probe=_probe(model))
    assert main(["verify", str(pack), "--base", "demo"]) == 0
    assert "forward finite" in capsys.readouterr().out


def test_applying_a_read_fragment_scans_its_values_once_and_a_hand_made_one_always(demo, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """The value scan (seconds for an fp8 SD1.5 fragment) runs when a file is read, not again on apply; a
    Fragment made in memory (``values_checked`` False) is still scanned when it is applied."""
    import prompt_fragments.fragment.build as build

    model, frag, *_ = demo
    manifest, tensors, raw = _variant(frag)
    scans: list[str] = []
    real = build.check_lever_tensors
    monkeypatch.setattr(build, "check_lever_tensors", lambda m, t, s: (scans.append(s), real(m, t, s))[1])
    loaded = load_fragment(_write_entry(tmp_path / "lib", manifest, raw))
    assert loaded.values_checked and len(scans) == 1
    fragment_replacements(model.unet, loaded)
    assert len(scans) == 1
    hostile = dict(tensors)
    key = next(k for k, v in hostile.items() if v.is_floating_point() and v.dtype.itemsize >= 2 and v.numel())
    hostile[key] = hostile[key].clone()
    hostile[key].view(-1)[0] = math.nan
    with pytest.raises(IntegrityError, match="expected finite"):
        fragment_replacements(model.unet, Fragment(manifest, hostile))
    assert len(scans) == 2


# ---- item 3: verify --base says "compatible" only for what the loader loads ---------------------------------------

# Each of these was "compatible" under `verify --base demo` on e89ab0b.  ``static``: refused by every read (no base
# needed); otherwise refused against the base model, as a base mismatch (the loader falls back).
HOSTILE = {
    "skips_999": (lambda d: _set_schedule("step_reuse", "skips", value=999), None, True),
    "skips_1e20": (lambda d: _set_schedule("step_reuse", "skips", value=1e20), None, True),
    "shallow_99": (lambda d: _set_schedule("step_reuse", "shallow", value=99), None, True),
    "shallow_beyond_layout": (lambda d: _set_schedule("step_reuse", "shallow", value=3), None, False),
    "skips_beyond_layout": (lambda d: _set_schedule("step_reuse", "skips", value=30), None, False),
    "bucket_head_999_unpruned": (lambda d: _set_schedule("timestep_heads", "kept", "1", d[3], value=[0, 999]), None, False),
    "buckets_1e9": (lambda d: _set_schedule("timestep_heads", "buckets", value=10 ** 9), None, True),
    "fp8_scale_nan": (None, lambda d: (lambda t: t[quant_keys(d[5])[1]].view(-1).__setitem__(0, math.nan)), True),
    "fp8_scale_inf": (None, lambda d: (lambda t: t[quant_keys(d[5])[1]].view(-1).__setitem__(0, math.inf)), True),
    "fp8_byte_0x7f": (None, lambda d: (lambda t: t[quant_keys(d[5])[0]].view(torch.uint8).view(-1).__setitem__(0, 0x7F)), True),
    "low_bit_channel_scale_1e-45": (None, lambda d: (lambda t: t[low_bit_keys(d[4])[3]].__setitem__(0, 1e-45)), True),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_verify_refuses_what_the_loader_refuses(demo, tmp_path: Path, case: str) -> None:
    model, frag, *_ = demo
    edit, tamper, static = HOSTILE[case]
    manifest, tensors, raw = _variant(frag, edit and edit(demo), tamper and tamper(demo))
    pack = _write_pack(tmp_path / f"{case}.fragment.safetensors", manifest, raw)
    if static:
        with pytest.raises((ManifestError, IntegrityError), match=r"hostile\.fragment\.safetensors|\[manifest\]|\[tensors\]"):
            read_pack(pack)
        with pytest.raises((ManifestError, IntegrityError)):
            load_fragment(_write_entry(tmp_path / "lib", manifest, raw))
        outcome = load_or_fallback(tmp_path / "lib", tmp_path / "lib" / "hostile.json")
        assert outcome.fragment is None and outcome.quarantined
    else:
        fragment = read_pack(pack).fragment  # fine without a base: the misfit is with this model
        with pytest.raises(BaseModelMismatchError, match=r"schedule"):
            check_against_base(fragment, model.unet, label="demo")
        with pytest.raises(BaseModelMismatchError, match=r"schedule"):
            fragment_replacements(model.unet, fragment)  # what every loader builds with
    assert main(["verify", str(pack), "--base", "demo"]) == 2


def test_buckets_1e9_is_refused_before_anything_is_allocated(demo) -> None:
    _, frag, *_ = demo
    manifest, tensors, _ = _variant(frag, _set_schedule("timestep_heads", "buckets", value=10 ** 9))
    with pytest.raises(ManifestError, match=r"x\.json: schedule\.timestep_heads\.buckets: expected an integer <= 64, found 1000000000$"):
        check_loadable(manifest, tensors, "x.json")


def test_the_forward_probe_refuses_non_finite_outputs(demo) -> None:
    # The static checks catch every known way to a NaN; the probe is the net under them.
    model, frag, *_ = demo
    with pytest.raises(IntegrityError, match="non-finite outputs"):
        check_against_base(frag, model.unet, label="demo", probe=lambda small, state: [torch.tensor([1.0, math.nan])])


def test_a_layer_in_two_formats_is_refused_not_built_as_a_hybrid(demo, tmp_path: Path) -> None:
    model, frag, pruned, _, scaled, fp8 = demo
    low_bit_layer = next(p for p, e in frag.manifest["compression"]["low_bit"]["layers"].items()
                         if e["kind"] == "linear" and not p.startswith(pruned + "."))
    lin = model.unet.get_submodule(low_bit_layer)

    def both(m: dict) -> None:
        m["compression"]["precision"]["layers"][low_bit_layer] = {"dtype": "float8_e4m3fn"}

    def tensors(t: dict) -> None:
        t[quant_keys(low_bit_layer)[0]] = torch.zeros(lin.out_features, lin.in_features).to(torch.float8_e4m3fn)
        t[quant_keys(low_bit_layer)[1]] = torch.ones(lin.out_features, 1)

    manifest, t, raw = _variant(frag, both, tensors)
    with pytest.raises(ManifestError, match=rf"layer '{low_bit_layer}' is stored as low_bit and as precision"):
        load_fragment(_write_entry(tmp_path, manifest, raw))
    # and the lever itself never builds the hybrid (an fp8 Parameter and a uint8 buffer, both named weight)
    replacements: dict = {}
    HeadLever.apply(model.unet, manifest["pruning"], t, replacements)
    LowBitLever.apply(model.unet, manifest["compression"]["low_bit"], t, replacements)
    with pytest.raises(IntegrityError, match="two formats"):
        PrecisionLever.apply(model.unet, {"layers": {low_bit_layer: {}}}, t, replacements)


# ---- item 4: only FragmentErrors leave a loader ------------------------------------------------------------------

@pytest.mark.parametrize(("kept", "found"), [
    ({"0": "ab"}, "expected an object module -> \\[heads\\]"),   # was ValueError, re-raised by load_or_fallback
    ({"0": [["down_blocks.0.attentions.0.transformer_blocks.0.attn1", [0]]]}, "expected an object module"),  # pairs
    ({"0": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": "0"}}, "expected a list of head indices"),
    ({"0": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": [0.0]}}, "expected an integer"),
    ({"0": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1": ["0"]}}, "expected an integer"),
    ({"x": {}}, "kept key"),
])
def test_schedule_head_sets_are_type_checked_never_coerced(demo, tmp_path: Path, kept, found) -> None:
    _, frag, *_ = demo
    manifest, _, raw = _variant(frag, _set_schedule("timestep_heads", "kept", value=kept))
    path = _write_entry(tmp_path, manifest, raw)
    with pytest.raises(ManifestError, match=found):
        load_fragment(path)
    outcome = load_or_fallback(tmp_path, path)
    assert outcome.fragment is None and outcome.quarantined and "unusable" in outcome.status


@pytest.mark.parametrize(("keys", "value"), [
    (("step_reuse", "reuse_steps"), "24"),          # a string is not a list of steps
    (("step_reuse", "total_steps"), 6.0),
    (("step_reuse", "shallow"), True),
    (("step_reuse", "timesteps"), [True] * 6),
    (("cfg_cutoff", "timestep"), True),
    (("calibration",), "ab"),                       # dict("ab") raised ValueError
    (("calibration",), [["a", 1]]),                 # a pair list was coerced into an object
    (("step_reuse",), [1, 2]),
])
def test_every_schedule_field_is_type_checked(demo, keys, value) -> None:
    _, frag, *_ = demo
    manifest, tensors, _ = _variant(frag, _set_schedule(*keys, value=value))
    with pytest.raises(ManifestError, match=r"x\.json: schedule"):
        check_loadable(manifest, tensors, "x.json")


def test_a_lever_path_under_a_pruned_module_that_lacks_it_is_a_base_mismatch(demo) -> None:
    model, frag, pruned, *_ = demo
    lin = model.unet.get_submodule(f"{pruned}.to_k")
    layer = f"{pruned}.no_such_child"

    def edit(m: dict) -> None:
        m["compression"]["precision"]["layers"][layer] = {"dtype": "float8_e4m3fn"}

    def tensors(t: dict) -> None:
        t[quant_keys(layer)[0]] = torch.zeros(lin.out_features, lin.in_features).to(torch.float8_e4m3fn)
        t[quant_keys(layer)[1]] = torch.ones(1, 1)

    manifest, t, _ = _variant(frag, edit, tensors)
    with pytest.raises(BaseModelMismatchError, match=rf"{layer}: no such module"):  # was AttributeError
        fragment_replacements(model.unet, Fragment(manifest, t))


def test_a_quantized_weight_of_the_wrong_shape_is_a_base_mismatch(demo) -> None:
    model, frag, _, _, _, fp8 = demo
    wk, sk = quant_keys(fp8)

    def tensors(t: dict) -> None:  # consistent with itself (weight and scale agree), not with the model
        rows, cols = t[wk].shape
        t[wk] = torch.zeros(rows, cols + 1).to(torch.float8_e4m3fn)

    manifest, t, _ = _variant(frag, tensors=tensors)
    check_loadable(manifest, t, "x")
    with pytest.raises(BaseModelMismatchError, match=rf"{fp8}: .*expected the model's"):  # was PruningError
        fragment_replacements(model.unet, Fragment(manifest, t))


def test_a_low_bit_record_without_layers_is_a_fragment_error(demo, tmp_path: Path) -> None:
    _, frag, *_ = demo
    manifest, t, raw = _variant(frag, lambda m: m["compression"]["low_bit"].pop("layers"))
    with pytest.raises(ManifestError, match="compression.low_bit"):
        load_fragment(_write_entry(tmp_path, manifest, raw))
    with pytest.raises(IntegrityError, match="compression.low_bit.layers"):  # the lever's own check: was KeyError
        LowBitLever.check(manifest["compression"]["low_bit"], t, "x")


def test_a_read_error_still_falls_back_without_quarantine(demo, tmp_path: Path, monkeypatch) -> None:
    _, frag, *_ = demo
    manifest, _, raw = _variant(frag)
    path = _write_entry(tmp_path, manifest, raw)
    from prompt_fragments.fragment.library import index

    def unreadable(*args, **kwargs):
        raise ReadError(f"{path}: cannot read manifest (right now): EIO")

    monkeypatch.setattr(index, "read_manifest", unreadable)
    outcome = load_or_fallback(tmp_path, path)
    assert outcome.fragment is None and not outcome.quarantined and path.exists()


# ---- fuzz: the schedule block and the low-bit and precision records ---------------------------------------------

values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from([10 ** 9, 10 ** 20, 999, 1023, 1024]),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e3, max_value=1e21), st.text(max_size=4),
    st.lists(st.integers(-1, 10), max_size=6), st.dictionaries(st.sampled_from(["0", "1", "2", "x"]),
                                                               st.lists(st.integers(-1, 9), max_size=4), max_size=3),
)
schedule_fields = st.sampled_from([
    ("timestep_heads", "buckets"), ("timestep_heads", "kept"), ("timestep_heads", "kept", "0"),
    ("timestep_heads", "kept", "1"), ("step_reuse", "total_steps"), ("step_reuse", "reuse_steps"),
    ("step_reuse", "shallow"), ("step_reuse", "skips"), ("step_reuse", "timesteps"), ("cfg_cutoff", "timestep"),
    ("calibration",), ("timestep_heads",), ("step_reuse",),
])


def _accepted_loads_and_runs(demo, manifest: dict[str, Any], tensors: dict[str, torch.Tensor],
                             timesteps: tuple[int, ...] = (999, 600, 200)) -> None:
    """Refused: only FragmentErrors.  Accepted statically: the loader builds it or says it does not fit this
    base; accepted against the base: it applies and a forward through its schedule is finite."""
    model = demo[0]
    try:
        validate_manifest(_sealed(_body(manifest), b""), "fuzz")  # what every read does first
        check_loadable(manifest, tensors, "fuzz")
    except FragmentError:
        return
    fragment = Fragment(manifest, tensors)
    try:
        check_loadable(manifest, tensors, "fuzz", base=model.unet)
    except BaseModelMismatchError:
        with pytest.raises(FragmentError):
            apply_schedule(model.unet, fragment)
        return
    small, state = apply_schedule(model.unet, fragment)
    with torch.no_grad():
        outs = _probe(model, timesteps)(small, state)
    assert all(bool(torch.isfinite(o).all()) for o in outs)


@FUZZ
@given(edits=st.lists(st.tuples(schedule_fields, values), min_size=1, max_size=3))
def test_fuzzed_schedules_are_refused_with_fragment_errors_or_load_and_run(demo, edits) -> None:
    _, frag, *_ = demo
    manifest = copy.deepcopy(dict(frag.manifest))
    for keys, value in edits:
        _set_schedule(*keys, value=value)(manifest)
    _accepted_loads_and_runs(demo, manifest, dict(frag.tensors))


scale_values = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 1e-13, 1e-12, 1e-3, 0.5, 2.0,
                                100.0, 146.0, 147.0, 600.0, 1e30])


@FUZZ
@given(which=st.sampled_from(["fp8_scale", "fp8_byte", "lb_scale", "lb_zero", "lb_channel", "lb_bits", "lb_group",
                              "lb_shape", "lb_flag", "q_dtype", "q_drop_layers"]),
       value=scale_values, byte=st.integers(0, 255), index=st.integers(0, 10 ** 6), small=st.integers(-2, 300))
def test_fuzzed_low_bit_and_precision_records_are_refused_or_load_and_run(demo, which, value, byte, index, small) -> None:
    _, frag, _, _, scaled, fp8 = demo
    manifest = copy.deepcopy(dict(frag.manifest))
    tensors = {k: v.clone() for k, v in frag.tensors.items()}
    low_bit = manifest["compression"]["low_bit"]
    lb_layer = sorted(low_bit["layers"])[index % len(low_bit["layers"])]

    def poke(key: str, v: float) -> None:
        flat = tensors[key].view(-1)
        flat[index % flat.numel()] = v

    if which == "fp8_scale":
        poke(quant_keys(fp8)[1], value)
    elif which == "fp8_byte":
        tensors[quant_keys(fp8)[0]].view(torch.uint8).view(-1)[index % tensors[quant_keys(fp8)[0]].numel()] = byte
    elif which == "lb_scale":
        poke(low_bit_keys(lb_layer)[1], value)
    elif which == "lb_zero":
        poke(low_bit_keys(lb_layer)[2], value)
    elif which == "lb_channel":
        poke(low_bit_keys(scaled)[3], value)
    elif which == "lb_bits":
        low_bit["bits"] = small
    elif which == "lb_group":
        low_bit["group"] = small
    elif which == "lb_shape":
        low_bit["layers"][lb_layer]["shape"] = [small, *low_bit["layers"][lb_layer]["shape"][1:]]
    elif which == "lb_flag":
        low_bit["layers"][lb_layer]["channel_scale"] = not low_bit["layers"][lb_layer].get("channel_scale", False)
    elif which == "q_dtype":
        manifest["compression"]["precision"]["layers"][fp8]["dtype"] = "int8"
    else:
        del manifest["compression"]["precision"]["layers"]
    _accepted_loads_and_runs(demo, manifest, tensors, timesteps=(500,))  # stored values, not the schedule, are fuzzed
