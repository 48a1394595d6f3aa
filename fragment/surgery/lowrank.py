"""Low-rank compression: replace a Linear by two thinner Linears from its truncated SVD.

``W = U S Vh`` is cut to the smallest rank ``r`` whose singular values keep
the requested share of ``sum(S**2)`` (the Frobenius energy).  The factors are
``down = sqrt(S_r) Vh_r`` (r x in) and ``up = U_r sqrt(S_r)`` (out x r): splitting
``sqrt(S)`` over both keeps their magnitudes alike, which matters once they are
stored in fp16.  The original bias moves to ``up``.  Both factors are Linears
of the original's own class, so ComfyUI's cast-on-the-fly ops keep working.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Mapping

import torch
import torch.nn as nn

from ...errors import BaseModelMismatchError, IntegrityError, PruningError, where
from .lever import Built, LeverBase, tensor
from .tree import install, linear_like, module_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowRankRecord:
    """What the manifest keeps about one factorised layer."""

    layer: str
    rank: int
    orig_rank: int
    energy_target: float | None
    energy_retained: float
    params_before: int
    params_after: int

    def to_dict(self) -> dict:
        return asdict(self)


def choose_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of ``sum(S**2)``.

    >>> choose_rank(torch.tensor([3.0, 1.0, 0.0]), 0.9)
    1
    >>> choose_rank(torch.tensor([3.0, 1.0, 0.0]), 0.95)
    2
    """
    if not 0.0 < energy <= 1.0:
        raise PruningError(f"choose_rank: expected energy in (0, 1], found {energy}")
    power = singular_values.to(torch.float64) ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = power.cumsum(0) / total
    # The tolerance keeps energy=1.0 reachable despite float rounding in the sum.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def factorize_linear(
    lin: nn.Linear, *, energy: float | None = None, rank: int | None = None, path: str = "<linear>"
) -> tuple[nn.Sequential, LowRankRecord]:
    """Two-Linear replacement of ``lin`` at a chosen energy (default 0.93) or rank, with the energy actually kept.

    >>> lin = nn.Linear(16, 16)
    >>> seq, rec = factorize_linear(lin, rank=4)
    >>> (rec.rank, seq[0].out_features, seq[1].in_features, 0 < rec.energy_retained < 1)
    (4, 4, 4, True)
    """
    if not isinstance(lin, nn.Linear):
        raise PruningError(where(path, f"expected an nn.Linear to factorise, found {type(lin).__name__}"))
    if energy is None and rank is None:
        energy = 0.93
    if energy is not None and rank is not None:
        raise PruningError(where(path, f"expected exactly one of energy or rank, found energy={energy} and rank={rank}"))
    weight = lin.weight.detach()
    w32 = weight.to(torch.float32)
    u, s, vh = torch.linalg.svd(w32, full_matrices=False)
    orig_rank = int(s.numel())
    r = choose_rank(s, energy) if rank is None else int(rank)
    if not 1 <= r <= orig_rank:
        raise PruningError(where(path, f"expected rank in [1, {orig_rank}], found {r}"))
    root = s[:r].sqrt()
    down_w = (root[:, None] * vh[:r]).to(weight.dtype)
    up_w = (u[:, :r] * root[None, :]).to(weight.dtype)
    bias = None if lin.bias is None else lin.bias.detach()
    kept = float((s[:r].double() ** 2).sum() / (s.double() ** 2).sum().clamp_min(1e-300))
    seq = nn.Sequential(linear_like(lin, down_w, None), linear_like(lin, up_w, bias))
    before = weight.numel()
    after = down_w.numel() + up_w.numel()
    if after >= before:
        log.warning("%s: rank %d keeps %d weights where the full layer has %d: no saving", path, r, after, before)
    record = LowRankRecord(path, r, orig_rank, energy, kept, before, after)
    return seq, record


def factors_to_module(lin: nn.Linear, down: torch.Tensor, up: torch.Tensor, path: str = "<linear>") -> nn.Sequential:
    """Rebuild the two-Linear replacement of ``lin`` from stored factors, checking their shapes.

    >>> lin = nn.Linear(8, 6)
    >>> factors_to_module(lin, torch.zeros(2, 8), torch.zeros(6, 2))[1].out_features
    6
    """
    if down.ndim != 2 or up.ndim != 2 or down.shape[1] != lin.in_features or up.shape[0] != lin.out_features or up.shape[1] != down.shape[0]:
        raise PruningError(
            where(
                path,
                f"expected low-rank factors down [r, {lin.in_features}] and up [{lin.out_features}, r], "
                f"found down {list(down.shape)} and up {list(up.shape)}",
            )
        )
    w = lin.weight
    bias = None if lin.bias is None else lin.bias.detach()
    return nn.Sequential(
        linear_like(lin, down.to(device=w.device, dtype=w.dtype), None),
        linear_like(lin, up.to(device=w.device, dtype=w.dtype), bias),
    )


def lowrank_keys(layer: str) -> tuple[str, str]:
    """The tensors-file keys of one factorised Linear's two factors.

    >>> lowrank_keys("m.proj")
    ('lowrank.m.proj.down', 'lowrank.m.proj.up')
    """
    return f"lowrank.{layer}.down", f"lowrank.{layer}.up"


@dataclass(frozen=True)
class LowRankLever(LeverBase):
    """Replace Linears by two thin ones: ``energies`` maps a layer path to the share of ``sum(S**2)`` to keep.

    Record: the list ``compression.low_rank`` (one ``LowRankRecord`` each).  Tensors:
    ``lowrank.<layer>.down`` ``[rank, in]`` and ``.up`` ``[out, rank]``.

    >>> LowRankLever({"mid.proj": 0.9}).name
    'low_rank'
    """

    energies: Mapping[str, float] = field(default_factory=dict)
    name: ClassVar[str] = "low_rank"
    ladder: ClassVar[str] = ""  # chosen by layer, not by the calibration
    off: ClassVar[Any] = {}

    @classmethod
    def check_amount(cls, amount: Any, settings: Any = None) -> str | None:
        # the energies themselves are checked where they are used (``choose_rank``), with the layer named
        return None if isinstance(amount, Mapping) else "an object of layer path -> energy to keep"

    @classmethod
    def label(cls, amount: Any, settings: Any = None) -> str:
        return f"low-rank {len(amount)}"

    @classmethod
    def plan(cls, evidence: Any, settings: Any, model: nn.Module, name: str) -> "LowRankLever | None":
        energies = settings.amount(cls.name)
        return cls(dict(energies)) if energies else None

    def build(self, model: nn.Module, replacements: dict[str, nn.Module], built: Mapping[str, Any]) -> Built:
        tensors: dict[str, torch.Tensor] = {}
        records = []
        for layer, energy in self.energies.items():
            seq, record = factorize_linear(module_at(model, replacements, layer), energy=energy, path=layer)
            down_key, up_key = lowrank_keys(layer)
            tensors[down_key] = seq[0].weight.detach().contiguous()
            tensors[up_key] = seq[1].weight.detach().contiguous()
            records.append(record.to_dict())
            install(replacements, {layer: seq})
        return Built(tensors, records)

    @classmethod
    def record_in(cls, manifest: Mapping[str, Any]) -> Any | None:
        return (manifest.get("compression") or {}).get("low_rank") or None

    @classmethod
    def apply(cls, model: nn.Module, record: Any, tensors: Mapping[str, torch.Tensor],
              replacements: dict[str, nn.Module], source: str = "fragment") -> None:
        for entry in record:
            layer = entry["layer"]
            down_key, up_key = lowrank_keys(layer)
            lin = module_at(model, replacements, layer)
            if not isinstance(lin, nn.Linear):
                raise BaseModelMismatchError(f"{layer}: expected an nn.Linear to take low-rank factors, found {type(lin).__name__}")
            # Inside a pruned attention, install folds it into that copy, so no patch sits inside another.
            install(replacements, {layer: factors_to_module(lin, tensors[down_key], tensors[up_key], layer)})

    @classmethod
    def check(cls, record: Any, tensors: Mapping[str, torch.Tensor], source: str) -> set[str]:
        keys: set[str] = set()
        for entry in record:
            down_key, up_key = lowrank_keys(entry["layer"])
            keys.update((down_key, up_key))
            down = tensor(tensors, down_key, f"low-rank layer {entry['layer']}", source)
            up = tensor(tensors, up_key, f"low-rank layer {entry['layer']}", source)
            rank = entry["rank"]
            # down is [rank, in], up is [out, rank]: 'rank in shape' accepted a [0, 8] factor recorded as rank 8.
            for key, t, axis in ((down_key, down, 0), (up_key, up, 1)):
                if t.ndim != 2 or not t.is_floating_point() or t.shape[axis] != rank or min(t.shape) < 1:
                    raise IntegrityError(
                        f"{source}: {key}: expected a 2-D float tensor with rank {rank} on axis {axis} and no empty axis, "
                        f"found {t.dtype} {list(t.shape)}"
                    )
        return keys

    @classmethod
    def weight_keys(cls, record: Any, prefix: str = "") -> set[str]:
        """Weight and bias of every factorised Linear.

        >>> sorted(LowRankLever.weight_keys([{"layer": "mid.ff"}]))
        ['mid.ff.bias', 'mid.ff.weight']
        """
        return {f"{prefix}{entry['layer']}.{w}" for entry in record for w in ("weight", "bias")}
