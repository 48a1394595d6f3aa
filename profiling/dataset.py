"""The profiling dataset: per-head running statistics as plain data, saved as safetensors + JSON.

Statistics are kept per attention module, per timestep bucket and per head.
Each (module, bucket) holds a float32 running mean and sum of squared
deviations (Welford/Chan), so profiling many seeds and steps needs no memory
beyond the counters and merging two partial profiles is exact.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ProfilingError, where
from .discovery import AttentionSite

PROFILE_SCHEMA_VERSION = 1
_FIELDS = ("tokens", "energy_mean", "energy_m2", "entropy_sum", "entropy_count", "sample_energy", "sample_tokens")


@dataclass
class ModuleStats:
    """Accumulated statistics of one attention module.

    Shapes: ``tokens``/``entropy_count`` ``[buckets]``; ``energy_mean``,
    ``energy_m2``, ``entropy_sum`` ``[buckets, heads]``; ``sample_energy``
    ``[samples, heads]`` (sum of per-token energy) and ``sample_tokens`` ``[samples]``.
    """

    site: AttentionSite
    tokens: torch.Tensor
    energy_mean: torch.Tensor
    energy_m2: torch.Tensor
    entropy_sum: torch.Tensor
    entropy_count: torch.Tensor
    sample_energy: torch.Tensor
    sample_tokens: torch.Tensor

    @classmethod
    def empty(cls, site: AttentionSite, buckets: int) -> "ModuleStats":
        h = site.heads
        f32 = dict(dtype=torch.float32)
        f64 = dict(dtype=torch.float64)
        return cls(
            site=site,
            tokens=torch.zeros(buckets, **f64),
            energy_mean=torch.zeros(buckets, h, **f32),
            energy_m2=torch.zeros(buckets, h, **f32),
            entropy_sum=torch.zeros(buckets, h, **f64),
            entropy_count=torch.zeros(buckets, **f64),
            sample_energy=torch.zeros(0, h, **f32),
            sample_tokens=torch.zeros(0, **f64),
        )

    def add_energy(self, bucket: int, sample: int, energy: torch.Tensor) -> None:
        """Merge per-token energies ``energy`` of shape ``[tokens, heads]`` into bucket and sample."""
        n_b = float(energy.shape[0])
        if n_b == 0:
            return
        e = energy.to(torch.float32)
        mean_b = e.mean(dim=0)
        m2_b = ((e - mean_b) ** 2).sum(dim=0)
        n_a = float(self.tokens[bucket])
        n = n_a + n_b
        delta = mean_b - self.energy_mean[bucket]
        # Chan et al. parallel update: exact merge of two partial (mean, M2) pairs.
        self.energy_mean[bucket] += delta * (n_b / n)
        self.energy_m2[bucket] += m2_b + delta**2 * (n_a * n_b / n)
        self.tokens[bucket] = n
        self._grow_samples(sample + 1)
        self.sample_energy[sample] += e.sum(dim=0)
        self.sample_tokens[sample] += n_b

    def add_entropy(self, bucket: int, entropy: torch.Tensor) -> None:
        """Merge normalised entropies of shape ``[rows, heads]`` (one row per batch item)."""
        self.entropy_sum[bucket] += entropy.to(torch.float64).sum(dim=0)
        self.entropy_count[bucket] += float(entropy.shape[0])

    def _grow_samples(self, n: int) -> None:
        have = self.sample_energy.shape[0]
        if n > have:
            h = self.site.heads
            self.sample_energy = torch.cat([self.sample_energy, torch.zeros(n - have, h)])
            self.sample_tokens = torch.cat([self.sample_tokens, torch.zeros(n - have, dtype=torch.float64)])

    # -- aggregated views -------------------------------------------------------------------------------
    def _select(self, bucket: int | None) -> slice | list[int]:
        return slice(None) if bucket is None else [bucket]

    def energy(self, bucket: int | None = None) -> torch.Tensor:
        """Mean contribution energy per head, pooled over the chosen bucket(s)."""
        sel = self._select(bucket)
        n = self.tokens[sel].to(torch.float32)
        total = n.sum()
        if total == 0:
            return torch.zeros(self.site.heads)
        return (self.energy_mean[sel] * n[:, None]).sum(0) / total

    def variance(self, bucket: int | None = None) -> torch.Tensor:
        """Variance of the per-token contribution energy per head (pooled M2 / N)."""
        sel = self._select(bucket)
        n = self.tokens[sel].to(torch.float32)
        total = n.sum()
        if total == 0:
            return torch.zeros(self.site.heads)
        mean = self.energy(bucket)
        m2 = self.energy_m2[sel].sum(0) + (n[:, None] * (self.energy_mean[sel] - mean) ** 2).sum(0)
        return m2 / total

    def entropy(self, bucket: int | None = None) -> torch.Tensor:
        """Mean attention entropy per head, normalised to [0, 1] by log(number of keys)."""
        sel = self._select(bucket)
        count = self.entropy_count[sel].sum()
        if count == 0:
            return torch.full((self.site.heads,), float("nan"))
        return (self.entropy_sum[sel].sum(0) / count).to(torch.float32)

    def per_sample_energy(self) -> torch.Tensor:
        """Mean energy per head for each profiled sample (seed): ``[samples, heads]``."""
        n = self.sample_tokens.clamp_min(1).to(torch.float32)
        return self.sample_energy / n[:, None]


@dataclass
class ProfileData:
    """Everything one profiling session measured, as plain data."""

    modules: dict[str, ModuleStats]
    buckets: int
    num_train_timesteps: int = 1000
    samples: list[Any] = field(default_factory=list)  # seed or label of each sample, in order
    calls_per_bucket: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # free-form context: prompt, steps, overhead...

    @property
    def sites(self) -> list[AttentionSite]:
        return [m.site for m in self.modules.values()]

    @property
    def total_calls(self) -> int:
        return int(sum(self.calls_per_bucket))

    def module(self, path: str) -> ModuleStats:
        try:
            return self.modules[path]
        except KeyError:
            raise ProfilingError(where(path, "no statistics recorded for this module path")) from None


def save_profile(data: ProfileData, stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (tensors) and ``<stem>.json`` (metadata); return both paths.

    >>> save_profile(data, "/tmp/dog_profile")  # doctest: +SKIP
    (PosixPath('/tmp/dog_profile.safetensors'), PosixPath('/tmp/dog_profile.json'))
    """
    stem = Path(stem)
    tensors_path, json_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tensors: dict[str, torch.Tensor] = {}
    for path, stats in data.modules.items():
        for name in _FIELDS:
            tensors[f"{path}::{name}"] = getattr(stats, name).contiguous()
    meta = {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "kind": "prompt-fragments-profile",
        "buckets": data.buckets,
        "num_train_timesteps": data.num_train_timesteps,
        "samples": data.samples,
        "calls_per_bucket": data.calls_per_bucket,
        "sites": [m.site.to_dict() for m in data.modules.values()],
        "info": data.info,
        "tensors_file": tensors_path.name,
    }
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(tensors_path, lambda p: save_file(tensors, str(p)))
    _atomic_write(json_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str)))
    return tensors_path, json_path


def load_profile(json_path: str | os.PathLike) -> ProfileData:
    """Read a profile written by :func:`save_profile`."""
    json_path = Path(json_path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfilingError(where(str(json_path), f"cannot read profile metadata: {exc}")) from exc
    if meta.get("schema_version") != PROFILE_SCHEMA_VERSION:
        raise ProfilingError(
            where(str(json_path), f"expected schema_version {PROFILE_SCHEMA_VERSION}, found {meta.get('schema_version')!r}")
        )
    tensors_path = json_path.parent / Path(meta["tensors_file"]).name
    tensors = load_file(str(tensors_path))
    modules: dict[str, ModuleStats] = {}
    for site_dict in meta["sites"]:
        site = AttentionSite(**site_dict)
        try:
            values = {name: tensors[f"{site.path}::{name}"] for name in _FIELDS}
        except KeyError as exc:
            raise ProfilingError(where(str(tensors_path), f"missing tensor {exc.args[0]}")) from None
        modules[site.path] = ModuleStats(site=site, **values)
    return ProfileData(
        modules=modules,
        buckets=int(meta["buckets"]),
        num_train_timesteps=int(meta["num_train_timesteps"]),
        samples=list(meta["samples"]),
        calls_per_bucket=list(meta["calls_per_bucket"]),
        info=dict(meta.get("info", {})),
    )


def _atomic_write(path: Path, write) -> None:
    # Write next to the target and rename, so a crash never leaves a half-written file under the real name.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
