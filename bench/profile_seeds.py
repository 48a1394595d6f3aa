"""How many profiled seeds the calibration's pick needs (issue #26, item 6: fewer profiled seeds, if stable).

Every profiled seed is a full-model image of the user's batch: fewer of them leave more of the batch to the
fragment.  What the profile decides for an in-batch calibration (``calibrate(..., confirm_in_batch=True)``) is the
ladder, and with it the rung picked untried and its CFG cut-off.  For each prompt this bench profiles a reference
set of seeds (the demo's 8) once, then disjoint subsets of the same size ``n`` (seeds ``s0 + k n ..`` from
``s0 = max(100, reference)``, none among the reference's), and compares each subset's pick with the reference's: the same label, or how many rungs of the
reference ladder apart.  Two disjoint subsets disagreeing shows what a profile of ``n`` seeds leaves to chance; a
subset agreeing with the reference shows a profile of ``n`` would have picked what ``8`` did.

Each profile's seconds per image are printed beside it (one batch of ``n`` seeds with the goal's probes): on a
small model a small batch costs more per image than the stock batch of 32, so fewer seeds save less than their
count says.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import FragmentError
from ..fragment.build import describe_base
from ..fragment.calibration import Judgement, candidate_ladder, profile_predictors
from ..fragment.extract import calibrated_fragment
from ..fragment.levers import goal_evidence
from ..profiling.evidence import ProfileEvidence
from ..profiling.session import profiled

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedsBenchConfig:
    """What ``bench seeds`` profiles: the reference seeds ``0..reference-1``, and per size in ``sizes`` that many
    disjoint subsets (``subsets``), on ``steps`` DDIM steps.  Goal ``speed`` only: its ladder moves one lever, so a
    pick is placed on another profile's ladder by its label (``rung_of``).

    >>> SeedsBenchConfig(sizes=(4,)).sizes
    (4,)
    """

    reference: int = 8  # the demo's profiled seeds: the pick every subset is compared with
    sizes: tuple[int, ...] = (4, 2)  # subset sizes, each in ``subsets`` disjoint subsets
    subsets: int = 2
    steps: int = 25
    goal: str = "speed"

    def __post_init__(self) -> None:
        if self.goal != "speed":
            raise FragmentError(f"bench seeds goal: expected 'speed' (a one-lever ladder), found {self.goal!r}")
        if self.reference < 1 or self.subsets < 1 or not self.sizes or min(self.sizes) < 1:
            raise FragmentError(f"bench seeds: expected reference, subsets and every size >= 1, found reference "
                                f"{self.reference}, subsets {self.subsets}, sizes {list(self.sizes)}")


def _never_judged(*_: Any) -> Judgement:
    raise FragmentError("bench seeds: an in-batch pick judges nothing, yet the calibration asked for a try")


def pick(model: Any, prompt: str, seeds: Sequence[int], config: SeedsBenchConfig) -> dict[str, Any]:
    """Profile ``seeds`` of ``prompt`` as one batch with the goal's probes and return the in-batch pick: its label,
    its index in the ladder, the ladder's labels and the profile's seconds per image.

    >>> pick(load_reference(), "a red circle", [0, 1], SeedsBenchConfig(steps=5))["label"]  # doctest: +SKIP
    'step reuse 45% below skip 1 + CFG off below t=350 + cross-attention cached below t=350'
    """
    from ..reference.sampling import DEFAULT_GUIDANCE, sample

    unet = model.unet
    context, uncond = model.encode([prompt]), model.encode([""])
    seeds = list(seeds)
    started = time.perf_counter()
    with profiled(unet, goal_evidence(config.goal), buckets=4, info={"prompt": prompt}) as (prof, probes):
        prof.begin_batch(seeds)
        with torch.no_grad():
            sample(unet, context, uncond, seeds, steps=config.steps, guidance=DEFAULT_GUIDANCE)
    seconds = time.perf_counter() - started
    evidence = ProfileEvidence.from_probes(prof.result(), probes)
    ladder = [c.label for c in candidate_ladder(profile_predictors(evidence, unet, goal=config.goal), config.goal)]
    _, cal = calibrated_fragment(evidence, unet, _never_judged, base=describe_base(unet, "bench-seeds"), name="seeds",
                                 calibration_seeds=seeds, holdout_seeds=[max(seeds) + 1], goal=config.goal,
                                 confirm_in_batch=True)
    label = cal.chosen.label if cal.chosen else None
    return {"seeds": seeds, "label": label, "rung": rung_of(label, ladder), "ladder": ladder,
            "s_per_image": seconds / len(seeds)}


def rung_of(label: str | None, ladder: Sequence[str]) -> int | None:
    """The index of the rung of ``ladder`` (rung labels) that a pick's ``label`` is (a cut-off rides on top of it), or
    ``None`` (no such rung: the pick is another ladder's rung, or the full model).

    >>> rung_of("step reuse 45% + CFG off", ["step reuse 50%", "step reuse 45%"]), rung_of("x", ["y"])
    (1, None)
    """
    return next((i for i, name in enumerate(ladder) if label and (label == name or label.startswith(name + " + "))), None)


def bench_profile_seeds(model: Any, prompts: Sequence[str], config: SeedsBenchConfig = SeedsBenchConfig()) -> dict[str, Any]:
    """Per prompt, the reference profile's pick and each disjoint subset's, with the agreements counted.

    >>> report = bench_profile_seeds(load_reference(), PRIOR_PROMPTS)  # doctest: +SKIP
    >>> report["summary"][4]["same_as_reference"]  # doctest: +SKIP
    '9 of 12'
    """
    if not prompts:
        raise FragmentError("bench seeds: expected at least one prompt, found none")
    rows = []
    first = max(100, config.reference)  # subsets never share a seed with the reference
    for prompt in prompts:
        reference = pick(model, prompt, range(config.reference), config)
        subsets = {}
        for n in config.sizes:
            subsets[n] = [pick(model, prompt, range(first + k * n, first + (k + 1) * n), config)
                          for k in range(config.subsets)]
        rows.append({"prompt": prompt, "reference": reference, "subsets": subsets})
        log.info("bench seeds: %s: %s", prompt, reference["label"])
    summary = {}
    for n in config.sizes:
        picks = [(row["reference"], s) for row in rows for s in row["subsets"][n]]
        same = sum(s["label"] == ref["label"] for ref, s in picks)
        # the subset's pick placed on the reference's ladder (each profile builds its own ladder); a reference pick
        # that is no rung (the cut-off alone, the full model) has no distance to count
        placed = [(ref["rung"], rung_of(s["label"], ref["ladder"])) for ref, s in picks if ref["rung"] is not None]
        apart = [abs(a - b) for a, b in placed if b is not None]
        pairs = [row["subsets"][n] for row in rows]
        agree = sum(len({s["label"] for s in group}) == 1 for group in pairs)
        summary[n] = {"same_as_reference": f"{same} of {len(picks)}", "same": same, "compared": len(picks),
                      "max_rungs_apart": max(apart, default=None), "off_ladder": len(placed) - len(apart),
                      "subsets_agree": f"{agree} of {len(pairs)}",
                      "s_per_image": sum(s["s_per_image"] for _, s in picks) / len(picks) if picks else None}
    ref_s = [row["reference"]["s_per_image"] for row in rows]
    return {"config": {"reference": config.reference, "sizes": list(config.sizes), "subsets": config.subsets,
                       "steps": config.steps, "goal": config.goal},
            "rows": rows, "summary": summary, "reference_s_per_image": sum(ref_s) / len(ref_s) if ref_s else None}


def _short(label: str | None) -> str:
    return "full model" if label is None else label.replace(" below skip 1", "").replace("cross-attention cached", "x-attn")


def format_seeds_report(report: dict[str, Any]) -> str:
    """The bench's table: per prompt the reference pick and each subset's (``=`` the same label), then the summary.

    >>> r = {"config": {"reference": 8, "sizes": [2], "subsets": 1, "steps": 5, "goal": "speed"},
    ...      "rows": [{"prompt": "p", "reference": {"label": "a", "rung": 1, "s_per_image": 0.2},
    ...                "subsets": {2: [{"label": "a", "rung": 1, "seeds": [100, 101], "s_per_image": 0.3}]}}],
    ...      "summary": {2: {"same_as_reference": "1 of 1", "max_rungs_apart": 0, "off_ladder": 0, "subsets_agree": "1 of 1",
    ...                      "s_per_image": 0.3}}, "reference_s_per_image": 0.2}
    >>> print(format_seeds_report(r).splitlines()[-1])
    2 seeds: the reference's pick in 1 of 1 subsets (at most 0 rungs of its ladder apart); a prompt's subsets agree in 1 of 1; 0.300 s per profiled image
    """
    c = report["config"]
    lines = [f"profiled seeds and the in-batch pick (goal {c['goal']}, {c['steps']} steps; reference: seeds "
             f"0..{c['reference'] - 1}, {report['reference_s_per_image']:.3f} s per profiled image)"]
    for row in report["rows"]:
        lines.append(f"{row['prompt']}: reference {_short(row['reference']['label'])}")
        for n, group in row["subsets"].items():
            lines.append(f"  {n} seeds: " + "; ".join(
                f"{s['seeds'][0]}..{s['seeds'][-1]} " + ("=" if s["label"] == row["reference"]["label"] else _short(s["label"]))
                for s in group))
    for n, s in report["summary"].items():
        apart = "n/a" if s["max_rungs_apart"] is None else s["max_rungs_apart"]
        off = f", {s['off_ladder']} not on its ladder" if s.get("off_ladder") else ""
        lines.append(f"{n} seeds: the reference's pick in {s['same_as_reference']} subsets (at most {apart} rungs of "
                     f"its ladder apart{off}); a prompt's subsets agree in {s['subsets_agree']}; "
                     f"{s['s_per_image']:.3f} s per profiled image")
    return "\n".join(lines)
