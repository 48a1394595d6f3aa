"""``prompt-fragments`` subcommands for the fragment library and sharing (issue #6): reuse, pack, verify, unpack, library.

Kept beside ``cli.py`` so the shared parser needs one line to add them.
Output is for people (print); failures are ``FragmentError``s, which
``cli.main`` turns into one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .cli_options import MAX_BYTES, SEEDS, STEPS, existing_file, folder_path, int_range, out_file


def _cmd_reuse(args: argparse.Namespace) -> int:
    from .reference.reuse import reference_reuse

    paraphrases = list(args.paraphrase or [])
    if args.paraphrases_file:
        paraphrases += [line.strip() for line in _read_lines(args.paraphrases_file) if line.strip()]
    report = reference_reuse(args.manifest, paraphrases, seeds=list(range(args.seeds)), steps=args.steps,
                             record=not args.no_record)
    for r in report.results:
        sim = "" if r.similarity is None else f" cosine {r.similarity:+.3f}"
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.prompt!r}{sim}  {json.dumps(r.metrics)}")
    print(f"H3 reuse pass rate: {report.pass_rate:.3f} ({report.passed}/{report.paraphrases} paraphrases, "
          f"seeds {report.seeds}) [reference model; bounds {report.bounds}]")
    if not args.no_record:
        print(f"recorded in {args.manifest} (reuse.h3, re-sealed)")
    return 0


def _read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file; a ``FragmentError`` naming it otherwise (a binary file raised UnicodeDecodeError)."""
    from .errors import FragmentError

    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise FragmentError(f"{path}: expected UTF-8 text, one paraphrase per line, found undecodable bytes at "
                            f"offset {exc.start}") from None
    except OSError as exc:
        raise FragmentError(f"{path}: expected a readable text file, found: {exc}") from None


def _library_row(manifest: Path) -> dict[str, Any] | None:
    from .fragment.library.index import entries

    for entry in entries(manifest.parent):
        if entry["name"] == manifest.name[: -len(".json")]:
            return {"prompt": entry["prompt"], "embedding": entry["embedding"].tolist(), "params": entry["params"]}
    return None


def _cmd_pack(args: argparse.Namespace) -> int:
    from .fragment.library.sharing import PACK_SUFFIX, pack

    manifest = Path(args.manifest)
    out = Path(args.out) if args.out else manifest.with_name(manifest.name[: -len(".json")] + PACK_SUFFIX)
    path = pack(manifest, out, library_row=_library_row(manifest))
    print(f"packed {manifest} -> {path} ({path.stat().st_size} bytes)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .fragment.library.sharing import check_against_base, read_pack

    content = read_pack(args.pack)
    m = content.fragment.manifest
    print(f"OK format and integrity: {m['name']!r}, base {m['base_model'].get('name')!r} sha256 "
          f"{str(m['base_model']['sha256'])[:16]}…, {len(m['pruning']['modules'])} pruned modules, "
          f"library row: {'yes' if content.library else 'no'}")
    if args.base:
        if args.base == "demo":
            from .reference.model import load_reference

            model = load_reference()
            print("OK " + check_against_base(content.fragment, model.unet, label="demo", probe=_demo_probe(model)))
        else:
            print("OK " + check_against_base(content.fragment, args.base))
    else:
        print("base model not checked (pass --base PATH or --base demo)")
    return 0


def _demo_probe(model: Any) -> Any:
    """A tiny forward for ``verify --base demo``: one image, three calls across the noise range (so bucket
    masks switch and a reuse step replays), through the schedule state as a sampler drives it."""
    import torch

    from .reference.model import predict

    context = model.encode([""])

    def probe(small: Any, state: Any) -> list:
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        outs = []
        for t in (999, 600, 200):
            state.begin_call(float(t), tuple(x.shape))
            outs.append(predict(small, x, t, context))
        state.reset()
        return outs

    return probe


def _cmd_unpack(args: argparse.Namespace) -> int:
    from .fragment.library.sharing import unpack

    path = unpack(args.pack, args.folder, overwrite=args.overwrite, add_to_library=not args.no_library)
    print(f"unpacked {args.pack} -> {path}")
    return 0


def _cmd_library(args: argparse.Namespace) -> int:
    from .fragment.library.index import entries, evict, stats

    if args.evict_to is not None:
        removed = evict(args.folder, args.evict_to)
        print(f"evicted {len(removed)}: {', '.join(removed)}")
    for e in entries(args.folder):
        print(f"{e['name']:40s} {e['size']:>10d} B  hits {e['hits']:>4d}  {e['prompt'][:60]!r}")
    print(json.dumps(stats(args.folder)))
    return 0


def add_library_commands(sub: Any) -> None:
    """Register reuse / pack / verify / unpack / library on the ``prompt-fragments`` subparsers."""
    p = sub.add_parser("reuse", help="H3: reuse pass rate of a fragment over paraphrases (reference model), recorded in its manifest")
    p.add_argument("manifest", type=existing_file(), help="the fragment's .json manifest (made from the reference model, e.g. by `demo`)")
    p.add_argument("--paraphrase", action="append", help="a paraphrase (repeat)")
    p.add_argument("--paraphrases-file", type=existing_file(), help="one paraphrase per line")
    p.add_argument("--seeds", type=SEEDS, default=4, help="seeds per paraphrase (0, 1, ...)")
    p.add_argument("--steps", type=STEPS, default=25, help="DDIM steps per image")
    p.add_argument("--no-record", action="store_true", help="print only; leave the manifest unchanged")
    p.set_defaults(func=_cmd_reuse)

    p = sub.add_parser("pack", help="write a fragment (manifest + tensors, library row if indexed) as one safetensors file")
    p.add_argument("manifest", type=existing_file())
    p.add_argument("--out", type=out_file(), help="default: <name>.fragment.safetensors beside the manifest")
    p.set_defaults(func=_cmd_pack)

    p = sub.add_parser("verify", help="check a packed fragment: format and integrity, and with --base compatibility")
    p.add_argument("pack", type=existing_file())
    p.add_argument("--base", type=existing_file(keywords=["demo"]),
                   help="a safetensors UNet/checkpoint, or 'demo' for the embedded default model")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("unpack", help="verify a packed fragment and write it into a fragments folder (and its library)")
    p.add_argument("pack", type=existing_file())
    p.add_argument("folder", type=folder_path(), help="the fragments folder, e.g. ComfyUI/models/fragments")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-library", action="store_true", help="do not index it for auto mode")
    p.set_defaults(func=_cmd_unpack)

    p = sub.add_parser("library", help="list a fragments folder's library entries and statistics")
    p.add_argument("folder", type=folder_path())
    p.add_argument("--evict-to", type=int_range(0, MAX_BYTES), default=None, metavar="BYTES", help="evict LRU entries down to BYTES first")
    p.set_defaults(func=_cmd_library)
