"""Engine signals against independent computations with transformers' own modules."""

import pytest
import torch
from conftest import make_batch, rand_image

from llava.engine import attach
from llava.method import Method
from llava.selection import Selection


class Spy(Method):
    name = "spy"
    vision_stage = True
    needs_vision_attention = True

    def __init__(self, keep_fn=None, probe=None, cls=False):
        super().__init__()
        self.seen, self.keep_fn, self.probe, self.include_cls_candidates = [], keep_fn, probe, cls

    def select_vision(self, sig):
        rec = {"sig": sig}
        if self.probe is not None:
            rec["probe"] = sig.probe_attention(*self.probe)
        self.seen.append(rec)
        return Selection(keep=self.keep_fn(sig) if self.keep_fn else torch.arange(sig.num_stock))


@pytest.mark.parametrize("k,queries", [(0, "question"), (2, "question"), (3, "all_post_image"), (1, "last")])
def test_probe_equals_eager_attention_of_layer_k(runtimes, k, queries):
    rt = runtimes["llava"]
    inputs = make_batch(rt, n=2)
    spy = Spy(probe=(k, queries))
    attach(rt.model, spy, prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        rt.model(**inputs)
    rt.model._pruning_engine.remove()
    # reference: the stock model in eager mode returns every layer's attention probabilities
    rt.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = rt.model(**inputs, output_attentions=True).attentions[k]  # (B, H, L, L)
    finally:
        rt.model.set_attn_implementation("sdpa")
    img = rt.model.config.image_token_id
    for b in range(2):
        ids, m = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        vis = torch.nonzero(ids == img).flatten()
        real = torch.nonzero(m).flatten()
        after = real[real > vis.max()]
        rows = {"question": after[1:-2], "all_post_image": after, "last": real[-1:]}[queries]  # "\n" ... "assistant :"
        expect = ref[b][:, rows][:, :, vis]
        got = spy.seen[b]["probe"]
        assert got.shape == expect.shape
        torch.testing.assert_close(got, expect.float(), atol=2e-6, rtol=1e-4)


def test_cls_extra_candidate_is_the_projected_cls(runtimes):
    rt = runtimes["llava"]
    inputs = make_batch(rt, n=2)
    spy = Spy(keep_fn=lambda sig: torch.tensor([sig.num_stock, 0]), cls=True)  # the [CLS], then patch 0
    eng = attach(rt.model, spy, prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        out = rt.model.generate(**inputs, max_new_tokens=3, do_sample=False)
        hs = rt.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
        cls_proj = rt.model.model.multi_modal_projector(hs[:, :1])[:, 0]
    rt.model._pruning_engine.remove()
    for b in range(2):
        sig = spy.seen[b]["sig"]
        assert sig.num_stock == 16 and sig.num_tokens == 17 and int(sig.patch[16]) == -1 and int(sig.unit[16]) == 0
        torch.testing.assert_close(sig.features[16], cls_proj[b])
        torch.testing.assert_close(sig.vision_features[16], hs[b, 0])
        # cls_attn of the extra = the [CLS]'s attention to itself; the patches' entries sum with it to 1
        assert float(sig.cls_attn.sum(1).mean()) == pytest.approx(1.0, abs=1e-5)
    assert all(s.visual_entering_llm == 2 for s in eng.stats.samples)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_next_unit_positions_and_per_crop_attention(runtimes):
    rt = runtimes["llava-next"]
    inputs = rt.processor(["what is this?"], [rand_image(0, 100, 100)])  # square: 2x2 grid + base
    spy = Spy()
    attach(rt.model, spy, prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        rt.model(**inputs)
    rt.model._pruning_engine.remove()
    sig = spy.seen[0]["sig"]
    assert sig.unit_pos.tolist() == [[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1]]
    assert sig.num_units == 5 and int(sig.is_newline.sum()) == 8  # 8 rows of the 2x2 grid
    # per crop, the [CLS] row over its 16 patches plus its self-attention sums to 1: patches sum < 1
    for u in range(5):
        s = sig.cls_attn[:, sig.unit_indices(u)].sum(1)
        assert bool((s < 1).all()) and bool((s > 0).all())


@pytest.mark.parametrize("family", ["llava", "qwen2.5-vl", "qwen3-vl"])
def test_llm_stage_attention_rows_equal_eager_attention(runtimes, family):
    """LLMSignals.attention(..., 'next') = layer K's attention, ('prev') = layer K-1's, of the stock model.
    Qwen3-VL's text layers norm q and k per head (``q_norm`` / ``k_norm``): without them the rows differ by
    up to 0.45 on this model (the regression this guards)."""
    rt = runtimes[family]
    inputs = make_batch(rt, n=2)
    seen = []

    class Probe(Method):
        name = "llm_probe"

        @property
        def llm_layers(self):
            return (2,)

        def select_llm(self, stage, sig):
            seen.append((sig.attention("visual", "next"), sig.attention("last", "prev"), sig.visual))
            return Selection(keep=torch.arange(sig.num_visual))

    attach(rt.model, Probe(), prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        rt.model(**inputs)
    rt.model._pruning_engine.remove()
    rt.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = rt.model(**inputs, output_attentions=True).attentions
    finally:
        rt.model.set_attn_implementation("sdpa")
    for b in range(2):
        real = torch.nonzero(inputs["attention_mask"][b]).flatten()
        nxt, prev, vis = seen[b]
        ref2 = att[2][b][:, real][:, :, real]
        ref1 = att[1][b][:, real][:, :, real]
        torch.testing.assert_close(nxt, ref2[:, vis].float(), atol=2e-6, rtol=1e-4)
        torch.testing.assert_close(prev, ref1[:, -1:].float(), atol=2e-6, rtol=1e-4)


class _ReceivedSpy(Method):
    """Asks for the received attention of two tower layers; keeps everything."""

    name = "received_spy"
    vision_stage = True
    vision_attention_layers = (1, -2)

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(sig)
        return Selection(keep=torch.arange(sig.num_stock, device=sig.unit.device))


@pytest.mark.parametrize("fam", ["llava", "llava-next", "video-llava"])
def test_received_attention_of_extra_layers_equals_the_eager_column_mean(runtimes, fam):
    """sig.received_attn[v]: per head, the mean over all query rows (incl. [CLS]) of layer v-1's softmax
    (HiPrune's global attention), from pre-hooks; the eager tower's attention maps are the reference."""
    rt = runtimes[fam]
    inputs = make_batch(rt, n=2)
    spy = _ReceivedSpy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    core = rt.model.model
    tower = core.video_tower if fam == "video-llava" else core.vision_tower
    if fam == "video-llava":
        px = inputs["pixel_values_videos"].flatten(0, 1)
    elif fam == "llava-next":
        sizes = [tuple(s) for s in inputs["image_sizes"].tolist()]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        crops = [image_size_to_num_patches(s, rt.model.config.image_grid_pinpoints, rt.model.config.vision_config.image_size)
                 for s in sizes]
        px = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], crops)])
    else:
        px = inputs["pixel_values"]
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tower(px, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    n_layers = len(att)
    for v in (1, -2):
        ref = att[(v % (n_layers + 1)) - 1].float().mean(2)  # (units, H, S): column mean over all queries
        torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref.sum(-1)))
        start = 0
        for sig in spy.seen:
            r = sig.received_attn[v]  # (H, T)
            assert r.shape == (ref.shape[1], sig.num_tokens)
            for u in range(sig.num_units):
                idx = sig.unit_indices(u)
                patch = sig.patch[idx]
                got = r[:, idx[patch >= 0]]
                off = 1 if fam != "video-llava" else 0  # LLaVA-1.5 / NeXT drop [CLS]; Video-LLaVA frames keep it
                torch.testing.assert_close(got, ref[start + u][:, patch[patch >= 0] + off] if off else
                                           ref[start + u][:, 1:], atol=1e-5, rtol=1e-4)
            if sig.is_newline.any():
                assert (r[:, sig.is_newline] == 0).all()
            start += sig.num_units


@pytest.mark.parametrize("fam", ["qwen2.5-vl", "llava-onevision"])
def test_received_attention_of_extra_layers_is_refused_without_a_clip_tower(runtimes, fam):
    rt = runtimes[fam]
    rt.prune(_ReceivedSpy())
    try:
        with pytest.raises(ValueError, match="CLIP towers"), torch.no_grad():
            rt.model(**make_batch(rt, n=1))
    finally:
        rt.unprune()


class _FullwidthSpy(Method):
    """Reads PruMerge's signals and replaces the kept tokens' features by its own values."""

    name = "fullwidth_spy"
    vision_stage = True
    vision_fullwidth_layers = (-1,)

    def __init__(self, space="vision", bad=False):
        super().__init__()
        self.seen, self.space, self.bad = [], space, bad

    def select_vision(self, sig):
        self.seen.append(sig)
        keep = torch.tensor([0, 2], device=sig.unit.device)
        x = sig.vision_features if self.space == "vision" else sig.features
        vals = 2 * x[keep].float() + 1
        if self.bad:
            vals = vals[:1]
        return Selection(keep=keep, values=vals, space=self.space)


def test_fullwidth_signals_equal_the_layer_recomputed_from_hidden_states(runtimes):
    rt = runtimes["llava"]
    inputs = make_batch(rt, n=2)
    spy = _FullwidthSpy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
        hs = rt.model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    rt.unprune()
    layer = rt.model.model.vision_tower.encoder.layers[-1]  # produces hidden_states[-1]
    with torch.no_grad():
        x = layer.layer_norm1(hs[-2])  # its input
        q, k = layer.self_attn.q_proj(x).double(), layer.self_attn.k_proj(x).double()
        p = torch.softmax(q[:, :1] @ k.transpose(1, 2) / k.shape[-1] ** 0.5, -1)[:, 0]  # (n, 17)
    for b, sig in enumerate(spy.seen):
        torch.testing.assert_close(sig.fullwidth_cls_attn[-1].double(), p[b, 1:], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(sig.fullwidth_keys[-1].double(), k[b, 1:], atol=1e-5, rtol=1e-5)
        assert abs(float(p[b].sum()) - 1) < 1e-9


@pytest.mark.parametrize("space", ["vision", "projected"])
def test_selection_values_replace_the_outputs_features(runtimes, space):
    from conftest import llm_visual_rows

    rt = runtimes["llava"]
    inputs = make_batch(rt, n=2)
    spy = _FullwidthSpy(space=space)
    rt.prune(spy)
    try:
        rows = llm_visual_rows(rt, inputs)
    finally:
        rt.unprune()
    for sig, got in zip(spy.seen[-2:], rows):
        x = sig.vision_features if space == "vision" else sig.features
        want = 2 * x[[0, 2]].float() + 1
        if space == "vision":
            want = rt.model.model.multi_modal_projector(want.to(x.dtype)[None])[0]
        torch.testing.assert_close(got, want.to(got.dtype))
    spy = _FullwidthSpy(bad=True)
    rt.prune(spy)
    try:
        with pytest.raises(ValueError, match="rows for 2 outputs"), torch.no_grad():
            rt.model(**inputs)
    finally:
        rt.unprune()


class _QuestionSpy(Method):
    name = "question_spy"
    vision_stage = True
    query_aware = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(sig.question_ids)
        return Selection(keep=torch.arange(sig.num_tokens, device=sig.unit.device))


@pytest.mark.parametrize("fam", ["llava", "llava-next", "qwen2.5-vl", "llava-onevision"])
def test_question_ids_decode_to_the_question(runtimes, fam):
    """sig.question_ids: the question's own token ids (no separator, no role tag), on the host."""
    rt = runtimes[fam]
    qs = ["what color is the circle?", "how many objects are there in the picture?"]
    spy = _QuestionSpy()
    rt.prune(spy)
    try:
        with torch.no_grad():
            rt.model(**rt.processor(qs, [rand_image(0), rand_image(1, 56, 56)]))
    finally:
        rt.unprune()
    assert [rt.tokenizer.decode(q).strip() for q in spy.seen] == qs
    assert all(q.device.type == "cpu" and q.dtype == torch.long for q in spy.seen)


class _ClsLayersSpy(_ReceivedSpy):
    name = "cls_layers_spy"
    vision_attention_layers = ()
    vision_cls_layers = (1, -2)


@pytest.mark.parametrize("fam", ["llava", "llava-next"])
def test_cls_rows_of_extra_layers_equal_the_eager_maps(runtimes, fam):
    """sig.cls_attn_layers[v]: per head, the [CLS] query row of the layer producing hidden state v
    (VScan's local / global scans); the eager tower's attention maps are the reference."""
    rt = runtimes[fam]
    inputs = make_batch(rt, n=2)
    spy = _ClsLayersSpy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    tower = rt.model.model.vision_tower
    if fam == "llava-next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        crops = [image_size_to_num_patches(tuple(s), rt.model.config.image_grid_pinpoints,
                                           rt.model.config.vision_config.image_size) for s in inputs["image_sizes"].tolist()]
        px = torch.cat([p[:c] for p, c in zip(inputs["pixel_values"], crops)])
    else:
        px = inputs["pixel_values"]
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = tower(px, output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    for v in (1, -2):
        ref = att[(v % (len(att) + 1)) - 1].float()[:, :, 0]  # (units, H, S): [CLS] query row
        start = 0
        for sig in spy.seen:
            r = sig.cls_attn_layers[v]
            for u in range(sig.num_units):
                idx = sig.unit_indices(u)
                p = sig.patch[idx]
                torch.testing.assert_close(r[:, idx[p >= 0]], ref[start + u][:, p[p >= 0] + 1], atol=1e-5, rtol=1e-4)
            start += sig.num_units
