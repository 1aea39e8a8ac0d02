"""``PruningEngine.visual_runs`` (llava/engine.py): per sample of a ``vision_inputs`` call, the pruned row's visual
rows and how many of them each placeholder run of the prompt holds. The vLLM plugin lays a Qwen3-VL video out with
it (a timestamp and a run per temporal slice); checked here against the selection itself (each kept / merged token's
source, its run), the embeddings (the rows hold the visual outputs, the others the text's embeddings in order), on
Qwen3-VL videos (a run per slice, empty slices included), a two-image LLaVA prompt and a left-padded batch."""

import pytest
import torch

from conftest import rand_image
from llava.models import load


@pytest.fixture(scope="module")
def qwen3():
    return load("tiny:qwen3-vl", seed=1)


@pytest.fixture(scope="module")
def llava():
    return load("tiny:llava", seed=1)


def frames(seed, n, w, h):
    return [rand_image(100 * seed + i, h, w) for i in range(n)]


def runs_of(ids, marks):
    """(start, length) of each run of placeholder tokens in ``ids``."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] in marks:
            j = i
            while j < len(ids) and ids[j] in marks:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def sources(sel, n):
    """Each output's source candidate (kept, then merged targets), as counted per run."""
    if sel is None:
        return torch.arange(n)
    src = [sel.keep.cpu()]
    if sel.targets is not None:
        src.append(sel.targets.cpu())
    return torch.cat(src)


def check(eng, enc, marks, b=0):
    """visual_runs of sample b == the runs of its selection's sources; its rows hold the visual outputs (the text
    rows hold the text's own embeddings, in order)."""
    ids, mask = enc["input_ids"], enc.get("attention_mask")
    visual = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        embeds, _, _, info = eng.vision_inputs(ids, visual, mask)
        got = eng.visual_runs(ids, info, mask)
    rows, counts = got[b]
    real = ids[b][mask[b].bool()].tolist() if mask is not None else ids[b].tolist()
    runs = runs_of(real, marks)
    vis = [i for i, t in enumerate(real) if t in marks]
    run_of = torch.tensor([k for k, (_, n) in enumerate(runs) for _ in range(n)])
    sel = eng.selections.get(("vision", b))
    src = sources(sel, len(vis))
    if (src >= len(vis)).any():  # a unit's [CLS] offered as an extra candidate goes to its unit's run (one here)
        assert len(runs) == 1
        src = src.clamp(max=len(vis) - 1)
    want = torch.bincount(run_of[src], minlength=len(runs)).tolist()
    assert counts == want and sum(counts) == rows.numel()
    assert rows.tolist() == sorted(rows.tolist())
    row = embeds[b]
    text = [i for i in range(row.shape[0]) if i not in set(rows.tolist())]
    pad = row.shape[0] - (len(real) - len(vis) + rows.numel())
    emb = eng.lm.embed_tokens(torch.tensor([t for t in real if t not in marks]))
    assert torch.equal(row[text[pad:]], emb)  # every text token in order, after the left padding
    return rows, counts


@pytest.mark.parametrize("method,budget", [("none", None), ("visionzip", 3), ("divprune", 2),
                                           ("test_keep_first_k", 5)])
def test_qwen3_video_runs_are_its_temporal_slices(qwen3, method, budget):
    """A Qwen3-VL video (a timestamp and a marked run per temporal slice): one count per slice; the method's per-slice
    budget, the stock run lengths unpruned, and 0 for the slices a method empties (their markers stay)."""
    cfg = qwen3.model.config
    enc = qwen3.processor(["what happens in the video?"], videos=[frames(1, 8, 100, 70)])
    t, h, w = (int(x) for x in enc["video_grid_thw"][0])
    per = h * w // 4
    eng = qwen3.prune(method, budget)
    try:
        rows, counts = check(eng, enc, {cfg.video_token_id})
    finally:
        eng.remove()
    assert len(counts) == t == 4
    want = {"none": [per] * t, "visionzip": [3] * t, "divprune": [2] * t,
            "test_keep_first_k": [min(5, per)] + [max(0, 5 - per)] + [0] * (t - 2)}[method]
    assert counts == want, (method, counts)


def test_a_two_image_prompt_and_a_padded_batch(llava):
    """Two images in one LLaVA prompt (two runs; the first-k method keeps the first image's tokens only: the second run
    holds 0), and a left-padded batch of two prompts (each sample's rows in its own row's coordinates)."""
    tok = llava.model.config.image_token_id
    llava.processor.pad_to_square = False
    enc = dict(llava.processor(["which is larger?"], images=[[rand_image(1), rand_image(2, 60, 50)]]))
    ids = enc["input_ids"][0].tolist()
    first = ids.index(tok)
    n_tok = ids.count(tok)
    assert ids[first:first + n_tok] == [tok] * n_tok  # the processor puts the images side by side: ONE run
    sep = ids[first + n_tok]  # a text token between them makes two
    ids = ids[:first + n_tok // 2] + [sep] + ids[first + n_tok // 2:]
    enc["input_ids"] = torch.tensor([ids])
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    assert len(runs_of(ids, {tok})) == 2
    per = int((enc["input_ids"] == tok).sum()) // 2
    for method, budget, want in (("none", None, [per, per]), ("test_keep_first_k", 5, [5, 0]),
                                 ("test_keep_first_merge_rest", 5, None)):
        eng = llava.prune(method, budget)
        try:
            _, counts = check(eng, enc, {tok})
        finally:
            eng.remove()
        if want is not None:
            assert counts == want, method
    batch = llava.processor(["what is this?", "how many objects are there in the picture?"],
                            images=[rand_image(3), rand_image(4, 30, 90)])
    assert (batch["attention_mask"] == 0).any()  # left padding
    eng = llava.prune("visionzip", 6)
    try:
        for b in range(2):
            rows, counts = check(eng, batch, {tok}, b)
            assert len(counts) == 1 and counts[0] == rows.numel()
    finally:
        eng.remove()


def test_inputs_of_another_call_are_refused(qwen3):
    """An info from another prompt (its visual rows where this prompt has no run) is an error, not a silent count."""
    a = qwen3.processor(["what happens?"], videos=[frames(2, 4, 100, 70)])
    ids = a["input_ids"][0].tolist()
    other = torch.tensor([ids[:1] + ids[1:2] + ids[1:]])  # one more text token before the video
    eng = qwen3.prune("visionzip", 3)
    try:
        with torch.inference_mode():
            _, _, _, info = eng.vision_inputs(a["input_ids"], {k: v for k, v in a.items() if k != "input_ids"})
        assert eng.visual_runs(a["input_ids"], info)[0][1] == [3, 3]
        with pytest.raises(ValueError, match="do not fall in the prompt's placeholder runs"):
            eng.visual_runs(other, info)
    finally:
        eng.remove()
