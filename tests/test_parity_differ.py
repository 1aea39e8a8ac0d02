"""What a differing parity row says about itself (issue 71, parity/differ.py): the one-ulp tie rule with worked fp16,
bf16 and fp32 values, the row's detail and data where the greedy tokens part (both sides' top-2 logits at the first
differing step), and our side's record of each decode step's top-2 (parity/step_logits.py)."""

from __future__ import annotations

import pytest
import torch

from parity import llava15, qwen
from parity.differ import describe, first_step, replay_detail, steps_apart, tie, top2, ulp
from parity.step_logits import record_top2, stacked

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def test_ulp_is_the_spacing_of_the_dtype_at_that_magnitude():
    # 0.33 lies in [2^-2, 2^-1): fp16 keeps 10 fraction bits (2^-12), bf16 7 (2^-9), fp32 23 (2^-25)
    assert ulp(0.33, F16) == 2 ** -12 == 0.000244140625
    assert ulp(0.33, BF16) == 2 ** -9
    assert ulp(0.33, F32) == 2 ** -25
    assert ulp(-0.33, F16) == 2 ** -12  # the magnitude's
    assert ulp(0.5, F16) == 2 ** -11 and ulp(0.499, F16) == 2 ** -12  # from 0.5 on the spacing doubles
    assert ulp(1000.0, F16) == 0.5  # [512, 1024): 2^9 * 2^-10


def test_issue_71s_logits_are_one_fp16_step_apart():
    """Qwen3-VL unpruned, fp16, image 3: 0.329834 vs 0.329590 (as printed) round to 0.329833984375 and 0.32958984375,
    the bit patterns 13639 and 13638: neighbours. In bf16 both round to 0.330078125 (0 steps); in fp32 they are
    2^-12 / 2^-25 = 8192 steps apart."""
    assert torch.tensor([0.329834, 0.329590]).half().view(torch.int16).tolist() == [13639, 13638]
    assert steps_apart(0.329834, 0.329590, F16) == 1
    assert steps_apart(0.329834, 0.329590 - 2 ** -12, F16) == 2
    assert steps_apart(0.329834, 0.329590, BF16) == 0
    assert steps_apart(0.329833984375, 0.32958984375, F32) == 8192


def test_steps_count_across_a_power_of_two_and_zero():
    assert steps_apart(0.5 - 2 ** -12, 0.5, F16) == 1  # the spacing below 0.5 is 2^-12
    assert steps_apart(0.5, 0.5 + 2 ** -11, F16) == 1  # and above it 2^-11
    assert steps_apart(0.5 - 2 ** -12, 0.5 + 2 ** -11, F16) == 2
    assert steps_apart(-0.0, 0.0, F16) == 0
    assert steps_apart(-2 ** -24, 2 ** -24, F16) == 2  # the smallest subnormals, either side of zero
    assert steps_apart(1.0, 1.0 + 2 ** -7, BF16) == 1 and steps_apart(1.0, 1.0 + 2 ** -23, F32) == 1


def _side(ids, logits):
    return {"ids": list(ids), "logits": list(logits)}


def test_a_tie_needs_the_same_two_tokens_one_step_apart_on_each_side():
    off, ours = _side((98, 101), (0.329834, 0.329590)), _side((101, 98), (0.329834, 0.329590))
    assert tie(off, ours, F16)
    assert not tie(off, ours, F32)  # 8192 fp32 steps: in fp32 the two picks are not one rounding apart
    assert not tie(off, _side((101, 7), (0.329834, 0.329590)), F16)  # another runner-up on our side
    assert not tie(off, _side((101, 98), (0.329834, 0.329346)), F16)  # ours two steps apart
    assert tie(_side((5, 6), (2.0, 2.0)), _side((6, 5), (2.0, 2.0)), F32)  # an exact tie


def test_the_row_detail_names_the_step_both_sides_top2_and_the_verdict():
    text, data = describe(3, 0, _side((98, 101), (0.329834, 0.329590)), _side((101, 98), (0.329834, 0.329590)),
                          "fp16")
    assert text == ("image 3 step 0: official 98 (0.329834), 101 (0.32959); ours 101 (0.329834), 98 (0.32959): "
                    "tie within one ulp (fp16 ulp 0.000244)")
    assert data["tie"] and data["steps_apart"] == [1, 1] and data["ulp"] == 2 ** -12
    assert data["official"]["ids"] == [98, 101] and data["ours"]["ids"] == [101, 98]
    fp16_values = (0.329833984375, 0.32958984375)  # the same logits in an fp32 run: 2^-12 = 8192 fp32 steps
    text, data = describe(3, 0, _side((98, 101), fp16_values), _side((101, 98), fp16_values), "fp32")
    assert text.endswith(": no tie (the top two 8192 / 8192 fp32 steps apart)") and not data["tie"]
    text, _ = describe(0, 2, _side((4, 5), (1.0, 0.5)), _side((6, 4), (1.5, 1.0)), "fp16")
    assert text.endswith(": no tie (other top-2 tokens)")
    assert describe(1, 4, None, _side((6, 4), (1.5, 1.0)), "fp16")[0] == "image 1 step 4: top logits not recorded"


def test_replay_verdicts():
    assert replay_detail(True, True) == "replay on the official rows: identical picks"
    assert replay_detail(False, True) == "replay on the official rows: identical picks (the environments' kernels differ)"
    assert replay_detail(False, False) == replay_detail(True, False) == "replay differs: ours is wrong"


def test_first_step_and_the_recorded_step_of_a_token():
    assert first_step([1, 2, 3], [1, 2, 3]) is None
    assert first_step([1, 2, 3], [1, 4, 3]) == 1 and first_step([1, 2], [1, 2, 3]) == 2
    steps = {"ids": torch.tensor([[[7, 8]], [[9, 1]]]), "logits": torch.tensor([[[2.0, 1.0]], [[3.0, 0.5]]])}
    assert top2(steps, 2, 0, 1) == {"ids": [9, 1], "logits": [3.0, 0.5]}
    assert top2(steps, 3, 0, 1, lead=1) == {"ids": [9, 1], "logits": [3.0, 0.5]}  # a BOS before, with no step
    assert top2(steps, 2, 0, 2) is None and top2(None, 2, 0, 0) is None


def _llava_runs(our_tokens, our_top2):
    """One FlowCut run each side, as tests/test_parity.py builds them: the official tokens with generate()'s BOS
    first (no step recorded for it), three decode steps recorded on each side."""
    logits = torch.zeros(1, 5, 7)
    kept = [(1, torch.tensor([[0, 2, 3]]))]
    off_top2 = {"ids": torch.tensor([[[9, 4]], [[2, 7]], [[0, 1]]]),
                "logits": torch.tensor([[[5.0, 1.0]], [[0.329834, 0.329590]], [[1.0, 0.0]]])}
    off = {"runs": [{"method": {"name": "flowcut", "budget": 2}, "batch": [2], "ids": [[1, -200, 4]],
                     "pixel_values": torch.zeros(1), "logits": logits, "tokens": [[1, 9, 2, 0]], "bos": 1,
                     "kept": kept, "top2": off_top2}]}
    mine = [{"method": {"name": "flowcut", "budget": 2}, "batch": [2], "input_ids": torch.tensor([[1, 3, 3, 3, 4]]),
             "attention_mask": torch.ones(1, 5, dtype=torch.long), "pixel_values": torch.zeros(1), "logits": logits,
             "tokens": our_tokens, "kept": kept, "image_token_id": 3, "top2": our_top2}]
    return off, mine


def test_a_differing_llava_row_carries_both_sides_top_logits():
    """Official 9, 2 (eos), ours 9, 7: the second step parts; the official record is found past its BOS."""
    ours = {"ids": torch.tensor([[[9, 4]], [[7, 2]], [[3, 1]]]),
            "logits": torch.tensor([[[5.0, 1.0]], [[0.329834, 0.329590]], [[1.0, 0.0]]])}
    off, mine = _llava_runs([[9, 7, 3]], ours)
    (c,) = llava15.compare(off, mine, "fp16", None, eos=2)
    assert not c.ok
    assert ("greedy tokens DIFFER (image 2 step 1: official 2 (0.329834), 7 (0.32959); ours 7 (0.329834), "
            "2 (0.32959): tie within one ulp (fp16 ulp 0.000244))") in c.detail
    (d,) = c.data["first_difference"]
    assert (d["image"], d["step"], d["tie"]) == (2, 1, True)
    assert d["official"] == {"ids": [2, 7], "logits": pytest.approx([0.329834, 0.329590])}
    # an older results file, or a worker without the record: said so, the row still differs
    off["runs"][0].pop("top2")
    (c,) = llava15.compare(off, mine, "fp16", None, eos=2)
    assert "image 2 step 1: top logits not recorded" in c.detail
    (same,) = llava15.compare(*_llava_runs([[9, 2, 5]], ours), "fp16", None, eos=2)
    assert same.ok and "first_difference" not in same.data


def test_a_differing_qwen_unpruned_row_carries_both_sides_top_logits():
    """issue 71's Qwen3-VL row, its words: the first token differs (official 98, ours 101), one fp16 step apart."""
    def run(tokens, top):
        return {"method": {"name": "none"}, "batch": [3], "input_ids": torch.tensor([[5, 6]]),
                "attention_mask": torch.ones(1, 2, dtype=torch.long), "image_grid_thw": torch.tensor([[1, 2, 2]]),
                "pixel_values": torch.zeros(4, 3), "logits": torch.zeros(1, 2, 3), "tokens": [tokens],
                "top2": {"ids": torch.tensor([[top]]), "logits": torch.tensor([[[0.329834, 0.329590]]])}}

    prep, row = qwen.compare({"runs": [run([98], [98, 101])]}, [run([101], [101, 98])], "fp16", None, None)
    assert prep.ok and not row.ok
    assert row.detail == ("logits max abs diff 0.00e+00, greedy tokens DIFFER (image 3 step 0: official 98 (0.329834), "
                          "101 (0.32959); ours 101 (0.329834), 98 (0.32959): tie within one ulp (fp16 ulp 0.000244))")


def test_our_side_records_one_top2_per_generated_token():
    """The hook on the output embeddings around generate() of our engine (FastV on the tiny LLaVA, a batch of two):
    one step per generated token, its first id the token picked."""
    import llava
    from PIL import Image

    rt = llava.load("tiny:llava")
    rt.prune("fastv", 8)
    images = [Image.new("RGB", (40, 70), (200, 30, 30)), Image.new("RGB", (56, 56), (20, 90, 200))]
    inputs = rt.processor(["what is this?", "what color is the circle on the left?"], images)
    steps: list = []
    hook = record_top2(rt.model, steps)
    with torch.inference_mode():
        gen = rt.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    hook.remove()
    new = gen[:, inputs["input_ids"].shape[1]:]
    rec = stacked(steps)
    assert new.shape[1] >= 2 and rec["ids"].shape == rec["logits"].shape == (new.shape[1], 2, 2)
    assert torch.equal(rec["ids"][:, :, 0].T, new)
    assert bool((rec["logits"][:, :, 0] >= rec["logits"][:, :, 1]).all())
    assert stacked([]) is None
