"""The engine's vision stage alone (``engine.vision_inputs``) on a model loaded with only the decoder layers a
method's probe needs (``load(..., decoder_layers=N)``): what the vLLM plugin runs beside vLLM's decoder.
Its LLM inputs equal a full prefill's, on a partial load as on the whole model."""

import pytest
import torch

from llava.models import AbsentDecoderLayer, load


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    rt = load("tiny:llava", seed=3)
    path = tmp_path_factory.mktemp("tiny_llava_dir")
    rt.model.save_pretrained(path)
    rt.tokenizer.save_pretrained(path)
    rt.processor.image_processor.save_pretrained(path)
    return str(path)


def batch(rt):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(40, 60, 3, generator=g) * 255).byte().numpy())
    return rt.processor(["how many shapes are on the left?"], images=[img])


def prefill_embeds(rt, eng, inputs):
    """The decoder's input rows of a real prefill (a pre-hook on decoder layer 0, its last call)."""
    got = {}

    def grab(module, args, kwargs):
        got["x"] = (args[0] if args else kwargs["hidden_states"]).clone()  # the last call: a probe runs first

    h = eng.lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            rt.model(**inputs)
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize("method,budget,options,layers", [("visionzip", 6, {}, 0), ("random", 5, {}, 0),
                                                           ("consensusdrop", 6, {"preset": "probe"}, 3)])
def test_vision_inputs_on_a_partial_load_equal_a_full_prefill(ckpt, method, budget, options, layers):
    full = load(ckpt)
    inputs = batch(full)
    eng = full.prune(method, budget, **options)
    ref = prefill_embeds(full, eng, inputs)
    ref_sel = eng.selections[("vision", 0)]
    part = load(ckpt, decoder_layers=layers)
    lm = part.model.model.language_model
    assert len(lm.layers) == 4 and sum(not isinstance(m, AbsentDecoderLayer) for m in lm.layers) == layers
    assert part.model.config.text_config.num_hidden_layers == 4
    pe = part.prune(method, budget, **options)
    assert tuple(pe.method.probe_layers) == tuple(eng.method.probe_layers)
    embeds, mask, pos, info = pe.vision_inputs(inputs["input_ids"], {"pixel_values": inputs["pixel_values"]},
                                               inputs["attention_mask"])
    torch.testing.assert_close(embeds, ref, rtol=0, atol=0)
    sel = pe.selections[("vision", 0)]
    assert torch.equal(sel.keep, ref_sel.keep) and info.candidates == [16]
    assert embeds.shape[1] == inputs["input_ids"].shape[1] - 16 + budget


def test_an_absent_layer_refuses_to_run(ckpt):
    part = load(ckpt, decoder_layers=1)
    with pytest.raises(RuntimeError, match="decoder layer 1 was not loaded"):
        with torch.inference_mode():
            part.model(**batch(part))
    with pytest.raises(ValueError, match="decoder_layers must be in 0..4"):
        load(ckpt, decoder_layers=5)
