"""Gate and select parsing/checking (pure), and the validate block's recipe checks."""

from __future__ import annotations

import pytest

from weightx.errors import RecipeError
from weightx.recipe.model import load_recipe
from weightx.recipe.gates import check, lookup, parse_gate, parse_select

RESULTS = {
    "output": {"weightx_mc": {"acc": {"value": 0.50, "stderr": 0.1}},
               "weightx_gen": {"exact_match": {"value": 0.2, "stderr": 0.05, "filter": "first_word"}}},
    "dpo": {"weightx_mc": {"acc": {"value": 0.48, "stderr": 0.1}},
            "weightx_gen": {"exact_match": {"value": 0.3, "stderr": 0.05, "filter": "first_word"}}},
}


@pytest.mark.parametrize("expr, op, ref, offset", [
    (">= dpo - 0.01", ">=", "dpo", -0.01),
    (">=dpo+0.5", ">=", "dpo", 0.5),
    ("<= sft", "<=", "sft", 0.0),
    ("> 0.25", ">", None, 0.25),
    ("== 1e-3", "==", None, 0.001),
    (0.4, ">=", None, 0.4),
    ("!= my-model.v2 + 1", "!=", "my-model.v2", 1.0),
])
def test_parse_gate(expr, op, ref, offset):
    g = parse_gate("weightx_mc/acc", expr)
    assert (g.op, g.ref, g.offset, g.task, g.metric) == (op, ref, pytest.approx(offset), "weightx_mc", "acc")


@pytest.mark.parametrize("key, expr", [("acc", ">= 1"), ("weightx_mc/acc", "at least 1"), ("weightx_mc/acc", ">="),
                                       ("weightx_mc/acc", ">= dpo * 2"), ("weightx_mc/", "> 1"), ("weightx_mc/acc", True)])
def test_parse_gate_rejects(key, expr):
    with pytest.raises(ValueError):
        parse_gate(key, expr)


def test_check_against_numbers_and_aliases():
    gates = [parse_gate("weightx_mc/acc", ">= dpo - 0.01"),  # 0.50 >= 0.47
             parse_gate("weightx_mc/acc", "> dpo + 0.05"),  # 0.50 > 0.53 fails
             parse_gate("weightx_gen/exact_match", "< 0.25"),  # passes
             parse_gate("weightx_gen/exact_match,first_word", ">= dpo")]  # lm-eval's metric,filter form; fails
    res = check(gates, RESULTS)
    assert [r.passed for r in res] == [True, False, True, False]
    assert res[0].threshold == pytest.approx(0.47) and res[0].ref_value == 0.48
    msg = res[1].message()
    assert msg.startswith('gate weightx_mc/acc "> dpo + 0.05" failed: output = 0.5 is not > 0.53') and "dpo = 0.48" in msg


def test_missing_metric_fails_with_what_exists():
    res = check([parse_gate("weightx_mc/accuracy", ">= 0"), parse_gate("nope/acc", ">= 0")], RESULTS)
    assert not any(r.passed for r in res)
    assert "weightx_mc has: acc" in res[0].message()
    assert "tasks evaluated: weightx_mc, weightx_gen" in res[1].message()


def test_lookup_filter_forms():
    out = RESULTS["output"]
    assert lookup(out, "weightx_gen", "exact_match")["value"] == 0.2
    assert lookup(out, "weightx_gen", "exact_match,first_word")["value"] == 0.2
    assert lookup(out, "weightx_gen", "exact_match,other") is None


def test_parse_select():
    assert parse_select("weightx_mc/acc").direction is None
    s = parse_select("min weightx_ppl/word_perplexity")
    assert (s.direction, s.task, s.metric) == ("min", "weightx_ppl", "word_perplexity")
    with pytest.raises(ValueError):
        parse_select("lowest weightx_ppl/word_perplexity")


def _recipe(**validate):
    return {"models": {"sft": "a", "dpo": "b"}, "base": "sft", "deltas": [{"model": "dpo"}],
            "output": {"path": "out"}, "validate": {"tasks": ["weightx_mc"], **validate}}


def test_recipe_checks_gates_when_loaded():
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(require={"weightx_mc/acc": ">= dpo"}))
    assert "not in compare" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(require={"weightx_mc/acc": "better than dpo"}), )
    assert "validate.require" in str(e.value) and "not a condition" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(select="acc", tasks=[]))
    text = str(e.value)
    assert "validate.select" in text and "validate.tasks" in text  # all at once
    r = load_recipe(_recipe(require={"weightx_mc/acc": ">= dpo - 0.01", "weightx_ppl/bits_per_byte": 2.5}, compare=["dpo"]))
    assert r.validate_.require["weightx_ppl/bits_per_byte"] == 2.5
