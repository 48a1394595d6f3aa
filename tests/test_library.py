"""Fragment library (issue #6): keys, paraphrase lookup, LRU cap, union, quarantine, killed writers, two writers.

Fragments here are synthetic head-pruning records (no model needed), so the
tests stay light; every file lives under pytest's tmp_path.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from prompt_fragments.fragment.library import index as library
from prompt_fragments.fragment.library.auto_mode import auto_select, load_or_fallback
from prompt_fragments.errors import BaseModelMismatchError, FragmentError
from prompt_fragments.fragment.library.fingerprint import fingerprint, pool_conditioning
from prompt_fragments.fragment.format.manifest import new_manifest
from prompt_fragments.fragment.format.manifest import Fragment
from prompt_fragments.fragment.surgery.heads import kept_key
from prompt_fragments.fragment.format.store import load_fragment
from prompt_fragments.fragment.library.union import union_fragment

BASE = "ab" * 32
PATHS = ["down.0.attn1", "down.0.attn2", "mid.attn1"]


def synthetic(name: str, kept: dict[str, list[int]] | None = None, base: str = BASE, heads: int = 8) -> Fragment:
    kept = kept if kept is not None else {PATHS[0]: [0, 1, 2], PATHS[1]: [1, 3, 5, 7]}
    modules = {p: {"kind": "attn1", "heads": heads, "dim_head": 8, "kept": k,
                   "removed": [h for h in range(heads) if h not in k]} for p, k in kept.items()}
    manifest = new_manifest(name=name, base_model={"name": "toy", "sha256": base, "hash_kind": "state_dict_fp16"},
                            profiling={}, pruning={"heads_total": heads * len(PATHS), "modules": modules},
                            compression={"low_rank": [], "precision": {"applied": False}}, producer_version="test")
    return Fragment(manifest, {kept_key(p): torch.tensor(k, dtype=torch.int64) for p, k in kept.items()})


def emb(seed: int, dim: int = 16) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def near(e: torch.Tensor, scale: float = 0.05, seed: int = 99) -> torch.Tensor:
    return e + scale * emb(seed, e.numel())


def test_pooling_takes_the_mean_over_tokens_of_a_comfyui_conditioning() -> None:
    cond = torch.randn(1, 77, 12)
    pooled = pool_conditioning([[cond, {"pooled_output": torch.randn(1, 12)}]])
    torch.testing.assert_close(pooled, cond[0].mean(0) / cond[0].mean(0).norm())
    with pytest.raises(FragmentError, match="expected \\[tokens, C\\]"):
        pool_conditioning(torch.randn(3))


def test_exact_key_then_paraphrase_then_miss(tmp_path: Path) -> None:
    e = emb(1)
    path = library.add(tmp_path, synthetic("dog"), embedding=e, prompt="a dog", params={"ratio": 0.3})
    assert load_fragment(path).name == "dog"
    exact = library.lookup(tmp_path, BASE, e * 3.0, {"ratio": 0.3})
    assert exact.hit and exact.similarity == 1.0 and exact.reason.startswith("exact key")
    assert exact.key == fingerprint(BASE, e, {"ratio": 0.3})
    para = library.lookup(tmp_path, BASE, near(e), {"ratio": 0.3})
    assert para.hit and 0.9 <= para.similarity < 1.0 and "paraphrase of 'dog'" in para.reason
    other_params = library.lookup(tmp_path, BASE, e, {"ratio": 0.5})
    assert not other_params.hit
    far = library.lookup(tmp_path, BASE, emb(2), None)
    assert not far.hit and "< 0.9" in far.reason
    strict = library.lookup(tmp_path, BASE, near(e, 0.3), None, threshold=0.999)
    assert not strict.hit
    assert not library.lookup(tmp_path, "cd" * 32, e, None).hit
    s = library.stats(tmp_path)
    assert (s["hits"], s["misses"], s["entries"], s["adds"]) == (2, 4, 1, 1)
    assert library.entries(tmp_path)[0]["hits"] == 2


def test_lru_eviction_under_a_size_cap_keeps_recently_used(tmp_path: Path) -> None:
    paths = [library.add(tmp_path, synthetic(f"f{i}"), embedding=emb(i), prompt=f"p{i}") for i in range(3)]
    size = library.entries(tmp_path)[0]["size"]
    assert library.lookup(tmp_path, BASE, emb(0)).hit  # f0 becomes most recently used
    library.add(tmp_path, synthetic("f3"), embedding=emb(3), prompt="p3", cap_bytes=int(size * 3.5))
    names = [e["name"] for e in library.entries(tmp_path)]
    assert names == ["f2", "f0", "f3"] and not paths[1].exists()
    assert library.evict(tmp_path, 0) == ["f2", "f0", "f3"]
    assert library.stats(tmp_path)["evictions"] == 4 and not list(tmp_path.glob("*.json"))


def test_user_fragments_are_never_evicted_and_names_do_not_clash(tmp_path: Path) -> None:
    from prompt_fragments.fragment.format.store import save_fragment

    mine = save_fragment(synthetic("dog"), tmp_path)
    path = library.add(tmp_path, synthetic("dog"), embedding=emb(1), prompt="a dog")
    assert path != mine and path.name.startswith("dog-")
    library.evict(tmp_path, 0)
    assert mine.exists() and not path.exists()


def test_union_fragment_keeps_every_head_any_member_keeps(tmp_path: Path) -> None:
    a = synthetic("a", {PATHS[0]: [0, 1], PATHS[1]: [2]})
    b = synthetic("b", {PATHS[0]: [1, 4], PATHS[2]: [0]})
    u = union_fragment([a, b], "cluster")
    assert u.kept == {PATHS[0]: [0, 1, 4]}  # PATHS[1] and PATHS[2] are fully kept by one member
    assert u.manifest["pruning"]["heads_removed"] == 5
    path = library.add(tmp_path, u, embedding=emb(5), prompt="cluster")
    assert load_fragment(path).kept == {PATHS[0]: [0, 1, 4]}
    with pytest.raises(BaseModelMismatchError, match="union 'x': fragment 'c' is built on base"):
        union_fragment([a, synthetic("c", base="cd" * 32)], "x")


def test_corrupt_entry_is_quarantined_and_auto_mode_falls_back(tmp_path: Path, caplog) -> None:
    e = emb(7)
    path = library.add(tmp_path, synthetic("dog"), embedding=e, prompt="a dog")
    hit = auto_select(tmp_path, BASE, e)
    assert hit.fragment is not None and hit.status.startswith("HIT 'dog'")
    wrong = auto_select(tmp_path, "cd" * 32, e)
    assert wrong.fragment is None and wrong.status.startswith("MISS")
    tensors = path.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-3] + b"xyz")
    out = auto_select(tmp_path, BASE, e)
    assert out.fragment is None and "FALLBACK to the full model" in out.status and "sha256" in out.status
    assert not path.exists() and not tensors.exists()
    assert sorted(p.name.split("-", 3)[-1] for p in out.quarantined) == ["dog.json.quarantined", "dog.safetensors.quarantined"]
    assert all(p.parent == tmp_path / ".library" / "quarantine" for p in out.quarantined)
    assert library.stats(tmp_path)["quarantined"] == 1 and library.entries(tmp_path) == []
    assert "quarantined" in caplog.text


def test_base_mismatch_falls_back_without_quarantine(tmp_path: Path) -> None:
    path = library.add(tmp_path, synthetic("dog"), embedding=emb(1), prompt="a dog")
    out = load_or_fallback(tmp_path, path, base_sha256="cd" * 32)
    assert out.fragment is None and "built for base model" in out.status and path.exists()


# --- a writer killed mid-write ------------------------------------------------------------------

def _writer_stopped_at(folder: str, point: str, ready: str) -> None:
    """Child: add one entry, but stop forever at ``point`` (after signalling ``ready``) to be SIGKILLed."""
    import prompt_fragments.fragment.library.index as lib
    import prompt_fragments.fragment.format.store as store

    def hang(*args, **kwargs):
        Path(ready).write_text("x")
        time.sleep(600)

    if point == "tensors":  # half a tensors file in its temporary name
        real_save = store.save_file

        def half_save(tensors, filename, metadata=None):
            real_save(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            hang()

        store.save_file = half_save
    else:  # both files renamed into place, index row not yet written
        lib._insert = hang
    lib.add(folder, synthetic("victim"), embedding=emb(11), prompt="victim")


@pytest.mark.parametrize("point", ["tensors", "index"])
def test_writer_killed_mid_write_leaves_no_visible_corrupt_entry(tmp_path: Path, point: str) -> None:
    library.add(tmp_path, synthetic("keeper"), embedding=emb(10), prompt="keeper")
    ready = tmp_path.parent / f"ready-{point}"
    proc = mp.get_context("fork").Process(target=_writer_stopped_at, args=(str(tmp_path), point, str(ready)))
    proc.start()
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "writer never reached the kill point"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    # The kernel released the dead writer's lock; the index only knows the complete entry.
    assert [e["name"] for e in library.entries(tmp_path)] == ["keeper"]
    assert not library.lookup(tmp_path, BASE, emb(11), threshold=0.99).hit
    library.add(tmp_path, synthetic("next"), embedding=emb(12), prompt="next")  # sweeps the dead writer's temporaries
    assert not list(tmp_path.glob(".*.tmp-*"))
    for entry in library.entries(tmp_path):
        load_fragment(tmp_path / f"{entry['name']}.json")
    for manifest in tmp_path.glob("*.json"):  # anything visible in the folder is a whole fragment
        load_fragment(manifest)


# --- two processes writing and evicting at once -----------------------------------------------

def _stress_writer(folder: str, who: int, count: int, cap: int) -> None:
    for i in range(count):
        library.add(folder, synthetic(f"w{who}-{i}"), embedding=emb(1000 * who + i), prompt=f"{who}/{i}", cap_bytes=cap)
        library.lookup(folder, BASE, emb(1000 * who + max(0, i - 1)))


def test_two_processes_writing_and_evicting_lose_nothing(tmp_path: Path) -> None:
    count = 10
    library.add(tmp_path, synthetic("probe"), embedding=emb(0), prompt="probe")
    size = library.entries(tmp_path)[0]["size"]
    library.evict(tmp_path, 0)
    cap = size * 6 + size // 2
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_stress_writer, args=(str(tmp_path), who, count, cap)) for who in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    s = library.stats(tmp_path)
    rows = library.entries(tmp_path)
    assert s["adds"] == 2 * count + 1 and s["entries"] == len(rows) == 6
    assert s["evictions"] == s["adds"] - s["entries"]  # every add is either present or counted as evicted
    assert s["hits"] + s["misses"] == 2 * count
    assert sum(r["size"] for r in rows) <= cap
    on_disk = sorted(p.name[: -len(".json")] for p in tmp_path.glob("*.json"))
    assert on_disk == sorted(r["name"] for r in rows)
    for r in rows:
        assert load_fragment(tmp_path / f"{r['name']}.json").name == r["name"]
    assert not list(tmp_path.glob(".*.tmp-*")) and not list(tmp_path.glob("*.safetensors.tmp*"))


def test_a_newer_fragment_with_the_same_key_keeps_the_older_files(tmp_path: Path) -> None:
    from prompt_fragments.fragment.format.store import save_fragment

    e = emb(5)
    first = save_fragment(synthetic("dog_first"), tmp_path)
    library.register(tmp_path, first, embedding=e, prompt="a dog", params={"ratio": 0.3})
    second = save_fragment(synthetic("dog_second"), tmp_path)
    library.register(tmp_path, second, embedding=e, prompt="a dog", params={"ratio": 0.3})
    assert load_fragment(first).name == "dog_first"  # user-named files are never deleted by indexing
    hit = library.lookup(tmp_path, BASE, e, {"ratio": 0.3})
    assert hit.hit and Path(hit.manifest_path).name == "dog_second.json"
