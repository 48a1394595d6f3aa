"""The reference model (issue #4): data, grammar, analyzer, training determinism, committed weights, pipeline."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from prompt_fragments.reference.analyzer import analyze, exact, score
from prompt_fragments.reference.captions import caption, canonical_caption, parse_caption, vocabulary, words
from prompt_fragments.reference.evaluation import analyzer_accuracy, truth
from prompt_fragments.reference.shapes import (
    COLOURS, POSITIONS, SHAPES, Scene, Shape, held_out_scenes, held_out_triples, render, training_scenes,
)

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from prompt_fragments.reference.model import WEIGHTS_FILE, WordTokenizer, load_reference  # noqa: E402
from prompt_fragments.fragment.surgery.heads import HeadLever


def test_generator_is_deterministic_and_keeps_held_out_triples_out_of_training() -> None:
    a = [render(s) for s in training_scenes(50, seed=3)]
    b = [render(s) for s in training_scenes(50, seed=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    held = held_out_triples()
    seen = {o.attributes() for s in training_scenes(4000, seed=0) for o in s.objects}
    assert not seen & held
    # every part of a held-out triple is seen in training, only the combination is new
    for shape, colour, position in held:
        assert any(o[0] == shape and o[1] == colour for o in seen)
        assert any(o[2] == position for o in seen)
    assert {t[0] for t in held} == set(SHAPES) and {t[1] for t in held} == set(COLOURS)
    assert {t[2] for t in held} == set(POSITIONS)


def test_every_caption_parses_back_to_its_scene_and_stays_in_the_vocabulary() -> None:
    vocab = set(vocabulary())
    rng = random.Random(0)
    for scene in list(training_scenes(400, seed=1)) + held_out_scenes(40):
        text = caption(scene, rng)
        assert set(words(text)) <= vocab, text
        parsed = parse_caption(text)
        assert sorted(map(str, parsed["objects"])) == sorted(map(str, truth(scene))), text
        assert parsed["background"] in (None, scene.background)
        assert parse_caption(canonical_caption(scene))["background"] == scene.background


def test_analyzer_reads_the_generators_ground_truth() -> None:
    result = analyzer_accuracy(300)
    assert result["attribute_accuracy"] >= 0.99 and result["exact_rate"] >= 0.97, result


def test_analyzer_finds_nothing_in_a_blank_image_and_scores_mismatches() -> None:
    blank = render(Scene("gray", ()))
    assert analyze(blank)["objects"] == [] and analyze(blank)["background"] == "gray"
    img = render(Scene("black", (Shape("square", "blue", "left"),)))
    found = analyze(img)["objects"]
    assert score([{"shape": "circle", "colour": "red", "position": "left"}], found) == (1, 3)
    assert not exact([{"shape": "square", "colour": "blue", "position": "left"}] * 2, found)
    with pytest.raises(ValueError, match="reference.analyzer.analyze: expected a uint8"):
        analyze(img.astype(np.float32))


def test_tokenizer_is_offline_and_maps_unknown_words() -> None:
    tok = WordTokenizer()
    ids = tok(["a red circle", "a zebra"])
    assert ids.shape == (2, 32) and tok.decode(ids[1]) == "<bos> a <unk> <eos>"
    assert tok.unknown_words("A dog on a jet ski") == ["dog", "jet", "ski"]


def test_training_is_deterministic(tmp_path) -> None:
    from prompt_fragments.reference.training import TrainConfig, train

    config = TrainConfig(steps=2, batch_size=4, log_every=1, checkpoint_every=0, threads=1)
    first, history = train(config, tmp_path / "a.safetensors")
    second, _ = train(config, None)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    for (name, p), q in zip(first.unet.state_dict().items(), second.unet.state_dict().values()):
        assert torch.equal(p, q), name
    reloaded = load_reference(tmp_path / "a.safetensors")
    assert_close(reloaded.encode(["a red circle"]), first.encode(["a red circle"]).half().float(), atol=2e-2, rtol=0)


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_committed_weights_meet_the_architecture_contract(reference) -> None:
    from diffusers.models.attention_processor import Attention
    from transformers import CLIPTextModel

    assert WEIGHTS_FILE.stat().st_size <= 25 * 1024 * 1024
    attention = {name: m for name, m in reference.unet.named_modules() if isinstance(m, Attention)}
    assert all(m.heads >= 4 for m in attention.values())
    assert sum(m.heads for m in attention.values()) >= 48
    cross = {name for name, m in attention.items() if m.is_cross_attention}
    widths = {attention[n].to_q.in_features for n in cross}  # one channel width per resolution here
    assert len(widths) >= 2, widths
    assert isinstance(reference.text_encoder, CLIPTextModel)


def test_weights_of_another_architecture_are_refused_naming_the_file(reference, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from prompt_fragments.errors import FragmentError

    with safe_open(str(WEIGHTS_FILE), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["unet.conv_out.weight"] = torch.zeros(3, 7, 3, 3, dtype=torch.float16)  # a narrower, older layout
    path = tmp_path / "old.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(FragmentError, match=r"old\.safetensors does not match the architecture \(unet: size mismatch "
                                            r"for conv_out\.weight"):
        load_reference(path)


def test_committed_weights_reproduce_the_model_card_adherence(reference) -> None:
    from prompt_fragments.reference.evaluation import adherence_eval

    card = json.loads((WEIGHTS_FILE.parent / "eval.json").read_text())
    measured = adherence_eval(reference, steps=card["steps"], guidance=card["guidance"])
    assert abs(measured["attribute_accuracy"] - card["held_out"]["attribute_accuracy"]) <= 0.02, (
        measured["attribute_accuracy"], card["held_out"]["attribute_accuracy"])
    # The target is 80 %; the card reports the measured number and whether it is met (this test only
    # checks that the committed weights reproduce it).
    assert card["held_out"]["attribute_accuracy"] > 1 / 3, "no better than guessing shape, colour and position"


def test_masking_equals_physical_pruning_on_the_reference_unet(reference) -> None:
    from prompt_fragments.fragment.surgery.masking import mask_heads
    from prompt_fragments.fragment.surgery.selection import select_heads
    from prompt_fragments.fragment.build import apply_fragment, build_fragment, describe_base
    from prompt_fragments.profiling.profiler import HeadProfiler
    from prompt_fragments.profiling.scoring import score_heads
    from prompt_fragments.reference.sampling import sample

    context, uncond = reference.encode(["a red circle in the top left"]), reference.encode([""])
    with HeadProfiler(reference.unet, buckets=2) as prof:
        for seed in range(2):
            prof.begin_sample(seed)
            sample(reference.unet, context, uncond, [seed], steps=4)
    plan = select_heads(score_heads(prof.result()), ratio=0.3)
    assert plan.removed_heads >= 0.25 * plan.total_heads
    small = apply_fragment(reference.unet, build_fragment(reference.unet, [HeadLever(plan)], base=describe_base(reference.unet, "ref"),
                                                          name="t", profiling={"prompt": "p"}))
    from prompt_fragments.reference.model import unet_input

    x = unet_input(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad(), mask_heads(reference.unet, plan.kept):
        masked = reference.unet(x, 400, context.expand(2, -1, -1)).sample
    with torch.no_grad():
        physical = small(x, 400, context.expand(2, -1, -1)).sample
        full = reference.unet(x, 400, context.expand(2, -1, -1)).sample
    assert_close(physical, masked, rtol=1e-5, atol=1e-5)
    assert (physical - full).abs().max() > 1e-3  # the plan really changes the model, so the equality means something
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in reference.unet.parameters())
