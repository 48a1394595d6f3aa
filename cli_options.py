"""Checked option types for the ``prompt-fragments`` command line (issue #29): every number in a range, every path looked at.

argparse calls an option's ``type`` on its text and turns an ``ArgumentTypeError`` into one line
naming the option (``OneLineParser``), ``prompt-fragments: error: bench memory: argument --size:
expected an integer in 8..8192, a multiple of 8, found '0' (see prompt-fragments bench memory --help)``,
and exit status 2, before any command runs: no figure is ever computed, printed or recorded from an
option outside its range.

Each factory returns a callable object that also carries what it expects (``expected``) and, for
numbers, its bounds (``lo``, ``hi``), so the tests can check every option of every subcommand
against its own declared range.

>>> steps = int_range(1, 1000)
>>> steps("25"), steps.expected
(25, 'an integer in 1..1000')
>>> fraction(hi_open=True)("0.3")
0.3
>>> int_list(0, 11)("0,2,3")
(0, 2, 3)
"""
from __future__ import annotations

import abc
import argparse
import functools
import math
import os
import re
from pathlib import Path
from typing import Any, NoReturn, Sequence

# Large enough for any real use of a byte count, small enough for SQLite's signed 64-bit integers.
MAX_BYTES = 2 ** 63 - 1
MAX_SEED = 2 ** 32 - 1  # numpy's and most samplers' seed range


def _found(text: Any, limit: int = 200) -> str:
    # a hostile or mistyped value can be huge: show its start and its end (a path's end names the file)
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit // 2] + "..." + shown[-(limit // 2):]


class OptionType(abc.ABC):
    """Base of the checked types: ``expected`` says in words what the option takes; each subclass parses."""

    expected = "a value"
    __name__ = "value"  # argparse names the type in some messages; keep it readable

    def fail(self, text: Any, why: str = "") -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"expected {self.expected}, found {_found(text)}{f' ({why})' if why else ''}")

    @abc.abstractmethod
    def __call__(self, text: str) -> Any:
        """The parsed value of ``text``, or ``self.fail(text)`` raised."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.expected})"


class IntRange(OptionType):
    """An integer in ``lo..hi`` (both included), optionally a multiple of ``multiple_of``."""

    __name__ = "integer"

    def __init__(self, lo: int, hi: int, multiple_of: int = 1) -> None:
        self.lo, self.hi, self.multiple_of = lo, hi, multiple_of
        self.expected = f"an integer in {lo}..{hi}" + (f", a multiple of {multiple_of}" if multiple_of > 1 else "")

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise self.fail(text) from None
        if not self.lo <= value <= self.hi or value % self.multiple_of:
            raise self.fail(text)
        return value


class FloatRange(OptionType):
    """A finite number in ``[lo, hi]``; ``lo_open``/``hi_open`` leave that end out."""

    __name__ = "number"

    def __init__(self, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.expected = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def __call__(self, text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise self.fail(text) from None
        inside = (self.lo < value if self.lo_open else self.lo <= value) and (value < self.hi if self.hi_open else value <= self.hi)
        if not math.isfinite(value) or not inside:
            raise self.fail(text)
        return value


class ListOf(OptionType):
    """A comma-separated, non-empty list of ``item`` values, returned as a tuple."""

    def __init__(self, item: OptionType, max_items: int = 64) -> None:
        self.item, self.max_items = item, max_items
        self.__name__ = f"list of {item.__name__}s"
        self.expected = f"a comma-separated list of 1..{max_items} values, each {item.expected}"

    @property
    def lo(self) -> Any:
        return getattr(self.item, "lo", None)

    @property
    def hi(self) -> Any:
        return getattr(self.item, "hi", None)

    def __call__(self, text: str) -> tuple[Any, ...]:
        parts = [p.strip() for p in str(text).split(",")]
        if not 1 <= len(parts) <= self.max_items or any(not p for p in parts):
            raise self.fail(text)
        out = []
        for part in parts:
            try:
                out.append(self.item(part))
            except argparse.ArgumentTypeError:
                raise self.fail(text, f"{part!r} is not {self.item.expected}") from None
        return tuple(out)


class Choice(OptionType):
    """One of ``choices`` (for list items; a plain option uses argparse's own ``choices``)."""

    __name__ = "choice"

    def __init__(self, choices: Sequence[Any], convert: Any = str) -> None:
        self.choices, self.convert = tuple(choices), convert
        self.expected = f"one of {', '.join(map(str, self.choices))}"

    def __call__(self, text: str) -> Any:
        try:
            value = self.convert(text)
        except (TypeError, ValueError):
            raise self.fail(text) from None
        if value not in self.choices:
            raise self.fail(text)
        return value


class PathOption(OptionType):
    """A path given as text (returned unchanged, as ``str``), checked for what must already be there.

    ``kind``: ``"file"`` an existing regular file; ``"folder"`` an existing folder; ``"new-folder"`` a
    folder or a path not there yet (never an existing file); ``"out-file"`` a file or a path not
    there yet (never a folder).  ``keywords`` are words accepted as they are (``--base demo``).
    """

    __name__ = "path"
    _EXPECTED = {"file": "an existing file", "folder": "an existing folder",
                 "new-folder": "a folder path (an existing folder or a new one)",
                 "out-file": "a file path to write (not a folder)"}

    def __init__(self, kind: str, keywords: Sequence[str] = ()) -> None:
        if kind not in self._EXPECTED:
            raise ValueError(f"PathOption: kind: expected one of {sorted(self._EXPECTED)}, found {kind!r}")
        self.kind, self.keywords = kind, tuple(keywords)
        self.expected = self._EXPECTED[kind] + "".join(f" or {k!r}" for k in self.keywords)

    def __call__(self, text: str) -> str:
        if text in self.keywords:
            return text
        if not isinstance(text, str) or not text.strip():
            raise self.fail(text, "empty")
        if "\0" in text:
            raise self.fail(text, "a NUL character")
        path = Path(os.path.expanduser(text))
        try:
            exists, is_dir, is_file = path.exists(), path.is_dir(), path.is_file()
        except OSError as exc:  # e.g. a name too long for the file system
            raise self.fail(text, exc.strerror or type(exc).__name__) from None
        if self.kind == "file" and not is_file:
            raise self.fail(text, "a folder" if is_dir else "not a regular file" if exists else "no such file")
        if self.kind == "folder" and not is_dir:
            raise self.fail(text, "a file" if exists else "no such folder")
        if self.kind == "new-folder" and exists and not is_dir:
            raise self.fail(text, "a file is there")
        if self.kind == "out-file" and is_dir:
            raise self.fail(text, "a folder is there")
        return text


class Device(OptionType):
    """A torch device name: ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (checked as text: parsing imports no torch)."""

    __name__ = "device"
    expected = "a device: cpu, cuda, cuda:N or mps"
    _PATTERN = re.compile(r"cpu|mps|cuda(:\d{1,3})?")

    def __call__(self, text: str) -> str:
        if not isinstance(text, str) or not self._PATTERN.fullmatch(text):
            raise self.fail(text)
        return text


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit status 2, like the commands' own errors.

    ``prompt-fragments: error: bench memory: argument --size: expected an integer in 8..8192, a multiple
    of 8, found '0' (see --help)``: the program, the subcommand, the option, what it expects and what it
    found.  Its subparsers are OneLineParsers that know the program's name.

    >>> parser = OneLineParser(prog="tool")
    >>> _ = parser.add_subparsers().add_parser("run").add_argument("--n", type=int_range(1, 9))
    >>> parser.parse_args(["run", "--n", "0"])
    Traceback (most recent call last):
    SystemExit: 2
    """

    def __init__(self, *args: Any, program: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.program = program or self.prog

    def add_subparsers(self, **kwargs: Any) -> Any:
        kwargs.setdefault("parser_class", functools.partial(OneLineParser, program=self.program))
        return super().add_subparsers(**kwargs)

    def error(self, message: str) -> NoReturn:
        command = self.prog[len(self.program):].strip() if self.prog.startswith(self.program) else ""
        self.exit(2, f"{self.program}: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def int_range(lo: int, hi: int, *, multiple_of: int = 1) -> IntRange:
    """An integer option in ``lo..hi``.

    >>> int_range(8, 64, multiple_of=8)("16")
    16
    """
    return IntRange(lo, hi, multiple_of)


def float_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> FloatRange:
    """A finite number option in ``[lo, hi]`` (an end left out with ``lo_open``/``hi_open``).

    >>> float_range(0, 50)("7.5")
    7.5
    """
    return FloatRange(lo, hi, lo_open, hi_open)


def fraction(*, hi_open: bool = False) -> FloatRange:
    """A share in ``[0, 1]``, or ``[0, 1)`` with ``hi_open``.

    >>> fraction()("1")
    1.0
    """
    return FloatRange(0.0, 1.0, False, hi_open)


def int_choice(choices: Sequence[int]) -> Choice:
    """An integer among ``choices``.

    >>> int_choice([3, 4])("4")
    4
    """
    return Choice(choices, int)


def int_list(lo: int, hi: int, *, choices: Sequence[int] | None = None) -> ListOf:
    """A comma-separated list of integers in ``lo..hi`` (or among ``choices``).

    >>> int_list(1, 100)("2,3")
    (2, 3)
    """
    return ListOf(Choice(choices, int) if choices is not None else IntRange(lo, hi))


def float_list(lo: float, hi: float, *, hi_open: bool = False) -> ListOf:
    """A comma-separated list of finite numbers in ``[lo, hi]`` (``[lo, hi)`` with ``hi_open``).

    >>> float_list(0, 1000)("500,350")
    (500.0, 350.0)
    """
    return ListOf(FloatRange(lo, hi, False, hi_open))


def choice_list(choices: Sequence[str]) -> ListOf:
    """A comma-separated list of words among ``choices``.

    >>> choice_list(["all", "linear"])("linear")
    ('linear',)
    """
    return ListOf(Choice(choices))


def existing_file(*, keywords: Sequence[str] = ()) -> PathOption:
    """An existing regular file (or one of ``keywords``), returned as given.

    >>> existing_file(keywords=["demo"])("demo")
    'demo'
    """
    return PathOption("file", keywords)


def existing_folder() -> PathOption:
    """An existing folder, returned as given.

    >>> existing_folder()(".")
    '.'
    """
    return PathOption("folder")


def folder_path() -> PathOption:
    """A folder to write into: an existing folder or a path not there yet, never a file.

    >>> folder_path()("no/such/folder/yet")
    'no/such/folder/yet'
    """
    return PathOption("new-folder")


def out_file() -> PathOption:
    """A file to write: an existing file or a path not there yet, never a folder.

    >>> out_file()("report.json")
    'report.json'
    """
    return PathOption("out-file")


def device() -> Device:
    """A torch device name, checked without importing torch.

    >>> device()("cuda:0")
    'cuda:0'
    """
    return Device()


# The ranges the subcommands share.  Steps: DDIM over the 1000 training timesteps of SD and the reference model.
STEPS = int_range(1, 1000)
SEEDS = int_range(1, 256)  # a count of profiled / held-out / timed seeds (the demo's held-out seeds start at 500)
VARIANTS = int_range(1, 10_000)
BUDGET = int_range(1, 100_000)  # judged images
FRESH_SEEDS = int_range(0, 1024)  # the fresh-seed check's seeds (0: not run)
SEED = int_range(0, MAX_SEED)
LATENT_SIZE = int_range(8, 256, multiple_of=8)  # SD1.5 latents: three 2x downsamplings
