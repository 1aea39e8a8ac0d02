"""Every reason the captured prefill refuses a method, a family or a prompt comes from llava.fast.refusals: the
static ones from the family's record, the decoder's attention, the method's Needs and its own reason
(Needs.capture), each string exactly as the evaluation's per-reason counts read it."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from llava.families import registry
from llava.fast import refusals
from llava.fast.refusals import NotPlanned, captured_refusal
from llava.method import get_method
from llava.models import load
from llava.needs import Needs, TowerRead


def _adapter(linear=frozenset(), tower_attn="sdpa"):
    tower = SimpleNamespace(config=SimpleNamespace(_attn_implementation=tower_attn))
    return SimpleNamespace(pixel_keys=("pixel_values",), linear_layers=linear, tower_for=lambda key: tower)


LLAVA = registry.get("llava")


def test_the_static_reasons_in_their_order():
    n = Needs(method="m", capture_kind="full")
    assert captured_refusal(n, LLAVA, _adapter(), "sdpa") is None
    off = replace(LLAVA, fast=False, fast_reason="no plan yet")
    assert captured_refusal(n, off, _adapter(), "sdpa") == "the fast path does not plan llava models: no plan yet"
    assert captured_refusal(n, LLAVA, _adapter(), "eager") == (
        "the fast path's masks are SDPA's (boolean); this decoder runs 'eager' attention: load with "
        "attn_implementation='sdpa'")
    tower = replace(n, tower_stage=True)
    assert captured_refusal(tower, LLAVA, _adapter(), "sdpa") == (
        "m: its in-tower stage has no masked variant (select_tower_masked): in-tower stages are captured through "
        "the masked tower only")
    masked = replace(tower, tower_masked=True)
    assert captured_refusal(masked, LLAVA, _adapter(), "sdpa") is None
    for signals in (replace(masked, tower_attention=True), replace(masked, tower_reads=(TowerRead("received", 3),))):
        assert captured_refusal(signals, LLAVA, _adapter(), "sdpa") == \
            "m: an in-tower stage with vision attention signals is not captured"
    assert captured_refusal(masked, LLAVA, _adapter(tower_attn="flash_attention_2"), "sdpa").startswith(
        "m: the masked tower needs ")
    hybrid = _adapter(linear=frozenset({0, 2}))
    assert captured_refusal(n, LLAVA, hybrid, "sdpa") is None  # a pre-LLM method on a hybrid decoder
    for staged in (replace(n, llm_layers=(2,)), replace(n, probe_layers=(1,))):
        assert captured_refusal(staged, LLAVA, hybrid, "sdpa") == (
            "m: llm stages or an LLM probe on a hybrid decoder (Gated DeltaNet layers) are not captured (the fast "
            "path runs Qwen3.5 with pre-LLM methods)")
    piece = replace(n, capture_kind="piecewise")
    assert captured_refusal(piece, LLAVA, _adapter(), "sdpa") is None
    assert captured_refusal(replace(piece, llm_layers=(2,)), LLAVA, _adapter(), "sdpa") == \
        "m: llm stages after a piecewise (data-dependent) vision stage are not captured yet"
    assert captured_refusal(replace(piece, query_aware=True), LLAVA, _adapter(), "sdpa") == \
        "m: a query-aware piecewise vision stage is not captured yet"
    # the method's own reason, named with the method when it does not say it
    assert captured_refusal(replace(n, capture="mine"), LLAVA, _adapter(), "sdpa") == "m: mine"
    assert captured_refusal(replace(n, capture="m: mine"), LLAVA, _adapter(), "sdpa") == "m: mine"


def test_the_method_s_own_reason_travels_in_its_needs():
    m = get_method("otprune", 4, order="official")
    assert m.needs().capture == m.capture_refusal() and m.needs().capture.startswith("otprune: order='official'")
    assert get_method("otprune", 4).needs().capture is None
    assert get_method("prumerge", None).needs().capture_kind == "piecewise"


def test_an_engine_takes_its_refusal_from_the_needs():
    rt = load("tiny:qwen3.5", seed=1, fast=True, fast_precompile=False)
    eng = rt.prune("apet", 6)
    assert eng.fast.refusal == captured_refusal(eng.needs, registry.get("qwen3_5"), eng.adapter, "sdpa")
    assert eng.fast.refusal.startswith("apet: llm stages or an LLM probe on a hybrid decoder")
    eng = rt.prune("random", 4)
    assert eng.fast.refusal is None and eng.fast.refusal_for(None, {}) is None
    eng.replay = True
    assert eng.fast.refusal_for(None, {}, eng.replay) == refusals.REPLAY


@pytest.mark.parametrize("reason, text", [
    (refusals.several_runs(1, "image", 16), "row 1 does not hold exactly one image run of 16 contiguous placeholder "
                                            "tokens (several images / videos per prompt run on the eager engine)"),
    (refusals.positions(ValueError("bad grid")), "the prompt's positions could not be planned (ValueError: bad grid)"),
    (refusals.kept_positions("m"), "m: kept positions (M-RoPE) are planned for the one-graph prefill of the visual "
                                   "tokens themselves (no extra [CLS] candidates, no piecewise count)"),
    (refusals.selection("m", RuntimeError("x")), "m: its selection could not be planned on the host (RuntimeError: x)"),
    (refusals.piecewise_stages("m"), "m: llm stages after a piecewise vision stage are not planned"),
    (refusals.probe_deepstack("m"), "m: an LLM probe on a model with DeepStack rows (Qwen3-VL) is not planned"),
])
def test_the_per_prompt_reasons(reason, text):
    assert isinstance(reason, NotPlanned) and str(reason) == text
