"""Qwen3.5 (tiny:qwen3.5: Qwen3-VL's tower without DeepStack; a hybrid Qwen3.5 LLM whose layers 0 and 2 are Gated
DeltaNet linear attention and 1 and 3 gated full attention). The generic suites (keep-all, cached == recompute,
batch == alone, static cache, device placement, host syncs) run it through tests/conftest.NEW_FAMILIES, where the
methods refused here are skipped with their reason; this file checks what is hybrid: attention read only at
full-attention layers (exactly the model's), the refusals at attach, and llm stages placed at full-attention
layers with the linear layers' recurrent state consistent (cached generation == no-cache recompute, batch ==
alone)."""

import pytest
import torch
from conftest import greedy_no_cache, make_batch, slice_batch

from llava.engine import HybridRefusal, attach
from llava.method import Method, available_methods, get_method, method_class
from llava.models import load
from llava.selection import Selection

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def rt():
    r = load("tiny:qwen3.5", seed=2)
    yield r
    r.unprune()


def test_the_tiny_model_is_hybrid(rt):
    types = rt.model.config.text_config.layer_types
    assert types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    eng = rt.prune("none")
    assert eng.adapter.linear_layers == frozenset({0, 2}) and eng.adapter.deepstack_levels == 0
    rt.unprune()


def test_llm_attention_rows_at_full_layers_equal_eager_attention(rt):
    """The gated query (per head: query, then output gate) and the per-head q / k norms and partial M-RoPE as the
    model computes them: layer 1 ('prev' of a stage before 2) and layer 3 ('next' of a stage before 3)."""
    inputs = make_batch(rt)
    seen = []

    class Probe(Method):
        name = "hybrid_probe"

        @property
        def llm_layers(self):
            return (2, 3)

        def select_llm(self, stage, sig):
            seen.append(sig.attention("last", "prev") if stage == 0 else sig.attention("visual", "next"))
            return Selection(keep=torch.arange(sig.num_visual))

    with torch.no_grad():
        stock = rt.model(**inputs).logits
    attach(rt.model, Probe(), prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        staged = rt.model(**inputs).logits
    rt.model._pruning_engine.remove()
    real_rows = inputs["attention_mask"].bool()
    assert torch.equal(staged[real_rows], stock[real_rows])  # a keep-all staged prefill is the stock model
    rt.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = rt.model(**inputs, output_attentions=True)
    finally:
        rt.model.set_attn_implementation("sdpa")
    att = out.attentions  # the full-attention layers only: layer 1, layer 3
    assert len(att) == 2
    img = rt.model.config.image_token_id
    for b in range(3):
        real = torch.nonzero(inputs["attention_mask"][b]).flatten()
        vis = torch.nonzero(inputs["input_ids"][b][real] == img).flatten()
        l1, l3 = att[0][b][:, real][:, :, real], att[1][b][:, real][:, :, real]
        torch.testing.assert_close(seen[b], l1[:, -1:].float(), atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(seen[3 + b], l3[:, vis].float(), atol=2e-6, rtol=1e-4)


def _refusal(rt, name, budget=None, **opts):
    try:
        rt.prune(name, budget, **opts)
    except HybridRefusal as e:  # a ValueError, raised at attach
        return str(e)
    finally:
        rt.unprune()
    return None


#: methods whose budget is stated for 576 tokens on 32 layers (a small budget is below what the tiny depth reaches)
B576 = ("pdrop", "sparsevlm", "trio", "transprune")


def test_reading_a_linear_layer_is_refused_at_attach_with_the_reason(rt):
    msg = _refusal(rt, "fastv", 4)  # 4 layers: K = 1, reads layer 0
    assert msg is not None and "reads the attention of layer 0, a linear-attention (Gated DeltaNet) layer" in msg
    assert "full-attention layers are [1, 3]" in msg
    msg = _refusal(rt, "consensusdrop", 2, probe_layer=2)
    assert "decoder layer 2 (probe)" in msg and "full-attention layers are [1, 3]" in msg
    assert _refusal(rt, "consensusdrop", 2, probe_layer=1) is None  # a full-attention probe runs
    # every registered method runs on this model or is refused with a reason: its families, or a linear read
    for name in available_methods():
        if name.startswith("test_") or name in ("layout_spy",):
            continue
        b = (None if name in ("none", "novisual", "prumerge") or not method_class(name).budgeted
             else 192 if name in B576 else 4)
        cls = type(get_method(name, b))
        if not cls.supports("qwen3_5"):
            assert cls.unsupported_reason, name
            continue
        msg = _refusal(rt, name, b)
        assert msg is None or "linear-attention (Gated DeltaNet)" in msg, (name, msg)
    assert _refusal(rt, "pdrop", 192) is not None and _refusal(rt, "visiondrop", 4) is not None


STAGED = [("fastv", 4, {"layer": 2, "scale_layers": False}),  # reads layer 1
          ("pdrop", 192, {"layer_list": (1, 3), "scale_layers": False}),  # reads layers 1, 3; segment 0 all linear
          ("dart", 4, {"layer": 2, "scale_layers": False}),  # layer 1's keys
          ("consensusdrop", 2, {"probe_layer": 3, "prune_point": "after_probe"}),
          ("consensusdrop", 2, {"probe_layer": 1})]  # the vision stage's probe at a full-attention layer


@pytest.mark.parametrize("name,budget,opts", STAGED)
def test_stages_at_full_layers_decode_consistently_and_batch_equals_alone(rt, name, budget, opts):
    inputs = make_batch(rt)
    eng = rt.prune(name, budget, **opts)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples)  # it pruned
    eng.replay = True  # the recurrent states of the linear layers after the prune == a full recompute's
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))
    eng.replay = False
    new = cached[:, inputs["input_ids"].shape[1]:]
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            toks = rt.model.generate(**one, **GEN)
        assert torch.equal(toks[0, one["input_ids"].shape[1]:], new[i])
    rt.unprune()


def test_dropping_tokens_changes_the_linear_layers_state(rt):
    """The test above can fail: a pruned prefill's next-token logits differ from the unpruned model's, and from
    those of a prefill whose linear layers saw the dropped tokens (stage after layer 2 vs before it)."""
    inputs = make_batch(rt)
    with torch.no_grad():
        stock = rt.model(**inputs).logits[:, -1]
    outs = []
    for layer in (2, 3):
        rt.prune("test_every_other_after2", None, layer=layer)
        with torch.no_grad():
            outs.append(rt.model(**inputs).logits[:, -1])
        rt.unprune()
    assert not torch.allclose(outs[0], stock, atol=1e-4) and not torch.allclose(outs[0], outs[1], atol=1e-4)


def test_prompt_is_the_checkpoint_template_without_thinking(rt):
    """Qwen3.5's chat template with enable_thinking=False: no default system turn, the vision markers before the
    question, an empty think block after the assistant tag (the model answers directly); `qwen3_5_lmms` adds
    lmms-eval's system turn. The engine's question tokens are the question alone (the think block is part of the
    stripped role tag)."""
    from llava.conversation import get_template

    assert rt.processor.template.name == "qwen3_5"
    assert rt.processor.prompt_text("what is it?", 1) == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert get_template("qwen3_5_lmms").prompt("q", "") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert get_template("qwen2_vl").prompt("q", "").startswith("<|im_start|>system\nYou are a helpful assistant.")
    tok = rt.tokenizer
    assert tok.convert_ids_to_tokens(list(rt.prompt_spec().tail_ids)) == [
        "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "<think>", "\n", "\n", "</think>", "\n", "\n"]
    seen = {}

    class Spy(Method):
        name = "spy_q35"
        vision_stage = True

        def select_vision(self, sig):
            seen["q"] = tok.convert_ids_to_tokens(sig.question_ids.tolist())
            return Selection(keep=torch.arange(sig.num_tokens))

    b = make_batch(rt, 1)
    attach(rt.model, Spy(), prompt_spec=rt.prompt_spec())
    try:
        with torch.no_grad():
            rt.model(**b)
    finally:
        rt.model._pruning_engine.remove()
    from conftest import QUESTIONS

    assert seen["q"] == tok.convert_ids_to_tokens(tok(QUESTIONS[0], add_special_tokens=False).input_ids)
