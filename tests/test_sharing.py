"""Sharing (issue #6): pack / verify / unpack as one safetensors file, with and without the base; H3 reuse CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prompt_fragments.cli import main
from prompt_fragments.reference.model import load_reference
from prompt_fragments.fragment.library import index as library
from prompt_fragments.errors import BaseModelMismatchError, IntegrityError
from prompt_fragments.fragment.format.manifest import seal
from prompt_fragments.fragment.library.sharing import META_MANIFEST, TENSOR, check_against_base, pack, read_pack, unpack
from prompt_fragments.fragment.build import build_fragment, describe_base
from prompt_fragments.fragment.format.store import load_fragment, save_fragment
from prompt_fragments.metrics.reuse import measure_reuse, relative_drift
from prompt_fragments.profiling.profiler import HeadProfiler
from prompt_fragments.profiling.scoring import score_heads
from prompt_fragments.fragment.surgery.heads import HeadLever

PROMPT = "a red circle in the top left on a white background"


@pytest.fixture(scope="module")
def demo_fragment(tmp_path_factory):
    """A real fragment of the reference model's UNet (the `demo` base), profiled on one forward pass."""
    from prompt_fragments.reference.model import load_reference, unet_input

    model = load_reference()
    unet = model.unet
    with HeadProfiler(unet, buckets=1) as prof, torch.no_grad():
        prof.begin_sample(0)
        x = unet_input(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        unet(x, 500, model.encode([PROMPT]))
    frag = build_fragment(unet, [HeadLever.select(score_heads(prof.result()), ratio=0.25)], base=describe_base(unet, "demo"),
                          name="demo-dog", profiling={"prompt": PROMPT})
    folder = tmp_path_factory.mktemp("fragments")
    return unet, save_fragment(frag, folder)


def test_pack_verify_unpack_round_trip_with_library_row(demo_fragment, tmp_path: Path) -> None:
    _, manifest = demo_fragment
    row = {"prompt": PROMPT, "embedding": torch.ones(8), "params": {"ratio": 0.25}}
    out = pack(manifest, tmp_path / "dog.fragment.safetensors", library_row=row)
    content = read_pack(out)
    assert content.fragment.name == "demo-dog" and content.library["prompt"] == PROMPT
    assert "compatible with demo" in check_against_base(content.fragment, load_reference().unet, label="demo")
    dest = tmp_path / "theirs"
    path = unpack(out, dest)
    assert path.read_bytes() and load_fragment(path).kept == load_fragment(manifest).kept
    assert (dest / "demo-dog.safetensors").read_bytes() == manifest.with_suffix(".safetensors").read_bytes()
    assert library.lookup(dest, content.fragment.manifest["base_model"]["sha256"], torch.ones(8) * 2).hit
    with pytest.raises(IntegrityError, match="already exists"):
        unpack(out, dest)


def test_verify_against_a_safetensors_unet_file(demo_fragment, tmp_path: Path) -> None:
    from prompt_fragments.reference.model import build_unet

    unet, manifest = demo_fragment
    fragment = load_fragment(manifest)
    good = tmp_path / "unet.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in unet.state_dict().items()}, str(good))
    assert "compatible with unet.safetensors" in check_against_base(fragment, good)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_file({k: v.contiguous() for k, v in build_unet().state_dict().items()}, str(other))
    with pytest.raises(BaseModelMismatchError, match="other.safetensors: fragment built for base model sha256"):
        check_against_base(fragment, other)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"\x80\x04pickle")
    with pytest.raises(IntegrityError, match="pickle-based format"):
        check_against_base(fragment, pickled)


def test_unpack_refuses_a_name_that_escapes_the_folder(demo_fragment, tmp_path: Path) -> None:
    _, manifest = demo_fragment
    good = read_pack(pack(manifest, tmp_path / "x.fragment.safetensors"))
    evil = dict(good.fragment.manifest)
    evil["name"] = "../../evil"
    evil["artifacts"] = {"tensors": {**evil["artifacts"]["tensors"], "file": "../../evil.safetensors"}}
    bad = tmp_path / "evil.fragment.safetensors"
    save_file({TENSOR: torch.frombuffer(bytearray(good.tensors_bytes), dtype=torch.uint8)}, str(bad),
              metadata={"prompt_fragments.pack": "1", META_MANIFEST: json.dumps(seal({k: v for k, v in evil.items() if k != "integrity"}))})
    before = sorted(p for p in tmp_path.parent.rglob("*"))
    for call in (lambda: main(["verify", str(bad)]), lambda: main(["unpack", str(bad), str(tmp_path / "dest")])):
        assert call() == 2
    assert sorted(p for p in tmp_path.parent.rglob("*") if p != tmp_path / "dest") == before


def test_cli_pack_verify_unpack(demo_fragment, tmp_path: Path, capsys) -> None:
    _, manifest = demo_fragment
    out = tmp_path / "d.fragment.safetensors"
    assert main(["pack", str(manifest), "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["verify", str(out), "--base", "demo"]) == 0
    assert main(["unpack", str(out), str(tmp_path / "lib")]) == 0
    text = capsys.readouterr().out
    assert "OK format and integrity: 'demo-dog'" in text and "OK compatible with demo" in text
    raw = bytearray(out.read_bytes())
    raw[-5] ^= 0xFF
    out.write_bytes(bytes(raw))
    assert main(["verify", str(out)]) == 2
    assert "packed tensors: expected sha256" in capsys.readouterr().err


def test_reuse_harness_counts_paraphrases_within_bounds() -> None:
    def gen(model: float, prompt: str, seed: int) -> torch.Tensor:  # the fragment (1.01) drifts far on "cat" only
        return torch.full((2,), seed + 1.0 + (model - 1.0) * (100 if "cat" in prompt else 1))

    report = measure_reuse(1.0, 1.01, ["a dog", "a dog, photo", "a cat"], seeds=[1, 2], generate=gen,
                           quality=relative_drift, bounds={"relative_drift": ("max", 0.05)},
                           embed=lambda p: torch.tensor([1.0, float(len(p))]), fragment_prompt="a dog")
    assert (report.passed, report.paraphrases) == (2, 3) and abs(report.pass_rate - 2 / 3) < 1e-9
    assert report.results[2].failures[0].startswith("relative_drift: expected <= 0.05")
    assert report.results[0].similarity == pytest.approx(1.0)


def test_cli_reuse_prints_and_records_the_h3_pass_rate(demo_fragment, tmp_path: Path, capsys) -> None:
    _, manifest = demo_fragment
    local = tmp_path / "f"
    local.mkdir()
    for suffix in (".json", ".safetensors"):
        (local / f"demo-dog{suffix}").write_bytes(manifest.with_suffix(suffix).read_bytes())
    target = local / "demo-dog.json"
    rc = main(["reuse", str(target), "--paraphrase", "top-left: a crimson disc on white",
               "--paraphrase", "a scarlet dot in the upper left corner on a white background", "--seeds", "1", "--steps", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    h3 = load_fragment(target).manifest["reuse"]["h3"]  # re-sealed: loads with full verification
    assert h3["paraphrases"] == 2 and h3["stand_in"] is False and h3["seeds"] == [0]
    assert f"H3 reuse pass rate: {h3['pass_rate']:.3f} ({h3['passed']}/2 paraphrases" in out and "reference model" in out
    assert {r["prompt"] for r in h3["results"]} == {"top-left: a crimson disc on white",
                                                    "a scarlet dot in the upper left corner on a white background"}
    assert all(0.0 <= r["metrics"]["ssim_mean"] <= 1.0 for r in h3["results"])
