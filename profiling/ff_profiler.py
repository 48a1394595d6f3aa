"""Find feed-forward blocks by structure and measure what each hidden channel contributes.

Both diffusers' ``FeedForward`` and ComfyUI's are ``net = [project_in,
Dropout, Linear]``: ``project_in`` is a GEGLU whose ``proj`` Linear maps to
``2 * hidden`` (value half first, gate half second, split by ``chunk(2)``), or
a plain GELU (diffusers: ``GELU.proj``; ComfyUI: ``Sequential(Linear, GELU)``).
The last Linear maps ``hidden`` back.  Hidden channel ``c`` owns rows ``c``
(and ``hidden + c`` when gated) of the input projection and column ``c`` of the
output Linear, which is what ``fragment/surgery/feed_forward.py`` cuts.

The profiler's forward pre-hook on the output Linear sees the activated
hidden channels ``a``; the contribution of channel ``c`` to the block output
is ``a_c * W_out[:, c]``, so its mean squared norm is ``E[a_c^2] * ||W_out[:, c]||^2``
(wanda's idea, kept as float32 running sums).  Hooks are removed on exit.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from ..errors import ProfilingError
from .hooks import HookContext
from .profiler import sample_stride

log = logging.getLogger(__name__)

# Tokens per call for the channel statistics; None: all (issue #15: the cheap profile by default).
DEFAULT_FF_TOKEN_SAMPLE = 1024


@dataclass(frozen=True)
class FFSite:
    """One feed-forward block: where its two Linears are and how wide its hidden layer is."""

    path: str
    in_proj: str  # relative path of the input projection ("net.0.proj" or "net.0.0")
    out_proj: str  # relative path of the output Linear ("net.2")
    hidden: int
    gated: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _linear(module: nn.Module, rel: str) -> nn.Linear | None:
    try:
        sub = module.get_submodule(rel)
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Linear) else None


def ff_site(path: str, module: nn.Module) -> FFSite | None:
    """Describe ``module`` when it has the feed-forward layout, else None.

    >>> ff = nn.Module(); ff.net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Dropout(), nn.Linear(8, 4))
    >>> ff_site("ff", ff)
    FFSite(path='ff', in_proj='net.0.0', out_proj='net.2', hidden=8, gated=False)
    """
    net = getattr(module, "net", None)
    if not isinstance(net, (nn.Sequential, nn.ModuleList)) or len(net) < 2:
        return None
    out_idx = next((i for i in range(len(net) - 1, 0, -1) if isinstance(net[i], nn.Linear)), None)
    if out_idx is None:
        return None
    out = net[out_idx]
    for rel in ("net.0.proj", "net.0.0"):
        lin = _linear(module, rel)
        if lin is None:
            continue
        if lin.out_features == 2 * out.in_features:
            return FFSite(path, rel, f"net.{out_idx}", out.in_features, True)
        if lin.out_features == out.in_features:
            return FFSite(path, rel, f"net.{out_idx}", out.in_features, False)
    return None


def iter_feed_forward(model: nn.Module) -> Iterator[tuple[str, nn.Module, FFSite]]:
    """Yield ``(path, module, site)`` for every feed-forward block, in ``named_modules`` order.

    >>> ff = nn.Module(); ff.net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Dropout(), nn.Linear(8, 4))
    >>> [p for p, _, _ in iter_feed_forward(nn.ModuleDict({"ff": ff}))]
    ['ff']
    """
    for name, module in model.named_modules():
        site = ff_site(name, module) if name else None
        if site is not None:
            yield name, module, site


def find_feed_forward(model: nn.Module) -> list[FFSite]:
    """Every feed-forward block of ``model`` (diffusers ``FeedForward`` or ComfyUI's)."""
    return [site for _, _, site in iter_feed_forward(model)]


def _out_column_norms(module: nn.Module, site: FFSite, device: torch.device) -> torch.Tensor:
    w = module.get_submodule(site.out_proj).weight.detach()
    return w.to(device=device, dtype=torch.float32).pow(2).sum(0)  # [hidden]


class FFProfiler(HookContext):
    """Context manager accumulating per-channel contribution energy of every feed-forward block.

    Each call measures about ``token_sample`` evenly spaced tokens (a seeded offset; ``None``
    measures all of them): a channel's mean square needs far fewer tokens than a call has.

    >>> ff = nn.Module(); ff.net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Dropout(), nn.Linear(8, 4))
    >>> model = nn.ModuleDict({"ff": ff})
    >>> with FFProfiler(model) as prof:
    ...     _ = ff.net(torch.randn(3, 4))
    >>> prof.scores()["ff"].shape, prof.calls
    (torch.Size([8]), 1)
    """

    def __init__(self, model: nn.Module, token_sample: int | None = DEFAULT_FF_TOKEN_SAMPLE, seed: int = 0) -> None:
        if token_sample is not None and token_sample < 1:
            raise ProfilingError(f"FFProfiler: expected token_sample >= 1 or None (all tokens), found {token_sample}")
        self.model = model
        self.token_sample = token_sample
        self._rng = random.Random(seed)
        self._sites = list(iter_feed_forward(model))
        if not self._sites:
            raise ProfilingError(f"{type(model).__name__}: no feed-forward blocks (net[0] projection + net[-1] Linear) found")
        self._sum: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}
        super().__init__()
        self.calls = 0

    def _hook(self, path: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            with torch.no_grad():
                flat = x.reshape(-1, x.shape[-1])
                stride = sample_stride(flat.shape[0], self.token_sample)
                if stride > 1:  # evenly spaced tokens from a seeded offset: a view, no index tensor on the device
                    flat = flat[self._rng.randrange(stride)::stride]
                flat = flat.to(torch.float32)
                sq = (flat * flat).sum(0)  # (einsum "tc,tc->c" lowers to a batched matmul: ten times slower on CPU)
                prev = self._sum.get(path)
                if prev is None or prev.device != sq.device:
                    # Sums stay on the activations' device: a .cpu() per call would wait for the device every time.
                    self._sum[path] = sq if prev is None else prev.to(sq.device) + sq
                else:
                    prev.add_(sq)
            self._count[path] = self._count.get(path, 0) + flat.shape[0]
            if path == self._sites[0][0]:
                self.calls += 1

        return hook

    def _install(self) -> None:
        for path, module, site in self._sites:
            out = module.get_submodule(site.out_proj)
            self._handles.append(out.register_forward_pre_hook(self._hook(path)))

    def sites(self) -> dict[str, FFSite]:
        return {p: s for p, _, s in self._sites}

    def scores(self) -> dict[str, torch.Tensor]:
        """Mean squared contribution norm per hidden channel, ``{path: float32 [hidden]}`` (higher = more important)."""
        out: dict[str, torch.Tensor] = {}
        for path, module, site in self._sites:
            if path not in self._sum:
                continue
            mean_sq = self._sum[path].cpu() / max(self._count[path], 1)
            out[path] = mean_sq * _out_column_norms(module, site, torch.device("cpu"))
        if not out:
            raise ProfilingError(f"{type(self.model).__name__}: FFProfiler saw no forward pass; run the model inside the block")
        return out

    def info(self) -> dict[str, Any]:
        return {"method": "activation_energy", "calls": self.calls, "modules": len(self._sum),
                "token_sample": self.token_sample}


def weight_norm_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """A data-free channel score: ``||W_in rows of c|| * ||W_out[:, c]||`` (for byte benchmarks and fallbacks).

    >>> ff = nn.Module(); ff.net = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Dropout(), nn.Linear(8, 4))
    >>> weight_norm_scores(nn.ModuleDict({"ff": ff}))["ff"].shape
    torch.Size([8])
    """
    out: dict[str, torch.Tensor] = {}
    for path, module, site in iter_feed_forward(model):
        w_in = module.get_submodule(site.in_proj).weight.detach()
        rows = w_in.to(torch.float32).pow(2).sum(1)
        if site.gated:
            rows = rows[: site.hidden] + rows[site.hidden :]
        cols = _out_column_norms(module, site, w_in.device)
        out[path] = (rows.sqrt() * cols.sqrt()).cpu()
    return out
