"""The ``prompt-fragments`` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .fragment.errors import FragmentError

log = logging.getLogger(__name__)


def _cmd_anatomy(args: argparse.Namespace) -> int:
    from .profiling.anatomy import compute_anatomy, format_anatomy_table

    result = compute_anatomy(args.arch)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_anatomy_table(result))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    summary = run_demo(args.out, prompt=args.prompt, seeds=args.seeds, variants=args.variants, steps=args.steps, ratio=args.ratio)
    print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prompt-fragments", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("anatomy", help="where a UNet's parameters are, from the architecture alone")
    p.add_argument("--arch", choices=["sd15", "sdxl"], required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_anatomy)

    p = sub.add_parser("demo", help="profile, extract and reuse a fragment on the embedded default model")
    p.add_argument("--out", default="outputs/demo", help="folder for the fragment files and summary.json")
    p.add_argument("--prompt", default="A dog on a jet ski")
    p.add_argument("--seeds", type=int, default=8, help="seeds to profile")
    p.add_argument("--variants", type=int, default=8, help="variants generated with the full model and the fragment")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of heads to remove")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FragmentError as exc:
        # Known failures get one clear line, not a traceback.
        sys.stderr.write(f"prompt-fragments: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
