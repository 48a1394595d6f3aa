"""Low-rank factorisation: rank choice by energy, exact at full rank, recorded honestly."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from prompt_fragments.errors import PruningError
from prompt_fragments.fragment.surgery.lowrank import choose_rank, factorize_linear, factors_to_module


def _linear_of_rank(rank: int, out: int = 24, inp: int = 20, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g))
        lin.bias.copy_(torch.randn(out, generator=g))
    return lin


def test_exact_when_the_weight_has_low_rank() -> None:
    lin = _linear_of_rank(5)
    seq, record = factorize_linear(lin, energy=0.999999)
    assert record.rank == 5 and record.orig_rank == 20
    assert record.energy_retained == pytest.approx(1.0, abs=1e-6)
    assert record.params_after == 5 * (20 + 24) < record.params_before == 20 * 24
    x = torch.randn(3, 20)
    assert_close(seq(x), lin(x), rtol=1e-4, atol=1e-4)
    assert seq[1].bias is not None and torch.equal(seq[1].bias, lin.bias) and seq[0].bias is None


def test_energy_target_picks_the_smallest_rank_and_records_what_was_kept() -> None:
    lin = _linear_of_rank(20)
    s = torch.linalg.svdvals(lin.weight.detach())
    share = (s**2).cumsum(0) / (s**2).sum()
    _, record = factorize_linear(lin, energy=0.93)
    assert share[record.rank - 1] >= 0.93 > share[record.rank - 2]
    assert record.energy_retained == pytest.approx(float(share[record.rank - 1]), rel=1e-6)
    assert record.energy_target == 0.93


def test_choose_rank_edges() -> None:
    assert choose_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4
    assert choose_rank(torch.tensor([0.0, 0.0]), 0.5) == 1
    with pytest.raises(PruningError, match=r"expected energy in \(0, 1\], found 1.5"):
        choose_rank(torch.ones(3), 1.5)


def test_explicit_rank_and_stored_factors_rebuild_the_same_module() -> None:
    lin = _linear_of_rank(20).to(torch.float16)
    seq, record = factorize_linear(lin, rank=4, path="mid.ff")
    assert seq[0].weight.dtype == torch.float16 and record.rank == 4
    again = factors_to_module(lin, seq[0].weight, seq[1].weight, "mid.ff")
    x = torch.randn(2, 20, dtype=torch.float16)
    assert torch.equal(again(x), seq(x))


def test_bad_inputs_name_the_layer() -> None:
    with pytest.raises(PruningError, match="conv: expected an nn.Linear to factorise, found Conv2d"):
        factorize_linear(nn.Conv2d(2, 2, 1), path="conv")
    with pytest.raises(PruningError, match=r"mid.ff: expected rank in \[1, 20\], found 30"):
        factorize_linear(_linear_of_rank(3), rank=30, path="mid.ff")
    with pytest.raises(PruningError, match=r"mid.ff: expected low-rank factors down \[r, 20\] and up \[24, r\]"):
        factors_to_module(_linear_of_rank(3), torch.zeros(2, 19), torch.zeros(24, 2), "mid.ff")
