"""Issue #29, item 5: the command line checks every numeric and path option before any command runs.

The parsers are walked (every subcommand of ``build_parser()`` and the overhead bench's own parser),
so an option added later without a checked type fails ``test_every_value_option_has_a_checked_type``.
Every numeric option is then fed 0, -1, a huge number, non-numbers and its own bounds; each refusal
must be argparse's exit 2 with one line naming the option, what it expected and what it found.
The issue's findings run through ``main`` and must leave the files they would have written untouched.
"""
from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path
from typing import Iterator

import pytest

from prompt_fragments.bench import overhead
from prompt_fragments.cli import LOW_BIT_BITS, LOW_BIT_GROUPS, QUANT_FORMATS, QUANT_SCOPES, build_parser, main
from prompt_fragments.cli_options import Choice, FloatRange, IntRange, ListOf, OptionType, PathOption
from prompt_fragments.errors import FragmentError
from prompt_fragments.fragment.format.store import save_fragment

from test_library import emb, synthetic

# Options that take free text on purpose: prompts, paraphrases, and the report selectors that name a folder,
# a run id or a keyword (metrics.report_gate resolves them and says what it could not find).
FREE_TEXT = {
    ("demo", "--prompt"), ("bench quant", "--prompt"), ("bench batch", "--prompt"), ("bench peers", "--prompt"),
    ("bench prior", "--prompt"), ("bench judging", "--prompt"), ("bench seeds", "--prompt"), ("demo", "--cold-prompt"),
    ("report", "--run"), ("report", "--compare"), ("reuse", "--paraphrase"),
}
OVERHEAD = "python -m prompt_fragments.bench.overhead"


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command, parser) for every subcommand that runs something, e.g. ``("bench memory", <parser>)``."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, f"{prefix} {name}")


ROOT, OVERHEAD_PARSER = build_parser(), overhead.build_parser()  # parse_args keeps no state: built once, parsed often


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [*leaf_parsers(ROOT), (OVERHEAD, OVERHEAD_PARSER)]


def value_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions that take a value (not flags, not help, not subcommands)."""
    return [a for a in parser._actions if a.nargs != 0 and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def option_name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def unchecked_options(parsers: list[tuple[str, argparse.ArgumentParser]]) -> list[str]:
    """Options whose value is neither a checked type, a fixed choice, nor free text on purpose."""
    return [f"{cmd} {option_name(a)}" for cmd, p in parsers for a in value_actions(p)
            if not isinstance(a.type, OptionType) and a.choices is None and (cmd, option_name(a)) not in FREE_TEXT]


PARSERS = all_parsers()
NUMERIC = [(cmd, a) for cmd, p in PARSERS for a in value_actions(p) if isinstance(a.type, (IntRange, FloatRange, ListOf, Choice))]
PATHS = [(cmd, a) for cmd, p in PARSERS for a in value_actions(p) if isinstance(a.type, PathOption)]


def _parser(cmd: str) -> argparse.ArgumentParser:
    return dict(PARSERS)[cmd]


def base_argv(cmd: str, tmp: Path, *, leave_out: argparse.Action | None = None) -> tuple[list[str], list[str]]:
    """(before, after): the command words and a valid value for every required argument but ``leave_out``.

    Positionals keep their order: ``leave_out``'s value goes between ``before`` and ``after``.
    """
    (tmp / "a-file").write_text("x")
    (tmp / "a-folder").mkdir(exist_ok=True)
    valid = {"file": str(tmp / "a-file"), "folder": str(tmp / "a-folder"), "new-folder": str(tmp / "new-folder"),
             "out-file": str(tmp / "out.json")}
    before = [] if cmd == OVERHEAD else cmd.split()
    after: list[str] = []
    target = before
    for a in value_actions(_parser(cmd)):
        if a is leave_out:
            target = after
            continue
        if not (a.required or not a.option_strings):
            continue
        value = (str(a.choices[0]) if a.choices else valid[a.type.kind] if isinstance(a.type, PathOption) else "x")
        target += [value] if not a.option_strings else [a.option_strings[-1], value]
    return before, after


def parse(cmd: str, action: argparse.Action, value: str, tmp: Path) -> argparse.Namespace:
    before, after = base_argv(cmd, tmp, leave_out=action)
    # --opt=value: argparse would read a value such as -inf as an option of its own
    given = [value] if not action.option_strings else [f"{action.option_strings[-1]}={value}"]
    return (OVERHEAD_PARSER if cmd == OVERHEAD else ROOT).parse_args(before + given + after)


def assert_refused(cmd: str, action: argparse.Action, value: str, tmp: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(cmd, action, value, tmp)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert f"argument {option_name(action)}: expected " in line, line
    assert f"found {value!r}"[:40] in line, line  # a long value is shown by its start and end
    return line


def zero_is_valid(t: OptionType) -> bool:
    if isinstance(t, ListOf):
        t = t.item
    if isinstance(t, Choice):
        return 0 in t.choices
    if isinstance(t, FloatRange):
        return t.lo <= 0 <= t.hi and not (t.lo == 0 and t.lo_open)
    return t.lo <= 0 <= t.hi and 0 % t.multiple_of == 0


def _id(cmd: str, a: argparse.Action) -> str:
    return f"{cmd.replace(' ', '-')}:{option_name(a)}"


# --- the walk ---------------------------------------------------------------------------------------------------

def test_the_walk_sees_every_subcommand() -> None:
    commands = {cmd for cmd, _ in PARSERS}
    assert {"demo", "report", "anatomy", "bench weights", "bench quant", "bench memory", "bench batch", "bench peers", "bench prior",
            "reuse", "pack", "verify", "unpack", "library", OVERHEAD} <= commands
    assert len(NUMERIC) > 40 and len(PATHS) > 20


def test_every_value_option_has_a_checked_type() -> None:
    assert unchecked_options(PARSERS) == []
    # the free-text list names only options that exist, so it cannot hide a renamed one
    present = {(cmd, option_name(a)) for cmd, p in PARSERS for a in value_actions(p)}
    assert FREE_TEXT <= present


def test_the_walk_catches_a_new_unchecked_option() -> None:
    # The rule above passes on a clean tree; show that it sees a plain int, float or str option when one is added.
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    sub.add_argument("--new-count", type=int, default=3)
    sub.add_argument("--new-share", type=float, default=0.5)
    sub.add_argument("--new-path", default=None)
    assert unchecked_options(list(leaf_parsers(parser))) == ["demo --new-count", "demo --new-share", "demo --new-path"]


def test_every_range_is_bounded_and_holds_its_default() -> None:
    for cmd, a in NUMERIC:
        item = a.type.item if isinstance(a.type, ListOf) else a.type
        if isinstance(item, (IntRange, FloatRange)):
            assert 0 <= item.lo < item.hi < math.inf, _id(cmd, a)
        if a.default is not None:  # argparse runs a string default through the type; numbers must already fit
            text = a.default if isinstance(a.default, str) else str(a.default)
            assert a.type(text) is not None, _id(cmd, a)


def test_the_spelled_out_choices_match_the_code_they_stand_for() -> None:
    from prompt_fragments.bench.quant import FORMATS, SCOPES
    from prompt_fragments.fragment.settings import LOW_BIT_BITS as BITS, LOW_BIT_GROUPS as GROUPS

    assert (QUANT_FORMATS, QUANT_SCOPES, LOW_BIT_BITS, LOW_BIT_GROUPS) == (tuple(FORMATS), tuple(SCOPES), BITS, GROUPS)


# --- every numeric option -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,action", NUMERIC, ids=[_id(c, a) for c, a in NUMERIC])
def test_numeric_option_refuses_what_is_outside_its_range(cmd: str, action: argparse.Action, tmp_path: Path, capsys) -> None:
    t = action.type
    refused = ["-1", str(10 ** 30), "abc", "nan", "inf", "-inf", "1e999", "", " "]
    if not zero_is_valid(t):
        refused.append("0")
    for value in refused:
        assert_refused(cmd, action, value, tmp_path, capsys)
    item = t.item if isinstance(t, ListOf) else t
    if isinstance(item, IntRange):
        for value in (item.lo - 1, item.hi + 1, "2.5"):
            assert_refused(cmd, action, str(value), tmp_path, capsys)
        good = [item.lo, item.hi]
        if item.multiple_of > 1:
            assert_refused(cmd, action, str(item.lo + 1), tmp_path, capsys)
    elif isinstance(item, FloatRange):
        assert_refused(cmd, action, str(item.hi + 0.001), tmp_path, capsys)
        assert_refused(cmd, action, str(item.lo - 0.001), tmp_path, capsys)
        if item.hi_open:
            assert_refused(cmd, action, str(item.hi), tmp_path, capsys)
        good = [item.lo, (item.lo + item.hi) / 2]
    else:
        assert_refused(cmd, action, "not-a-choice", tmp_path, capsys)
        good = [item.choices[0], item.choices[-1]]
    if isinstance(t, ListOf):
        for value in (f"{good[0]},", f",{good[0]}", f"{good[0]},,{good[1]}", ",".join([str(good[0])] * 65)):
            assert_refused(cmd, action, value, tmp_path, capsys)
        args = parse(cmd, action, f"{good[0]}, {good[1]}", tmp_path)
        assert getattr(args, action.dest) == tuple(good)
    else:
        for value in good:
            assert getattr(parse(cmd, action, str(value), tmp_path), action.dest) == value
    if zero_is_valid(t):
        assert parse(cmd, action, "0", tmp_path) is not None


# --- every path option --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd,action", PATHS, ids=[_id(c, a) for c, a in PATHS])
def test_path_option_refuses_the_wrong_kind_of_path(cmd: str, action: argparse.Action, tmp_path: Path, capsys) -> None:
    kind = action.type.kind
    missing, a_file, a_folder = tmp_path / "missing" / "thing", tmp_path / "a-file", tmp_path / "a-folder"
    base_argv(cmd, tmp_path)  # makes a-file and a-folder
    wrong = {"file": [missing, a_folder], "folder": [missing, a_file], "new-folder": [a_file], "out-file": [a_folder]}[kind]
    for path in wrong:
        line = assert_refused(cmd, action, str(path), tmp_path, capsys)
        assert str(path) in line
    for value in ("", "bad\0name"):
        assert_refused(cmd, action, value, tmp_path, capsys)
    right = {"file": a_file, "folder": a_folder, "new-folder": missing, "out-file": missing}[kind]
    assert getattr(parse(cmd, action, str(right), tmp_path), action.dest) == str(right)


def test_verify_base_takes_a_file_or_the_word_demo(tmp_path: Path, capsys) -> None:
    parser = build_parser()
    (tmp_path / "p").write_text("x")
    assert parser.parse_args(["verify", str(tmp_path / "p"), "--base", "demo"]).base == "demo"
    with pytest.raises(SystemExit):
        parser.parse_args(["verify", str(tmp_path / "p"), "--base", "dem0"])
    assert "argument --base: expected an existing file or 'demo', found 'dem0' (no such file)" in capsys.readouterr().err


# --- the findings, through main(): exit 2, one line, nothing written ------------------------------------------

def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv,option", [
    (["demo", "--steps", "0"], "--steps"),                       # was ZeroDivisionError
    (["demo", "--steps", str(10 ** 12)], "--steps"),             # was ValueError
    (["demo", "--steps", "10^12"], "--steps"),
    (["demo", "--variants", "-1"], "--variants"),                # was ValueError
    (["bench", "memory", "--arch", "tiny", "--size", "0"], "--size"),    # was RuntimeError
    (["bench", "memory", "--arch", "tiny", "--batch", "-1"], "--batch"),  # was RuntimeError
    (["bench", "memory", "--arch", "tiny", "--size", "12"], "--size"),
    (["bench", "weights", "--arch", "tiny", "--heads", "2", "--out", "{tmp}/w.json"], "--heads"),
    (["bench", "batch", "--model", "sd15", "--size", "12", "--out", "{tmp}/b.json"], "--size"),
    (["bench", "peers", "--tome-ratios", "0.3,1.5", "--out", "{tmp}/p.json"], "--tome-ratios"),
    (["bench", "quant", "--groups", "64,7", "--out", "{tmp}/q.json"], "--groups"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_the_findings_exit_2_naming_the_option_and_write_nothing(argv: list[str], option: str, tmp_path: Path,
                                                                 capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # demo's default --out (outputs/demo) would land here
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "demo":
        argv += ["--out", str(tmp_path / "demo"), "--no-progress", "--no-curve", "--paraphrases", "0", "--seeds", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prompt-fragments: error: {argv[0]}"), err  # one line, like every error
    assert f"argument {option}: expected" in err[0] and "found" in err[0], err[0]
    assert snapshot(tmp_path) == {}, "an invalid option wrote files"


def test_reuse_with_negative_steps_leaves_the_manifest_byte_identical(tmp_path: Path, capsys) -> None:
    # On e89ab0b `reuse --steps -5` printed "H3 reuse pass rate: 1.000" and recorded it; now argparse refuses the
    # option before the manifest is even read (so any fragment shows it; no reference-model fragment is needed).
    folder = tmp_path / "fragments"
    manifest = save_fragment(synthetic("reusedog"), folder)
    before = snapshot(folder)
    for bad in (["--steps", "-5"], ["--steps", "0"], ["--seeds", "0"], ["--seeds", "-1"]):
        assert main(["reuse", str(manifest), "--paraphrase", "top-left: a crimson disc on white", *bad]) == 2
        out, err = capsys.readouterr()
        assert "pass rate" not in out and f"argument {bad[0]}: expected an integer" in err
        assert snapshot(folder) == before


def test_reference_reuse_and_sample_refuse_a_step_count_they_cannot_make(tmp_path: Path) -> None:
    # The library calls under the CLI check too: a figure from -5 steps was recorded as a 1.000 pass rate.
    import torch

    from prompt_fragments.reference.reuse import reference_reuse
    from prompt_fragments.reference.sampling import check_steps, sample

    manifest = save_fragment(synthetic("stepsdog"), tmp_path)
    before = snapshot(tmp_path)
    for steps in (-5, 0, 1001, 2.5, True, "25"):
        with pytest.raises(FragmentError, match=r"steps: expected an integer in 1\.\.1000, found"):
            reference_reuse(str(manifest), ["x"], seeds=[0], steps=steps)
    with pytest.raises(FragmentError, match="seeds: expected at least one seed, found none"):
        reference_reuse(str(manifest), ["x"], seeds=[], steps=5)
    assert snapshot(tmp_path) == before
    unet = torch.nn.Linear(2, 2)
    with pytest.raises(FragmentError, match="sample: steps: expected an integer in 1..1000, found 0"):
        sample(unet, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), [0], steps=0)
    assert check_steps(torch.tensor(7).item()) == 7


def test_library_evict_to_refused_before_the_index_is_touched(tmp_path: Path, capsys) -> None:
    from prompt_fragments.fragment.library import index as library

    library.add(tmp_path, synthetic("keep"), embedding=emb(1), prompt="keep")
    before = snapshot(tmp_path)
    for bad in ("-5", "1e3", str(2 ** 63)):
        assert main(["library", str(tmp_path), "--evict-to", bad]) == 2
        assert "argument --evict-to: expected an integer in 0..9223372036854775807" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_main_returns_the_status_and_help_still_exits_0(capsys) -> None:
    assert main(["bench", "memory", "--help"]) == 0
    assert "--size" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2
