"""``python -m parity qwen`` (parity/qwen.py): the tiny Qwen2.5-VL folder both transformers releases read, its chat
template, and, opt-in (skipped without ``.venv-official-qwen``: ``bash scripts/official_env.sh qwen``), Hugging
Face's own Qwen2.5-VL under transformers 4.52.4 beside ours on two builds, with planted changes that must show."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from parity import qwen
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

QWEN_PY = Path(__file__).resolve().parents[1] / ".venv-official-qwen" / "bin" / "python"
needs_qwen_env = pytest.mark.skipif(not QWEN_PY.exists(), reason="no .venv-official-qwen: run "
                                    "`bash scripts/official_env.sh qwen` (transformers 4.52.4)")


# -- without the official environment -------------------------------------------------------------------------------
def test_legacy_config_adds_what_4_52_reads_and_keeps_what_5_reads():
    cfg = {"model_type": "qwen2_5_vl",
           "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                           **{k: i for i, k in enumerate(qwen.TOP_LEVEL_TEXT)}}}
    out = qwen.legacy_config(cfg)
    legacy = {"type": "default", "rope_type": "default", "mrope_section": [2, 3, 3]}
    assert out["text_config"]["rope_scaling"] == legacy and out["rope_scaling"] == legacy
    assert out["text_config"]["rope_theta"] == out["rope_theta"] == 1e4
    assert out["text_config"]["rope_parameters"] == cfg["text_config"]["rope_parameters"]  # transformers 5's field
    assert all(out[k] == i for i, k in enumerate(qwen.TOP_LEVEL_TEXT))
    assert "rope_scaling" not in cfg["text_config"]  # the input is not changed


def test_the_chat_template_writes_qwens_prompt_and_ours_writes_the_same():
    import jinja2

    from llava.models import build_tiny

    text = jinja2.Template(qwen.CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]}],
        add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>what color is it?<|im_end|>\n<|im_start|>assistant\n")
    rt = build_tiny("qwen2.5-vl")
    assert rt.processor.prompt_text("what color is it?") == text


def test_the_built_folder_loads_in_ours(tmp_path):
    import llava

    info = qwen.build(tmp_path, seed=3)
    cfg = json.loads(Path(info["model"], "config.json").read_text())
    assert cfg["text_config"]["rope_scaling"]["mrope_section"] == cfg["text_config"]["rope_parameters"]["mrope_section"]
    tok = json.loads(Path(info["model"], "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast" and "<|image_pad|>" in tok["additional_special_tokens"]
    rt = llava.load(info["model"])
    assert rt.family == "qwen2_5_vl" and rt.model.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    assert qwen.build(tmp_path, seed=3) == info  # reused


# -- against transformers 4.52.4 (opt-in) ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-qwen")
    return work, qwen.build(work, seed=request.param)


@needs_qwen_env
def test_the_unpruned_qwen_agrees_with_transformers_4_52(built):
    """Each image alone and the four in one left-padded batch: ids, grids, pixels identical; fp32 logits within
    1e-5 and tokens identical; fp16 tokens identical."""
    work, info = built
    checks = qwen.run(info, str(QWEN_PY), work)
    assert len(checks) == 20 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]


@needs_qwen_env
def test_planted_changes_in_the_official_folder_show(built, tmp_path):
    """The official side reads what we think it reads: another system turn in its chat template changes the ids, and
    another M-RoPE split in the fields only 4.52 reads changes its logits."""
    work, info = built
    folder = tmp_path / qwen.NAME
    shutil.copytree(info["model"], folder)
    tmpl = json.loads((folder / "chat_template.json").read_text())
    tmpl["chat_template"] = tmpl["chat_template"].replace("You are a helpful assistant.", "You are an assistant.")
    (folder / "chat_template.json").write_text(json.dumps(tmpl))
    cfg = json.loads((folder / "config.json").read_text())
    for c in (cfg, cfg["text_config"]):
        c["rope_scaling"]["mrope_section"] = [4, 2, 2]
    (folder / "config.json").write_text(json.dumps(cfg))
    methods = [{"name": "none", "batches": [[0]]}]
    off = qwen.official({**info, "model": str(folder)}, str(QWEN_PY), "fp32", methods, 4, tmp_path)
    mine = qwen.ours(info, "fp32", methods, 4)
    prep, unpruned = qwen.compare(off, mine, "fp32", 1e-5, info["eos"])
    assert "ids DIFFER" in prep.detail and not prep.ok
    # the template restored: the same ids, only the rotary split differs
    tmpl["chat_template"] = qwen.CHAT_TEMPLATE
    (folder / "chat_template.json").write_text(json.dumps(tmpl))
    off3 = qwen.official({**info, "model": str(folder)}, str(QWEN_PY), "fp32", methods, 4, tmp_path / "rope")
    prep3, unpruned3 = qwen.compare(off3, mine, "fp32", 1e-5, info["eos"])
    assert prep3.ok and not unpruned3.ok and "logits max abs diff" in unpruned3.detail
