"""A method's options declared once (llava/options.py): an Option's default and the values it takes, checked when
the method is built with one message shape and a spelling hint; the listing ``python -m llava.cli methods NAME``
from the same declaration; ConsensusDrop's former hand-written choice checks now declared, with the same messages."""

import pytest

from llava.cli import main
from llava.method import Method, get_method
from llava.options import Option, apply, defaults, describe


def test_an_option_says_what_is_wrong_with_a_value():
    choice = Option("mean", ("mean", "max"))
    assert choice.problem("max") is None
    assert choice.problem("sum") == "must be one of ('mean', 'max'), got 'sum'"  # no close name: no hint
    assert choice.problem("maxx") == "must be one of ('mean', 'max'), got 'maxx' (did you mean 'max'?)"
    assert choice.problem(None) == "must be one of ('mean', 'max'), got None"  # None is no choice here
    assert Option(None, ("cover", "probe"), none=True).problem(None) is None
    assert Option("a", ("a", "b"), none=True).problem("c") == "must be None or one of ('a', 'b'), got 'c'"
    num = Option(1.0, types=(float,), at_least=0)
    assert num.problem(2) is None and num.problem(0.0) is None  # an int where a float is taken
    assert num.problem(-0.5) == "must be >= 0, got -0.5"
    assert num.problem("1") == "must be a float, got '1'"
    assert num.problem(True) == "must be a float, got True"  # never a bool for a number
    count = Option(None, types=(int,))
    assert count.problem(None) is None and count.problem(3) is None and count.problem(2.5) == "must be an int, got 2.5"
    assert Option(True, types=(bool,)).problem(1) == "must be a bool, got 1"


class _Opts(Method):
    name = "opts_outside"

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(), "agg": Option("mean", ("mean", "max"), doc="over heads"),
                "ratio": Option(0.5, types=(float,), at_least=0), "plain": [1, 2]}


def test_apply_sets_the_defaults_and_checks_each_declared_option():
    m = _Opts(4)
    assert (m.agg, m.ratio, m.plain) == ("mean", 0.5, [1, 2])
    assert m.config() == {"method": "opts_outside", "budget": 4, "position_mode": "keep", "agg": "mean",
                          "ratio": 0.5, "plain": [1, 2]}
    assert defaults(_Opts.option_defaults()) == {"position_mode": "keep", "agg": "mean", "ratio": 0.5, "plain": [1, 2]}
    with pytest.raises(ValueError, match=r"^opts_outside: agg must be one of \('mean', 'max'\), got 'sum'$"):
        _Opts(4, agg="sum")
    with pytest.raises(ValueError, match=r"^opts_outside: ratio must be >= 0, got -1$"):
        _Opts(4, ratio=-1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['agj'\] \(did you mean 'agg'\?\)"):
        _Opts(4, agj="max")
    m = object.__new__(_Opts)
    apply(m, {"plain": "anything"})  # a plain default takes any value, as before
    assert m.plain == "anything" and m.agg == "mean"


def test_the_listing_comes_from_the_declaration(capsys):
    assert describe(_Opts.option_defaults()) == [
        "position_mode = 'keep'", "agg = 'mean'  [one of ('mean', 'max')]  over heads",
        "ratio = 0.5  [float, >= 0]", "plain = [1, 2]"]
    assert main(["methods", "consensusdrop"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "fusion = 'borda'  [one of ('rrf', 'borda', 'product', 'max', 'adaptive', 'encoder_only', " \
           "'cross_only')]" in out
    assert out[0] == "position_mode = 'keep'" and len(out) == len(get_method("consensusdrop", 8).config()) - 2
    assert main(["methods", "consensusdrp"]) == 2
    assert "unknown method 'consensusdrp' (did you mean 'consensusdrop'?)" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,allowed", [
    ("fusion", "bord", "('rrf', 'borda', 'product', 'max', 'adaptive', 'encoder_only', 'cross_only')"),
    ("merge", "zip", "('visionzip', 'none')"),
    ("probe_queries", "first", "('question', 'all_post_image', 'last')"),
    ("select", "top", "('rank', 'maxmin', 'dpp', 'nms')"),
    ("contextual_rounding", "ceil", "('round', 'floor')"),
])
def test_consensusdrop_refuses_a_choice_it_does_not_have_as_before(option, value, allowed):
    with pytest.raises(ValueError) as e:
        get_method("consensusdrop", 8, **{option: value})
    assert str(e.value).startswith(f"consensusdrop: {option} must be one of {allowed}, got {value!r}")
