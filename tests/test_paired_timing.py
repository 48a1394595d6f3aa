"""Tier 1: paired timing (bench.paired) on a fake clock: the rotation, the per-unit ratios, the median and range,
and the errors for bad input.  No real timing is asserted."""
from __future__ import annotations

import pytest

from prompt_fragments.bench.paired import paired_timing, rotated_order
from prompt_fragments.errors import FragmentError


class FakeClock:
    """A clock that only moves when a method runs: each call advances it by that method's next duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []
        self.syncs = 0

    def __call__(self) -> float:
        return self.now

    def method(self, name: str, durations: list[float]):
        pending = list(durations)

        def run() -> None:
            self.calls.append(name)
            self.now += pending.pop(0)
        return run

    def sync(self) -> None:
        self.syncs += 1


def test_rotation_ratios_median_and_range() -> None:
    clock = FakeClock()
    # the load changes across units: stock itself takes 2, 4, then 3 s; each ratio is taken within its unit
    methods = {"stock": clock.method("stock", [2.0, 4.0, 3.0]),
               "a": clock.method("a", [1.0, 1.0, 3.0]),
               "b": clock.method("b", [4.0, 2.0, 1.0])}
    t = paired_timing(methods, units=3, clock=clock, sync=clock.sync)
    expected_order = [["stock", "a", "b"], ["a", "b", "stock"], ["b", "stock", "a"]]
    assert t["order"] == expected_order
    assert clock.calls == [name for unit in expected_order for name in unit]
    assert clock.syncs == 2 * 9  # before and after every call
    assert t["units"] == 3 and t["reference"] == "stock"
    assert t["seconds"] == {"stock": [2.0, 4.0, 3.0], "a": [1.0, 1.0, 3.0], "b": [4.0, 2.0, 1.0]}
    assert t["ratios"]["stock"] == [1.0, 1.0, 1.0]
    assert t["ratios"]["a"] == [2.0, 4.0, 1.0] and t["ratios"]["b"] == [0.5, 2.0, 3.0]
    assert t["median"] == {"stock": 1.0, "a": 2.0, "b": 2.0}
    assert t["range"] == {"stock": [1.0, 1.0], "a": [1.0, 4.0], "b": [0.5, 3.0]}


def test_an_even_number_of_units_takes_the_middle_pair_s_mean_and_any_method_may_be_the_reference() -> None:
    clock = FakeClock()
    methods = {"fast": clock.method("fast", [1.0, 1.0, 1.0, 1.0]),
               "stock": clock.method("stock", [2.0, 3.0, 5.0, 1.0])}
    t = paired_timing(methods, units=4, reference="stock", clock=clock)
    assert [unit[0] for unit in t["order"]] == ["fast", "stock", "fast", "stock"]  # unit k starts at method k mod 2
    assert t["ratios"]["fast"] == [2.0, 3.0, 5.0, 1.0]
    assert t["median"]["fast"] == 2.5 and t["range"]["fast"] == [1.0, 5.0]
    clock = FakeClock()
    methods = {"stock": clock.method("stock", [3.0]), "slow": clock.method("slow", [6.0])}
    t = paired_timing(methods, units=1, reference="slow", clock=clock)
    assert t["ratios"] == {"stock": [2.0], "slow": [1.0]} and t["range"]["stock"] == [2.0, 2.0]


def test_rotated_order() -> None:
    assert [rotated_order(["s", "a", "b"], k) for k in range(4)] == [["s", "a", "b"], ["a", "b", "s"],
                                                                   ["b", "s", "a"], ["s", "a", "b"]]
    with pytest.raises(FragmentError, match="at least one method"):
        rotated_order([], 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"units": 0}, "units: expected an integer >= 1, found 0"),
    ({"units": -2}, "units: expected an integer >= 1, found -2"),
    ({"units": 1.5}, "units: expected an integer >= 1, found 1.5"),
    ({"reference": "nope"}, r"reference: expected one of the methods \(stock, a\), found 'nope'"),
])
def test_bad_input_is_a_fragment_error_saying_where_and_what(kwargs, message) -> None:
    with pytest.raises(FragmentError, match=message) as err:
        paired_timing({"stock": lambda: None, "a": lambda: None}, **kwargs)
    assert "bench.paired paired_timing" in str(err.value)


def test_no_methods_and_a_clock_that_does_not_move_are_errors() -> None:
    with pytest.raises(FragmentError, match="methods: expected at least one method, found none"):
        paired_timing({})
    with pytest.raises(FragmentError, match=r"method 'stock', unit 0: expected a positive duration"):
        paired_timing({"stock": lambda: None}, clock=lambda: 1.0)


@pytest.mark.parametrize("field, value, message", [
    ("paired_units", -1, "paired_units: expected an integer >= 0 (0: no paired timing), found -1"),
    ("paired_seeds", 0, "paired_seeds: expected an integer >= 1, found 0"),
])
def test_the_batch_bench_config_refuses_bad_paired_settings(field, value, message) -> None:
    from prompt_fragments.bench.batch import BenchConfig

    with pytest.raises(FragmentError, match=r"bench config " + message.replace("(", r"\(").replace(")", r"\)")):
        BenchConfig(**{field: value})
    assert BenchConfig(paired_units=0).paired_units == 0  # 0 turns it off
