"""The vLLM plugin (integrations/vllm, issue 30): pre-LLM methods inside vLLM's engine on a tiny LLaVA-1.5,
checked against our HF engine on the same pixels and prompt ids: the prompt holds text + the budget's
visual tokens, the kept tokens are the HF engine's, and the greedy tokens equal the HF engine's pruned
generate() (fp32). Runs in the environment scripts/vllm_env.sh builds (.venv-vllm); skipped elsewhere:

    bash scripts/vllm_env.sh && .venv-vllm/bin/python -m pytest tests/test_vllm_plugin.py
"""

import json
import os

import pytest

vllm = pytest.importorskip("vllm", reason="the vLLM plugin's tests run in .venv-vllm (bash scripts/vllm_env.sh)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_NEW = 6
#: the pre-LLM methods, with the options that make them run on the tiny model (4 decoder layers)
METHODS = {
    "none": {}, "random": {}, "consensusdrop": {}, "attnmix": {}, "visionzip": {}, "fastervlm": {}, "divprune": {},
    "cdpruner": {}, "vispruner": {}, "hiprune": {}, "downsample": {}, "prumerge": {"budget_mode": "fixed"},
    "apet": {"llm_stage": False},  # ApET's vision stage alone (its LLM stage is refused by the plugin)
    "consensusdrop:probe": {"preset": "probe"},
}
BUDGET = 16
#: LLaVA-NeXT (anyres crops, newline tokens, per-crop budgets): the count per image size from the geometry twin
NEXT_METHODS = ["none", "random", "visionzip", "consensusdrop", "fastervlm", "divprune", "attnmix", "cdpruner"]
#: Qwen2.5-VL (M-RoPE: kept tokens keep their 3-D positions; the count per resized grid from the twin)
#: Qwen3-VL's 32-px merged patches: a larger image so that 16 of its tokens prune
IMAGE_SIZE = {"qwen3_vl": (300, 220)}
QWEN_METHODS = ["none", "random", "visionzip", "consensusdrop", "fastervlm", "divprune", "cdpruner",
                "consensusdrop:probe"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from integrations.vllm.tiny import (save_tiny_llava, save_tiny_llava_next, save_tiny_llava_onevision,
                                        save_tiny_qwen2_5_vl, save_tiny_qwen3_vl)

    return {"llava": str(save_tiny_llava(tmp_path_factory.mktemp("tiny_llava_vllm"))),
            "llava_next": str(save_tiny_llava_next(tmp_path_factory.mktemp("tiny_llava_next_vllm"))),
            "llava_onevision": str(save_tiny_llava_onevision(tmp_path_factory.mktemp("tiny_onevision_vllm"))),
            "qwen2_5_vl": str(save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen25vl_vllm"))),
            "qwen3_vl": str(save_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3vl_vllm")))}


@pytest.fixture(scope="module")
def ckpt(ckpts):
    return ckpts["llava"]


def image(seed, w=140, h=100):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def hfs(ckpts):
    from llava.models import load

    return {f: load(c, dtype="float32") for f, c in ckpts.items()}


@pytest.fixture(scope="module")
def hf(hfs):
    return hfs["llava"]


def hf_inputs(rt, question, img):
    """What vLLM gets (prompt ids with one <image>) and the HF engine's expanded ids and pixels (the checkpoint's
    image processor, no pad-to-square: what vLLM's processor does with the image)."""
    rt.processor.pad_to_square = False
    enc = rt.processor([question], images=[img])
    ids = enc["input_ids"][0].tolist()
    tok = rt.model.config.image_token_id
    first = ids.index(tok)
    n = sum(1 for t in ids if t == tok)
    prompt = ids[:first] + [tok] + ids[first + n:]
    return prompt, torch.tensor([ids]), {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}


def hf_generate(rt, method, options, question, img, budget: int = BUDGET):
    prompt, ids, visual = hf_inputs(rt, question, img)
    eng = rt.prune(method, budget if method != "none" else None, **options)
    try:
        with torch.inference_mode():
            out = rt.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **visual,
                                    max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
        sel = eng.selections.get(("vision", 0))
        kept = None if sel is None else (sel.keep.tolist(), None if sel.targets is None else sel.targets.tolist())
        n_in = eng.stats.samples[0].visual_entering_llm
    finally:
        eng.remove()
    return prompt, out[0, ids.shape[1]:].tolist(), kept, n_in


def vllm_llm(ckpt, method, options, videos: bool = False, budget: int = BUDGET):
    """vLLM with the plugin; ``videos``: one video per prompt allowed too (Qwen2.5-VL, OneVision; opt-in)."""
    from vllm import LLM

    from integrations.vllm import overrides

    name = method.split(":")[0]
    ov = overrides(ckpt, name, budget if name != "none" else None, **options)
    return LLM(model=ckpt, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, hf_overrides=ov,
               limit_mm_per_prompt={"image": 1, **({"video": 1} if videos else {})})


def vllm_generate(llm, prompts_imgs):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    reqs = [{"prompt_token_ids": p, "multi_modal_data": {"image": img}} for p, img in prompts_imgs]
    return llm.generate(reqs, sp, use_tqdm=False)


QUESTIONS = ["what is in the image?", "how many objects are there?"]


def pre_llm(family: str) -> list[str]:
    """Every registered pre-LLM method that runs on ``family`` (in-tower stages and novisual are refused by the
    plugin, tested below), with METHODS' option variants."""
    from llava.method import available_methods, get_method

    out = []
    for name in available_methods():
        if name in ("novisual",) or name.startswith("test_"):  # test-registered example methods
            continue
        try:
            m = get_method(name, BUDGET if name != "none" else None, **METHODS.get(name, {}))
            m.setup(num_layers=4, num_vision_layers=3, family=family)
        except (TypeError, ValueError):
            continue
        if not m.llm_layers and m.supports(family) and not m.tower_stage:
            out.append(name)
    return out + ["consensusdrop:probe"]


#: (family, method) -> why the plugin refuses it on the tiny checkpoints (the engine refuses it there too)
REFUSED = {
    # AdaV keeps 2*floor(floor(B/2)/N) per crop: 16 over OneVision's 10 crops at the size vLLM profiles keeps nothing
    ("llava_onevision", "attnmix"): "keeps nothing",
}
MATRIX = [(f, m) for f in ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl") for m in pre_llm(f)]


@pytest.mark.parametrize("family,method", MATRIX)
def test_pruned_prompt_kept_tokens_and_greedy_equal_the_hf_engine(ckpts, hfs, family, method, tmp_path, monkeypatch):
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    name, opts = method.split(":")[0], METHODS.get(method, {})
    ckpt, hf = ckpts[family], hfs[family]
    if (family, name) in REFUSED:
        from integrations.vllm.spec import PluginError

        with pytest.raises(PluginError, match=REFUSED[(family, name)]):
            vllm_llm(ckpt, method, opts)
        return
    img = image(1, *IMAGE_SIZE.get(family, (140, 100)))
    refs = [hf_generate(hf, name, opts, q, img) for q in QUESTIONS]
    llm = vllm_llm(ckpt, method, opts)
    outs = vllm_generate(llm, [(r[0], img) for r in refs])
    kept = [json.loads(ln) for ln in record.read_text().splitlines()] if record.exists() else []
    for q, (prompt, tokens, sel, n_in), out in zip(QUESTIONS, refs, outs):
        n_text = len(prompt) - 1
        assert len(out.prompt_token_ids) == n_text + n_in, (q, len(out.prompt_token_ids), n_text, n_in)
        assert list(out.outputs[0].token_ids) == tokens, (method, q)
        if sel is not None:
            mine = [k for k in kept if "keep" in k and k["prompt"] == prompt]
            assert mine and mine[-1]["keep"] == sel[0] and mine[-1]["targets"] == sel[1], (method, q)
    if name != "none" and family == "llava":
        assert n_in <= BUDGET + 1 and len(outs[0].prompt_token_ids) < len(refs[0][0]) - 1 + 64


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [(140, 100), (90, 200), (300, 60)])
def test_counts_per_image_size_equal_the_engine(ckpts, hfs, family, size):
    """The geometry twin's count for each image size equals the HF engine's on the real checkpoint."""
    from integrations.vllm.spec import PruneSpec
    from integrations.vllm.twin import twin_for

    rt = hfs[family]
    for method in ("none", "visionzip", "divprune"):
        spec = PruneSpec.from_dict({"method": method, "budget": None if method == "none" else BUDGET})
        stock, planned = twin_for(ckpts[family], spec).count(*size)
        prompt, ids, _ = hf_inputs(rt, QUESTIONS[0], image(7, *size))
        _, _, _, n_in = hf_generate(rt, method, {}, QUESTIONS[0], image(7, *size))
        assert (stock, planned) == (ids.shape[1] - len(prompt) + 1, n_in), (method, size)


def test_query_aware_selection_differs_per_question_on_one_image(ckpt, tmp_path, monkeypatch):
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    from llava.models import load

    rt = load(ckpt, dtype="float32")
    img = image(2)
    prompts = [hf_inputs(rt, q, img)[0] for q in QUESTIONS]
    llm = vllm_llm(ckpt, "consensusdrop", {})
    vllm_generate(llm, [(p, img) for p in prompts])
    kept = [json.loads(ln) for ln in record.read_text().splitlines()]
    by_prompt = {tuple(k["prompt"]): (k["keep"], k["targets"]) for k in kept if "keep" in k}
    assert len(by_prompt) == 2 and by_prompt[tuple(prompts[0])] != by_prompt[tuple(prompts[1])]


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl"])
def test_a_mixed_batch_equals_each_request_alone(ckpts, hfs, family):
    """Images of other sizes (other counts on NeXT / Qwen) and other questions in one generate call."""
    hf = hfs[family]
    w, h = IMAGE_SIZE.get(family, (140, 100))
    imgs = [image(3, w, h), image(4, h, w + 20), image(5, w + 40, h)]
    qs = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[1]]
    prompts = [hf_inputs(hf, q, im)[0] for q, im in zip(qs, imgs)]
    llm = vllm_llm(ckpts[family], "visionzip", {})
    together = [list(o.outputs[0].token_ids) for o in vllm_generate(llm, list(zip(prompts, imgs)))]
    alone = [list(vllm_generate(llm, [(p, im)])[0].outputs[0].token_ids) for p, im in zip(prompts, imgs)]
    assert together == alone


@pytest.mark.parametrize("method,budget,why", [("fastv", BUDGET, "prunes inside the LLM"),
                                               ("sparsevlm", 64, "prunes inside the LLM"),
                                               ("dart", BUDGET, "prunes inside the LLM"),
                                               ("flowcut", BUDGET, "inside the vision tower"),
                                               ("novisual", BUDGET, "keeps no visual token"),
                                               ("prumerge", None, "depends on the image"),
                                               ("restore", 8, "biases the decoder's attention")])
def test_methods_the_plugin_cannot_run_are_refused_with_the_reason(ckpt, method, budget, why):
    from integrations.vllm import overrides
    from integrations.vllm.spec import PluginError

    with pytest.raises(PluginError, match=why):
        overrides(ckpt, method, budget)


# ---------------------------------------------------------------- the harness: eval run --backend vllm


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("pope_vllm"), ["pope"])


def eval_run(ckpt, data, out, backend, method, budget, *extra):
    from eval.cli import main

    return main(["run", "pope", "--model", ckpt, "--method", method, "--budget", str(budget), "--data-root", str(data),
                 "--out", str(out), "--no-wandb", "--backend", backend, "--batch-size", "4", "--max-new-tokens", "6",
                 "--dtype", "float32", *extra])


# random: its draws are keyed by the question id in both backends (mm_processor_kwargs vtprune_sample_key)
@pytest.mark.parametrize("family,method,budget", [("llava", "visionzip", 16), ("llava", "consensusdrop", 16),
                                                   ("llava", "random", 16), ("qwen2_5_vl", "random", 16),
                                                   ("llava", "none", "none"), ("llava_next", "visionzip", 16),
                                                   ("llava_onevision", "consensusdrop", 16),
                                                   ("qwen2_5_vl", "visionzip", 16), ("qwen3_vl", "visionzip", 16)])
def test_harness_backend_vllm_answers_as_the_hf_backend(ckpts, pope, tmp_path, monkeypatch, family, method, budget):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    ckpt = ckpts[family]
    out = tmp_path / "runs"
    assert eval_run(ckpt, pope, out, "hf", method, budget) == 0
    assert eval_run(ckpt, pope, out, "vllm", method, budget) == 0
    name = f"{os.path.basename(ckpt)}_{method}" + (f"_b{budget}" if budget != "none" else "")
    hf_dir, vl_dir = out / "pope" / name, out / "pope" / f"{name}_vllm"
    read = lambda d: [json.loads(ln) for ln in (d / "merge.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["text"] for r in read(vl_dir)] == [r["text"] for r in read(hf_dir)]
    res = {d: json.loads((d / "results.json").read_text()) for d in (hf_dir, vl_dir)}
    assert res[vl_dir]["metrics"] == res[hf_dir]["metrics"]
    assert res[vl_dir]["tokens"]["tok_in"] == res[hf_dir]["tokens"]["tok_in"]
    assert res[vl_dir]["tokens"]["visual_candidates_mean"] == res[hf_dir]["tokens"]["visual_candidates_mean"]
    if family == "llava":
        assert res[vl_dir]["tokens"]["tok_in"] == (64 if budget == "none" else budget)
    cfg = json.loads((vl_dir / "run_config.json").read_text())
    assert cfg["fingerprint"]["backend"]["name"] == "vllm" and cfg["resolved"]["backend"]["planned_tokens_per_image"]
    # the same command again: every answer kept (resume), nothing recomputed
    assert eval_run(ckpt, pope, out, "vllm", method, budget) == 0
    assert cfg["resumes"] == [] and json.loads((vl_dir / "run_config.json").read_text())["resumes"][-1]["kept"] == 6


def test_harness_backend_vllm_refusals(ckpt, pope, tmp_path, capsys):
    from eval.cli import main

    base = ["run", "pope", "--data-root", str(pope), "--out", str(tmp_path), "--no-wandb", "--backend", "vllm"]
    assert main(base + ["--model", "tiny:llava"]) == 2
    assert "checkpoint folder or hub id" in capsys.readouterr().err
    assert main(base + ["--model", ckpt, "--fast"]) == 2
    assert "fast path" in capsys.readouterr().err
    assert main(base + ["--model", ckpt, "--method", "fastv", "--budget", "16"]) == 2
    assert "prunes inside the LLM" in capsys.readouterr().err


@pytest.mark.parametrize("family,method", [("qwen2_5_vl", "visionzip"), ("qwen2_5_vl", "divprune"),
                                           ("qwen3_vl", "visionzip")])
def test_qwen_kept_tokens_keep_their_mrope_positions_in_vllm(ckpts, hfs, family, method, tmp_path, monkeypatch):
    """vLLM's decoder gets the positions the HF engine gives the pruned prompt: each kept token its 3-D position in
    the unpruned image, the text after the image its unpruned positions."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    rt = hfs[family]
    img = image(11, *IMAGE_SIZE.get(family, (170, 90)))
    prompt, ids, visual = hf_inputs(rt, QUESTIONS[1], img)
    eng = rt.prune(method, BUDGET)
    try:
        _, _, pos, _ = eng.vision_inputs(ids, visual)
        keep = eng.selections[("vision", 0)].keep
    finally:
        eng.remove()
    vllm_generate(vllm_llm(ckpts[family], method, {}), [(prompt, img)])
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    got = [r for r in rows if "positions" in r and r["prompt"] == prompt]
    assert got and got[-1]["positions"] == pos[:, 0].tolist()
    # the kept visual tokens sit at their stock 3-D positions: not contiguous (the grid is 2-D)
    start = prompt.index(rt.model.config.image_token_id)
    vis = torch.tensor(got[-1]["positions"])[:, start:start + BUDGET]
    assert vis[1].unique().numel() > 1 and vis[2].unique().numel() > 1 and keep.numel() <= BUDGET
    assert got[-1]["delta"] == int(pos.max()) + 1 - pos.shape[-1]


def test_the_trained_testbed_through_vllm_equals_the_hf_backend(tmp_path, monkeypatch):
    """The shipped testbed checkpoint (LLM head size 32: vLLM's CPU attention takes it), exported to the hub layout
    (integrations.vllm.tiny.export_for_vllm): the shapes benchmark through --backend vllm answers every question as
    the HF backend (ConsensusDrop at 16 of 64 tokens)."""
    from pathlib import Path

    from eval.cli import main
    from integrations.vllm.tiny import export_for_vllm

    monkeypatch.setenv("WANDB_MODE", "disabled")
    src = Path(__file__).resolve().parents[1] / "testbed" / "weights"
    if not (src / "config.json").exists():
        pytest.skip("testbed/weights is missing")
    model = str(export_for_vllm(src, tmp_path / "testbed_vllm"))
    out = tmp_path / "runs"
    for backend in ("hf", "vllm"):
        assert main(["run", "shapes", "--model", model, "--method", "consensusdrop", "--budget", "16", "--data-root", ".",
                     "--out", str(out), "--no-wandb", "--batch-size", "50", "--backend", backend,
                     "--bench-opt", "n=100"]) == 0
    runs = sorted((out / "shapes").iterdir())
    answers = [[json.loads(ln)["text"] for ln in (d / "merge.jsonl").read_text().splitlines()] for d in runs]
    assert len(answers) == 2 and len(answers[0]) == 100 and answers[0] == answers[1]
    # answers that differ by question (17 different of 100 on the HF backend), so the equality compares real answers
    assert len(set(answers[0])) >= 10, sorted(set(answers[0]))
    res = [json.loads((d / "results.json").read_text())["metrics"]["Shapes"] for d in runs]
    assert res[0] == res[1]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_runs_the_vision_stage_once_per_image(ckpts, hfs, family, tmp_path, monkeypatch):
    """The selection made when vLLM admits the request (for its positions) hands its embeddings to the encoder
    step: one vision-stage run per image (the record holds one selection per request)."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    w, h = IMAGE_SIZE.get(family, (140, 100))
    reqs = [(hf_inputs(hfs[family], q, image(20 + i, w, h))[0], image(20 + i, w, h)) for i, q in enumerate(QUESTIONS)]
    vllm_generate(vllm_llm(ckpts[family], "visionzip", {}), reqs)
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    sel = [r for r in rows if "keep" in r]
    assert len(sel) == len(reqs) and {tuple(r["prompt"]) for r in sel} == {tuple(p) for p, _ in reqs}


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision"])
def test_vllms_own_tower_is_freed_on_the_llava_families(ckpts, hfs, family, tmp_path, monkeypatch):
    """The plugin's vision stage runs transformers' tower: vLLM's own tower and projector are freed after loading
    (their weights are not in memory twice), and pruned requests still equal the HF engine."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    img = image(1)
    prompt, tokens, _, _ = hf_generate(hfs[family], "visionzip", {}, QUESTIONS[0], img)
    out = vllm_generate(vllm_llm(ckpts[family], "visionzip", {}), [(prompt, img)])[0]
    assert list(out.outputs[0].token_ids) == tokens
    rows = [json.loads(ln) for ln in record.read_text().splitlines() if "freed_params" in ln]
    cfg = hfs[family].model.config
    tower = sum(p.numel() for p in hfs[family].model.model.vision_tower.parameters())
    proj = sum(p.numel() for p in hfs[family].model.model.multi_modal_projector.parameters())
    assert rows and rows[-1]["freed_params"] > 0.5 * (tower + proj) and cfg is not None


# ---------------------------------------------------------------- the checkpoint's revision (issue 30 follow-up)

REVISION_CODE = r"""
import json, sys
import test_vllm_plugin as P  # the helpers above (this process reads the hub cache of HF_HUB_CACHE)
from integrations.vllm import overrides
from integrations.vllm.spec import PluginError
from llava.models import load

B, Q = sys.argv[1], P.QUESTIONS[0]
img = P.image(1, 300, 60)
out = {}
for rev in (None, B):  # our HF engine at each revision
    out[str(rev)] = P.hf_generate(load("org/tiny-next", dtype="float32", revision=rev), "visionzip", {}, Q, img)
from vllm import LLM

ov = overrides("org/tiny-next", "visionzip", P.BUDGET, revision=B)
llm = LLM(model="org/tiny-next", revision=B, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
          hf_overrides=ov, limit_mm_per_prompt={"image": 1})
res = P.vllm_generate(llm, [(out[B][0], img)])[0]
out["vllm"] = [len(res.prompt_token_ids), list(res.outputs[0].token_ids)]
del llm
try:  # the spec made for B, served at the default branch
    LLM(model="org/tiny-next", dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, hf_overrides=ov,
        limit_mm_per_prompt={"image": 1})
    out["refused"] = None
except Exception as e:  # noqa: BLE001 - vLLM may wrap the plugin's error
    out["refused"] = f"{type(e).__name__}: {e}"
print("RESULT " + json.dumps(out))
"""


def test_a_checkpoint_served_at_a_revision_equals_the_hf_engine_at_that_revision(tmp_path):
    """A hub cache (offline, a fresh process) holding a tiny LLaVA-NeXT at two commits: main (A, seed 1, five anyres
    pinpoints) and B (seed 2, one 112 x 112 pinpoint: fewer crops, so another count). Served with
    LLM(revision=B, hf_overrides=overrides(..., revision=B)), the prompt length (the twin's count read at B) and the
    greedy tokens (B's weights in vLLM's decoder and in the plugin's vision stage) equal our HF engine loaded at B,
    which differ from main's; the same spec served at main is refused."""
    import subprocess
    import sys
    from pathlib import Path

    from integrations.vllm.tiny import save_tiny_llava_next

    A, B = "a" * 40, "b" * 40
    repo = tmp_path / "hub" / "models--org--tiny-next"
    save_tiny_llava_next(repo / "snapshots" / A, seed=1)
    snap = save_tiny_llava_next(repo / "snapshots" / B, seed=2)
    n = 0
    for f in snap.glob("*.json"):  # B's anyres grid, in its config and its processor
        data = json.loads(f.read_text())
        for d in [data] + [v for v in data.values() if isinstance(v, dict)]:
            if "image_grid_pinpoints" in d:
                d["image_grid_pinpoints"] = [[112, 112]]
                n += 1
        f.write_text(json.dumps(data))
    assert n >= 2
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    p = subprocess.run([sys.executable, "-c", REVISION_CODE, B], env=env, capture_output=True, text=True, cwd=root,
                       timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, (p.stdout[-2000:], p.stderr[-4000:])
    out = json.loads(lines[-1][len("RESULT "):])
    main_prompt, _, _, main_in = out["None"]
    prompt, tokens, _, n_in = out[B]
    assert main_prompt == prompt  # one placeholder: the text is the same; the image's count is not
    assert n_in != main_in and out["None"][1] != tokens  # B is another checkpoint: another count, other tokens
    assert out["vllm"] == [len(prompt) - 1 + n_in, tokens]
    assert out["refused"] and f"made for revision {B!r}" in out["refused"], out["refused"]


# ---------------------------------------------------------------- Qwen2.5-VL videos (issue 30)

#: pre-LLM methods on Qwen2.5-VL videos inside vLLM (each temporal slice of 2 frames a unit: BUDGET per slice)
VIDEO_METHODS = ["none", "visionzip", "fastervlm", "consensusdrop", "random", "divprune", "consensusdrop:probe"]
VIDEO_QUESTIONS = ["what happens in the video?", "how many objects move?"]
#: top-5 log-probabilities of every generated token: vLLM's decoder vs the HF engine's pruned generate() (fp32)
LOGPROB_TOL = 1e-4


def video(seed, n=8, w=140, h=100):
    """``n`` random RGB frames of one size (bare frames: our processor's default timing, 24 fps)."""
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def hf_video(rt, method, options, question, frames, budget: int = BUDGET):
    """Our HF engine on one video prompt: vLLM's prompt (the video's run collapsed to one placeholder), the greedy
    tokens and each step's log-probabilities, the selection, the tokens entering the LLM, the positions the engine
    gives the pruned prompt (M-RoPE; None on 1-D RoPE families), the tokens unpruned and the pixels' sum."""
    from integrations.vllm.inputs import collapse
    from integrations.vllm.stage import pruned_ids

    cfg = rt.model.config
    enc = rt.processor([question], videos=[frames])
    ids = enc["input_ids"][0].tolist()
    markers = (cfg.vision_start_token_id, cfg.vision_end_token_id) if rt.family == "qwen3_vl" else None
    prompt = collapse(ids, cfg.video_token_id, markers)
    eng = rt.prune(method, budget if method != "none" else None, **options)
    try:
        with torch.inference_mode():
            out = rt.model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, output_logits=True,
                                    return_dict_in_generate=True)
            sel = eng.selections.get(("vision", 0))
            kept = None if sel is None else (sel.keep.tolist(), None if sel.targets is None else sel.targets.tolist())
            n_in = eng.stats.samples[0].visual_entering_llm
            visual = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            _, _, pos, info = eng.vision_inputs(enc["input_ids"], visual)
            _, runs = eng.visual_runs(enc["input_ids"], info)[0]
    finally:
        eng.remove()
    return {"prompt": prompt, "tokens": out.sequences[0, enc["input_ids"].shape[1]:].tolist(),
            "logprobs": [torch.log_softmax(x[0].float(), -1) for x in out.logits], "kept": kept, "n_in": n_in,
            "positions": None if pos is None else pos[:, 0].tolist(), "runs": runs, "expanded": ids,
            "pruned": pruned_ids(ids, {cfg.video_token_id}, runs, cfg.video_token_id),
            "stock": int((enc["input_ids"] == cfg.video_token_id).sum()),
            "pixels": float(enc["pixel_values_videos"].double().sum())}


def video_request(prompt, frames, **kw):
    from integrations.vllm.inputs import video_data

    return {"prompt_token_ids": prompt, "multi_modal_data": {"video": video_data(frames)}, **kw}


def vllm_video_generate(llm, reqs):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=5)
    return llm.generate(reqs, sp, use_tqdm=False)


def max_logprob_diff(out, ref) -> float:
    return max(abs(v.logprob - float(ref[k][t])) for k, step in enumerate(out.outputs[0].logprobs)
               for t, v in step.items())


def test_vllms_qwen_video_processor_gives_our_processors_inputs_bit_for_bit(ckpts, hfs):
    """What vLLM's processor runs on a Qwen2.5-VL video (the checkpoint's Qwen2_5_VLProcessor: transformers' video
    processor, torchvision's Python part here) on the item the plugin's helper builds equals our processor's
    pixel_values_videos, video_grid_thw and second_per_grid_ts bit for bit: odd frame counts, frames scaled up and
    down, bare frames and frames with their timing."""
    from transformers import AutoProcessor

    from integrations.vllm.inputs import video_data
    from llava.preprocess_qwen_video import Frames

    rt = hfs["qwen2_5_vl"]
    hf = AutoProcessor.from_pretrained(ckpts["qwen2_5_vl"])
    clips = [video(60, 8, 140, 100), video(61, 5, 33, 20), video(62, 3, 400, 300),
             Frames(video(63, 6, 90, 120), fps=30.0, total_num_frames=300, frames_indices=list(range(0, 300, 50)))]
    for clip in clips:
        ours = rt.processor([VIDEO_QUESTIONS[0]], videos=[clip])
        arr, meta = video_data(clip)
        theirs = hf(text=["<|video_pad|>"], videos=[arr],
                    video_metadata=[{k: v for k, v in meta.items() if k != "do_sample_frames"}],
                    do_sample_frames=False, return_tensors="pt")
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            a, b = ours[key], torch.as_tensor(theirs[key])
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), key


@pytest.mark.parametrize("method", VIDEO_METHODS)
def test_qwen_video_prompt_positions_and_greedy_equal_the_hf_engine(ckpts, hfs, method, tmp_path, monkeypatch):
    """A Qwen2.5-VL video inside vLLM: the prompt holds text + the engine's count (BUDGET per temporal slice), the
    kept tokens are the engine's, vLLM's decoder gets the engine's positions of the pruned prompt (each kept token its
    3-D (t, h, w) position, the time axis spaced by second_per_grid_ts), vLLM's video processor gives our processor's
    pixels bit for bit, and the greedy tokens and their log-probabilities equal the HF engine's."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    name, opts = method.split(":")[0], METHODS[method]
    rt = hfs["qwen2_5_vl"]
    clips = [video(30, 8, 140, 100), video(31, 5, 100, 150)]  # 4 slices of 5 x 4 tokens; 3 slices (padded) of 4 x 4
    refs = [hf_video(rt, name, opts, q, c) for q, c in zip(VIDEO_QUESTIONS, clips)]
    outs = vllm_video_generate(vllm_llm(ckpts["qwen2_5_vl"], method, opts, videos=True),
                               [video_request(r["prompt"], c) for r, c in zip(refs, clips)])
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    for ref, out in zip(refs, outs):
        assert len(out.prompt_token_ids) == len(ref["prompt"]) - 1 + ref["n_in"], (method, len(out.prompt_token_ids))
        if name != "none":
            assert ref["n_in"] < ref["stock"]
        assert list(out.outputs[0].token_ids) == ref["tokens"], method
        assert max_logprob_diff(out, ref["logprobs"]) < LOGPROB_TOL, method
        mine = [r for r in rows if r.get("prompt") == ref["prompt"]]
        sel = [r for r in mine if "keep" in r]
        assert len(sel) == 1, "one vision-stage run per video"
        assert sel[0]["pixels"] == ref["pixels"] and sel[0]["tokens"] == ref["n_in"]
        if ref["kept"] is not None:
            assert (sel[0]["keep"], sel[0]["targets"]) == ref["kept"], method
        pos = [r for r in mine if "positions" in r]
        assert pos and pos[-1]["modality"] == "video" and pos[-1]["positions"] == ref["positions"]
        assert pos[-1]["delta"] == max(row[-1] for row in ref["positions"]) + 1 - len(ref["positions"][0])
    # the time axis: second_per_grid_ts = 2 / 24 fps, tokens_per_second 2 -> every slice at t = 0 (int(k / 6))
    start = refs[0]["prompt"].index(hfs["qwen2_5_vl"].model.config.video_token_id)
    vis = torch.tensor(refs[0]["positions"])[:, start:start + refs[0]["n_in"]]
    assert vis[1].unique().numel() > 1 and vis[2].unique().numel() > 1


def test_qwen_video_time_axis_follows_the_frames_timing(ckpts, hfs, tmp_path, monkeypatch):
    """A video with its source timing (a Frames: 1 fps, every 4th frame of 32): second_per_grid_ts = 8 s per slice,
    so the slices' M-RoPE time positions step by 16 (tokens_per_second 2); vLLM's decoder gets them."""
    from llava.preprocess_qwen_video import Frames

    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    rt = hfs["qwen2_5_vl"]
    clip = Frames(video(33, 8, 140, 100), fps=1.0, total_num_frames=32, frames_indices=list(range(0, 32, 4)))
    ref = hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[0], clip)
    llm = vllm_llm(ckpts["qwen2_5_vl"], "visionzip", {}, videos=True)
    out = vllm_video_generate(llm, [video_request(ref["prompt"], clip)])[0]
    assert list(out.outputs[0].token_ids) == ref["tokens"] and max_logprob_diff(out, ref["logprobs"]) < LOGPROB_TOL
    row = [json.loads(ln) for ln in record.read_text().splitlines() if '"positions"' in ln][-1]
    got = row["positions"]
    assert got == ref["positions"]
    start = ref["prompt"].index(rt.model.config.video_token_id)
    assert sorted(set(got[0][start:start + ref["n_in"]])) == [start + 16 * k for k in range(4)]
    # the time axis passes the text after the video (transformers' rule: text continues after the frames' extent);
    # decoding continues after the last prompt position, as generate() does, not after the largest
    assert max(got[0]) > got[0][-1] and row["delta"] == got[0][-1] + 1 - len(got[0])


def test_qwen_a_mixed_batch_of_videos_and_images_equals_each_request_alone(ckpts, hfs):
    """Videos of other sizes and frame counts beside an image, other questions, one generate call."""
    rt = hfs["qwen2_5_vl"]
    clips = [video(40, 8, 140, 100), video(41, 6, 100, 170)]
    img = image(42)
    reqs = [video_request(hf_video(rt, "none", {}, VIDEO_QUESTIONS[0], clips[0])["prompt"], clips[0]),
            {"prompt_token_ids": hf_inputs(rt, QUESTIONS[1], img)[0], "multi_modal_data": {"image": img}},
            video_request(hf_video(rt, "none", {}, VIDEO_QUESTIONS[1], clips[1])["prompt"], clips[1])]
    llm = vllm_llm(ckpts["qwen2_5_vl"], "visionzip", {}, videos=True)
    together = vllm_video_generate(llm, reqs)
    alone = [vllm_video_generate(llm, [r])[0] for r in reqs]
    assert [list(o.outputs[0].token_ids) for o in together] == [list(o.outputs[0].token_ids) for o in alone]
    assert [len(o.prompt_token_ids) for o in together] == [len(o.prompt_token_ids) for o in alone]
    for a, b in zip(together, alone):
        assert max(abs(x.logprob - b.outputs[0].logprobs[k][t].logprob)
                   for k, step in enumerate(a.outputs[0].logprobs) for t, x in step.items()) < LOGPROB_TOL


def test_qwen_video_refusals(ckpts, hfs):
    """What the plugin does not serve is refused with the reason, and the engine goes on serving: an image and a video
    in one prompt, two videos in one prompt (one visual item per prompt: vLLM's limit), videos on a server that did
    not ask for them, in-LLM methods (before vLLM starts)."""
    from integrations.vllm import overrides
    from integrations.vllm.inputs import video_data
    from integrations.vllm.spec import PluginError

    rt = hfs["qwen2_5_vl"]
    cfg = rt.model.config
    clip, img = video(50), image(51)
    ref = hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[0], clip)
    llm = vllm_llm(ckpts["qwen2_5_vl"], "visionzip", {}, videos=True)
    both = [cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id] + hf_inputs(rt, QUESTIONS[0], img)[0]
    with pytest.raises(ValueError, match="one image or one video per prompt"):
        vllm_video_generate(llm, [{"prompt_token_ids": both,
                                   "multi_modal_data": {"image": img, "video": video_data(clip)}}])
    with pytest.raises(Exception, match="At most 1 video"):  # vLLM's VLLMValidationError
        vllm_video_generate(llm, [{"prompt_token_ids": ref["prompt"] + ref["prompt"],
                                   "multi_modal_data": {"video": [video_data(clip)] * 2}}])
    out = vllm_video_generate(llm, [video_request(ref["prompt"], clip)])[0]  # still serving
    assert list(out.outputs[0].token_ids) == ref["tokens"]
    del llm
    # videos are opt-in (limit_mm_per_prompt={"video": 1}): an image-only server counts no video at start-up
    images_only = vllm_llm(ckpts["qwen2_5_vl"], "visionzip", {})
    with pytest.raises(Exception, match="At most 0 video"):
        vllm_video_generate(images_only, [video_request(ref["prompt"], clip)])
    del images_only
    for method in ("fastv", "dart"):
        with pytest.raises(PluginError, match="prunes inside the LLM"):
            overrides(ckpts["qwen2_5_vl"], method, BUDGET)


# ---------------------------------------------------------------- LLaVA-OneVision videos (issue 30)

#: per-frame budgets that prune the tiny OneVision's 4 x 4 pooled tokens per frame (downsample: 2 x 2 windows reach 4);
#: AttnMix's budget is per video (2 * floor(floor(B / 2) / frames) per frame: 32 keeps 2 per frame at the 16 frames
#: vLLM profiles with)
OV_VIDEO_BUDGET = 6
OV_VIDEO_BUDGETS = {"downsample": 4, "attnmix": 32}
#: top-5 log-probabilities: OneVision's 1-D RoPE decoder in vLLM vs the HF engine (fp32): a few float32 ulps (measured:
#: at most 9.5e-7, 2 ulps at |log p| of 8-16)
OV_LOGPROB_TOL = 2e-6


def ov_budget(method: str) -> int:
    return OV_VIDEO_BUDGETS.get(method.split(":")[0], OV_VIDEO_BUDGET)


def test_vllms_onevision_video_processor_gives_our_processors_pixels_bit_for_bit(ckpts, hfs):
    """What vLLM's processor runs on a OneVision video (the checkpoint's LlavaOnevisionProcessor: transformers'
    LlavaOnevisionVideoProcessor, torchvision's Python part here) on the item the plugin's helper builds equals our
    processor's pixel_values_videos bit for bit (frames scaled up and down to the tower's square, one frame, odd
    counts), and its placeholder run (frames x ceil(g / 2)^2 + 1, vLLM's get_num_video_tokens) is ours."""
    from transformers import AutoProcessor

    from integrations.vllm.inputs import video_data

    rt = hfs["llava_onevision"]
    hf = AutoProcessor.from_pretrained(ckpts["llava_onevision"])
    vid = rt.model.config.video_token_id
    for clip in (video(60, 8, 140, 100), video(61, 5, 33, 20), video(62, 3, 400, 300), video(63, 1, 112, 112)):
        ours = rt.processor([VIDEO_QUESTIONS[0]], videos=[clip])
        arr, _ = video_data(clip)
        theirs = hf(text="<video>", videos=arr, return_tensors="pt")
        a, b = ours["pixel_values_videos"], torch.as_tensor(theirs["pixel_values_videos"])
        assert a.shape == b.shape == (1, len(clip), 3, 112, 112) and a.dtype == b.dtype and torch.equal(a, b)
        n = int((ours["input_ids"] == vid).sum())
        assert n == int((theirs["input_ids"] == vid).sum()) == len(clip) * 16 + 1


@pytest.mark.parametrize("method", pre_llm("llava_onevision"))
def test_onevision_video_prompt_and_greedy_equal_the_hf_engine(ckpts, hfs, method, tmp_path, monkeypatch):
    """A LLaVA-OneVision video inside vLLM, every pre-LLM method the plugin runs on OneVision: the prompt holds text +
    the engine's count (per frame, the newline row where the engine keeps it), the kept tokens are the engine's, one
    vision-stage run per video on our processor's pixels, and the greedy tokens and their top-5 log-probabilities
    equal the HF engine's (fp32)."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    name, opts, budget = method.split(":")[0], METHODS.get(method, {}), ov_budget(method)
    rt = hfs["llava_onevision"]
    clips = [video(30, 8, 140, 100), video(31, 5, 100, 150)]  # 8 x 16 + 1 and 5 x 16 + 1 tokens unpruned
    refs = [hf_video(rt, name, opts, q, c, budget) for q, c in zip(VIDEO_QUESTIONS, clips)]
    outs = vllm_video_generate(vllm_llm(ckpts["llava_onevision"], method, opts, videos=True, budget=budget),
                               [video_request(r["prompt"], c) for r, c in zip(refs, clips)])
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    for ref, out, clip in zip(refs, outs, clips):
        assert ref["stock"] == len(clip) * 16 + 1
        assert len(out.prompt_token_ids) == len(ref["prompt"]) - 1 + ref["n_in"], (method, len(out.prompt_token_ids))
        if name != "none":
            assert ref["n_in"] < ref["stock"]
        assert list(out.outputs[0].token_ids) == ref["tokens"], method
        assert max_logprob_diff(out, ref["logprobs"]) < OV_LOGPROB_TOL, method
        sel = [r for r in rows if r.get("prompt") == ref["prompt"] and "keep" in r]
        assert len(sel) == 1, "one vision-stage run per video"
        assert sel[0]["pixels"] == ref["pixels"] and sel[0]["tokens"] == ref["n_in"]
        assert sel[0]["pixel_shape"] == [1, len(clip), 3, 112, 112]
        if ref["kept"] is not None:
            assert (sel[0]["keep"], sel[0]["targets"]) == ref["kept"], method


def mixed_batch(ckpts, hfs, family, clips, img, budget, tol):
    """VisionZip at ``budget`` on ``family``: the three videos ``clips`` (other questions) and the image ``img`` as four
    requests of one generate call (video, image, video, video), then each alone. Checks that the tokens and their
    log-probs (within ``tol``) are each request's alone and the HF engine's; returns (the HF references of the videos,
    the image's HF prompt and visual count, the outputs together, the outputs alone)."""
    rt = hfs[family]
    refs = [hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[i % 2], c, budget) for i, c in enumerate(clips)]
    img_prompt, img_tokens, _, img_in = hf_generate(rt, "visionzip", {}, QUESTIONS[1], img, budget)
    reqs = [video_request(refs[0]["prompt"], clips[0]),
            {"prompt_token_ids": img_prompt, "multi_modal_data": {"image": img}},
            video_request(refs[1]["prompt"], clips[1]), video_request(refs[2]["prompt"], clips[2])]
    llm = vllm_llm(ckpts[family], "visionzip", {}, videos=True, budget=budget)
    together = vllm_video_generate(llm, reqs)
    alone = [vllm_video_generate(llm, [r])[0] for r in reqs]
    assert [list(o.outputs[0].token_ids) for o in together] == [list(o.outputs[0].token_ids) for o in alone]
    for a, b in zip(together, alone):
        assert max(abs(x.logprob - b.outputs[0].logprobs[k][t].logprob)
                   for k, step in enumerate(a.outputs[0].logprobs) for t, x in step.items()) < tol
    want = [refs[0]["tokens"], img_tokens[:MAX_NEW], refs[1]["tokens"], refs[2]["tokens"]]
    assert [list(o.outputs[0].token_ids) for o in together] == want
    return refs, img_prompt, img_in, together, alone


def test_onevision_a_mixed_batch_of_videos_and_images_equals_each_request_alone(ckpts, hfs):
    """Videos of other sizes and frame counts (vLLM hands the worker a list; two of one frame count: a stacked tensor)
    beside an image, other questions, one generate call: each equals the request alone and the HF engine."""
    clips = [video(40, 8, 140, 100), video(41, 6, 100, 170), video(43, 8, 90, 60)]
    refs, img_prompt, img_in, together, alone = mixed_batch(ckpts, hfs, "llava_onevision", clips, image(42),
                                                            OV_VIDEO_BUDGET, OV_LOGPROB_TOL)
    assert [len(o.prompt_token_ids) for o in together] == [len(o.prompt_token_ids) for o in alone]
    assert [len(o.prompt_token_ids) for o in together] == [
        len(refs[0]["prompt"]) - 1 + refs[0]["n_in"], len(img_prompt) - 1 + img_in,
        len(refs[1]["prompt"]) - 1 + refs[1]["n_in"], len(refs[2]["prompt"]) - 1 + refs[2]["n_in"]]


def test_onevision_video_refusals(ckpts, hfs, monkeypatch):
    """What the plugin does not serve on OneVision videos is refused with the reason, and the engine goes on serving: an
    image and a video in one prompt, two videos in one prompt (vLLM's limit), videos on a server that did not ask for
    them, a method that keeps nothing per frame of vLLM's profiling video (AttnMix's budget is per video: 16 over 16
    frames), in-LLM methods; a selection whose count is not the one the prompt reserved is an error, never a silent
    mismatch."""
    from vllm import LLM

    from integrations.vllm import overrides
    from integrations.vllm.inputs import video_data
    from integrations.vllm.spec import PluginError

    rt = hfs["llava_onevision"]
    clip, img = video(50, 4), image(51)
    ref = hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[0], clip, OV_VIDEO_BUDGET)
    llm = vllm_llm(ckpts["llava_onevision"], "visionzip", {}, videos=True, budget=OV_VIDEO_BUDGET)
    vid = rt.model.config.video_token_id
    both = [vid] + hf_inputs(rt, QUESTIONS[0], img)[0]
    with pytest.raises(ValueError, match="one image or one video per prompt"):
        vllm_video_generate(llm, [{"prompt_token_ids": both,
                                   "multi_modal_data": {"image": img, "video": video_data(clip)}}])
    with pytest.raises(Exception, match="At most 1 video"):  # vLLM's VLLMValidationError
        vllm_video_generate(llm, [{"prompt_token_ids": ref["prompt"] + ref["prompt"],
                                   "multi_modal_data": {"video": [video_data(clip)] * 2}}])
    out = vllm_video_generate(llm, [video_request(ref["prompt"], clip)])[0]  # still serving
    assert list(out.outputs[0].token_ids) == ref["tokens"]
    del llm
    # videos are opt-in (limit_mm_per_prompt={"video": 1}): an image-only server counts no video at start-up
    images_only = vllm_llm(ckpts["llava_onevision"], "visionzip", {}, budget=OV_VIDEO_BUDGET)
    with pytest.raises(Exception, match="At most 0 video"):
        vllm_video_generate(images_only, [video_request(ref["prompt"], clip)])
    del images_only
    with pytest.raises(Exception, match="keeps nothing"):  # refused when vLLM counts its profiling video
        LLM(model=ckpts["llava_onevision"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
            hf_overrides=overrides(ckpts["llava_onevision"], "attnmix", 16),
            limit_mm_per_prompt={"image": 1, "video": 1})
    for method in ("fastv", "dart"):
        with pytest.raises(PluginError, match="prunes inside the LLM"):
            overrides(ckpts["llava_onevision"], method, OV_VIDEO_BUDGET)
    # the worker checks every video's kept rows against the count the front end reserved: a front end that reserved
    # one more (a twin out of step with the worker) fails the request with the reason
    from integrations.vllm.twin import Twin

    real = Twin.video_count
    monkeypatch.setattr(Twin, "video_count", lambda self, *key: (lambda c: (c[0], c[1] + 1))(real(self, *key)))
    llm = vllm_llm(ckpts["llava_onevision"], "visionzip", {}, videos=True, budget=OV_VIDEO_BUDGET)
    with pytest.raises(Exception, match="but vLLM reserved"):
        vllm_video_generate(llm, [video_request(ref["prompt"], clip)])


# ---------------------------------------------------------------- Qwen3-VL videos (issue 30)

#: Qwen3-VL videos: per temporal slice a timestamp ``<t seconds>`` and its own <|vision_start|> ... <|vision_end|>
#: run; the tiny's 32-px merged patches: 140 x 100 frames -> 5 x 4 = 20 tokens per slice, 100 x 150 -> 3 x 5 = 15.
#: The budget per slice (downsample: 2 x 2 windows reach 4 / 2); test_keep_first_k keeps the video's first k tokens
#: (the later slices empty: their timestamp and markers stay, 0 tokens)
Q3_VIDEO_BUDGET = 4
Q3_VIDEO_METHODS = pre_llm("qwen3_vl") + ["test_keep_first_k"]
#: methods refused on Qwen3-VL videos, with the reason (AttnMix ranks the whole video's tokens by text similarity:
#: each slice's share depends on the video, and vLLM lays every slice's run out before the encoder runs); its images
#: and its videos on the one-run families are served
Q3_VIDEO_REFUSED = {"attnmix": "splits its tokens over a video's temporal slices depending on the video"}
#: top-5 log-probabilities, vLLM's decoder vs the HF engine (fp32; measured: at most ~1e-6)
Q3_LOGPROB_TOL = 2e-6


def q3_clips():
    """A bare-frame video (no fps: our processor's 24 fps) and one with its timing whose slice times sit on .x5
    (0.45 s, 1.05 s, 1.40 s at 10 fps: a float32 copy of them would print another first decimal)."""
    from llava.preprocess_qwen_video import Frames

    return [video(30, 8, 140, 100),
            Frames(video(31, 5, 100, 150), fps=10.0, total_num_frames=60, frames_indices=[4, 5, 10, 11, 14])]


def our_slice_times(rt, clip) -> list[float]:
    """Our processor's slice times of a clip (the prompt's <t seconds>)."""
    from llava.preprocess_qwen_video import slice_times, timing

    idx, fps, _ = timing(clip, len(clip))
    return slice_times(rt.processor.video_settings, idx if idx is not None else list(range(len(clip))), fps)


def test_vllms_qwen3_video_processor_gives_our_processors_inputs_bit_for_bit(ckpts, hfs):
    """What transformers' Qwen3VLProcessor (vLLM's environment: the checkpoint's video processor, torchvision's Python
    part) makes of the item the plugin's helper builds equals our processor's pixel_values_videos, video_grid_thw and
    video prompt (a timestamp and a marked run per temporal slice, inside the template's own markers) bit for bit:
    odd frame counts, frames scaled up and down, bare frames (24 fps), frames with their timing, with indices but no
    fps (a GIF without durations), slice times on .x5."""
    from transformers import AutoProcessor

    from integrations.vllm.inputs import video_data
    from llava.preprocess_qwen_video import Frames

    rt = hfs["qwen3_vl"]
    cfg = rt.model.config
    hf = AutoProcessor.from_pretrained(ckpts["qwen3_vl"])
    clips = [video(60, 8, 140, 100), video(61, 5, 33, 20), video(62, 3, 400, 300), *q3_clips()[1:],
             Frames(video(63, 4, 90, 120), fps=None, total_num_frames=40, frames_indices=[0, 13, 26, 39])]
    marked = "<|vision_start|><|video_pad|><|vision_end|>"
    for clip in clips:
        ours = rt.processor([VIDEO_QUESTIONS[0]], videos=[clip])
        arr, meta = video_data(clip)
        meta = {k: v for k, v in meta.items() if k != "do_sample_frames"}
        theirs = hf(text=[marked], videos=[arr], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
        for key in ("pixel_values_videos", "video_grid_thw"):
            a, b = ours[key], torch.as_tensor(theirs[key])
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), key
        ids, run = ours["input_ids"][0].tolist(), theirs["input_ids"][0].tolist()
        start = ids.index(cfg.vision_start_token_id)
        slices = (len(arr) + 1) // 2  # the outer marker and one per temporal slice
        assert ids[start:start + len(run)] == run and run.count(cfg.vision_start_token_id) == slices + 1


@pytest.mark.parametrize("method", Q3_VIDEO_METHODS)
def test_qwen3_video_prompt_positions_and_greedy_equal_the_hf_engine(ckpts, hfs, method, tmp_path, monkeypatch):
    """A Qwen3-VL video inside vLLM, every pre-LLM method the plugin runs on Qwen3-VL: vLLM's prompt is the engine's
    pruned prompt token for token (the text, every slice's timestamp and markers, each slice's run of the engine's count
    for it), one vision-stage run per video on our processor's pixels with the engine's selection, vLLM's slice times
    are our processor's, vLLM's decoder gets the engine's positions of the pruned prompt (kept tokens keep theirs, the
    timestamps' text between the slices theirs) and decodes after the last one, and the greedy tokens and their top-5
    log-probabilities equal the HF engine's (fp32)."""
    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    name, opts = method.split(":")[0], METHODS.get(method, {})
    rt = hfs["qwen3_vl"]
    clips = q3_clips()
    if name in Q3_VIDEO_REFUSED:  # refused with the reason when the first video of several slices is counted (vLLM's
        # start-up counts one slice), and the engine goes on serving
        llm = vllm_llm(ckpts["qwen3_vl"], method, opts, videos=True, budget=4 * Q3_VIDEO_BUDGET)
        ref = hf_video(rt, name, opts, VIDEO_QUESTIONS[0], clips[0], 4 * Q3_VIDEO_BUDGET)
        with pytest.raises(Exception, match=Q3_VIDEO_REFUSED[name]):
            vllm_video_generate(llm, [video_request(ref["prompt"], clips[0])])
        img = image(1, *IMAGE_SIZE["qwen3_vl"])
        prompt, tokens, _, _ = hf_generate(rt, name, opts, QUESTIONS[0], img, 4 * Q3_VIDEO_BUDGET)
        assert list(vllm_generate(llm, [(prompt, img)])[0].outputs[0].token_ids) == tokens
        return
    refs = [hf_video(rt, name, opts, q, c, Q3_VIDEO_BUDGET) for q, c in zip(VIDEO_QUESTIONS, clips)]
    outs = vllm_video_generate(vllm_llm(ckpts["qwen3_vl"], method, opts, videos=True, budget=Q3_VIDEO_BUDGET),
                               [video_request(r["prompt"], c) for r, c in zip(refs, clips)])
    rows = [json.loads(ln) for ln in record.read_text().splitlines()]
    for ref, out, clip in zip(refs, outs, clips):
        t = (len(clip) + 1) // 2
        assert len(ref["runs"]) == t and sum(ref["runs"]) == ref["n_in"]
        assert list(out.prompt_token_ids) == ref["pruned"], method
        assert len(out.prompt_token_ids) == len(ref["expanded"]) - ref["stock"] + ref["n_in"]
        if name == "none":
            assert ref["n_in"] == ref["stock"]
        elif name == "test_keep_first_k":
            assert ref["runs"][-1] == 0
        else:
            assert ref["n_in"] < ref["stock"]
        assert list(out.outputs[0].token_ids) == ref["tokens"], method
        assert max_logprob_diff(out, ref["logprobs"]) < Q3_LOGPROB_TOL, method
        mine = [r for r in rows if r.get("prompt") == ref["prompt"]]
        sel = [r for r in mine if "keep" in r]
        assert len(sel) == 1, "one vision-stage run per video"
        assert sel[0]["pixels"] == ref["pixels"] and sel[0]["tokens"] == ref["n_in"] and sel[0]["runs"] == ref["runs"]
        if ref["kept"] is not None:
            assert (sel[0]["keep"], sel[0]["targets"]) == ref["kept"], method
        pos = [r for r in mine if "positions" in r]
        assert pos and pos[-1]["modality"] == "video" and pos[-1]["positions"] == ref["positions"]
        assert pos[-1]["timestamps"] == our_slice_times(rt, clip)
        p = ref["positions"]
        assert pos[-1]["delta"] == p[0][-1] + 1 - len(p[0]) == max(max(r) for r in p) + 1 - len(p[0])


def test_qwen3_video_timestamps_equal_our_processors_slice_times(ckpts, hfs, tmp_path, monkeypatch):
    """vLLM's slice times (its own rule over the item's frame indices and fps) are our processor's, and so is every
    <t seconds> text in vLLM's prompt: a video without fps (bare frames, and a GIF's indices without durations: 24
    fps, transformers' default), times on .x5 where a float32 copy would round the other way (10 and 30 fps), an NTSC
    rate and an odd frame count (the last frame's index repeated)."""
    import numpy as np

    from llava.preprocess_qwen_video import Frames

    record = tmp_path / "kept.jsonl"
    monkeypatch.setenv("VTPRUNE_VLLM_RECORD", str(record))
    rt = hfs["qwen3_vl"]
    clips = [video(70, 4, 140, 100),
             Frames(video(71, 4, 140, 100), fps=None, total_num_frames=40, frames_indices=[0, 13, 26, 39]),
             Frames(video(72, 6, 140, 100), fps=10.0, total_num_frames=60, frames_indices=[4, 5, 10, 11, 19, 20]),
             Frames(video(73, 4, 140, 100), fps=30.0, total_num_frames=90, frames_indices=[4, 5, 31, 32]),
             Frames(video(74, 5, 140, 100), fps=29.97, total_num_frames=300, frames_indices=[0, 75, 150, 225, 299])]
    times = [our_slice_times(rt, c) for c in clips]
    assert sum(f"{x:.1f}" != f"{float(np.float32(x)):.1f}" for ts in times for x in ts) >= 4  # the test bites
    refs = [hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[i % 2], c, Q3_VIDEO_BUDGET) for i, c in enumerate(clips)]
    outs = vllm_video_generate(vllm_llm(ckpts["qwen3_vl"], "visionzip", {}, videos=True, budget=Q3_VIDEO_BUDGET),
                               [video_request(r["prompt"], c) for r, c in zip(refs, clips)])
    rows = [json.loads(ln) for ln in record.read_text().splitlines() if '"positions"' in ln]
    for ref, out, ts in zip(refs, outs, times):
        got = [r for r in rows if r["tokens"] == ref["pruned"]]  # (the questions repeat: matched by the video's text)
        assert got and got[-1]["timestamps"] == ts
        assert list(out.prompt_token_ids) == ref["pruned"] and list(out.outputs[0].token_ids) == ref["tokens"]
        for x in ts:  # each slice's text, tokenised alone, is in vLLM's prompt
            sub = rt.tokenizer(f"<{x:.1f} seconds>", add_special_tokens=False).input_ids
            assert any(list(out.prompt_token_ids)[i:i + len(sub)] == sub for i in range(len(out.prompt_token_ids)))


def test_qwen3_a_mixed_batch_of_videos_and_images_equals_each_request_alone(ckpts, hfs):
    """Videos of other sizes, frame counts and timings beside an image, other questions, one generate call: each
    equals the request alone and the HF engine."""
    rt = hfs["qwen3_vl"]
    clips = [*q3_clips(), video(43, 6, 90, 60)]
    refs, img_prompt, img_in, together, alone = mixed_batch(ckpts, hfs, "qwen3_vl", clips,
                                                            image(42, *IMAGE_SIZE["qwen3_vl"]), Q3_VIDEO_BUDGET,
                                                            Q3_LOGPROB_TOL)
    assert [list(o.prompt_token_ids) for o in together] == [list(o.prompt_token_ids) for o in alone]
    tok = rt.model.config.image_token_id
    at = img_prompt.index(tok)
    assert [list(o.prompt_token_ids) for o in together] == [
        refs[0]["pruned"], img_prompt[:at] + [tok] * img_in + img_prompt[at + 1:], refs[1]["pruned"], refs[2]["pruned"]]


def test_qwen3_video_refusals(ckpts, hfs, monkeypatch):
    """What the plugin does not serve on Qwen3-VL videos is refused with the reason, and the engine goes on serving: an
    image and a video in one prompt, two videos in one prompt (vLLM's limit), videos on a server that did not ask for
    them, in-LLM methods, vLLM's own video pruning (EVS) on top; a front end whose split over the slices is not the
    engine's (a twin out of step with the worker) fails the request with the reason, never a silent mismatch."""
    from vllm import LLM

    from integrations.vllm import overrides
    from integrations.vllm.inputs import video_data
    from integrations.vllm.spec import PluginError

    rt = hfs["qwen3_vl"]
    cfg = rt.model.config
    clip, img = video(50, 6), image(51, *IMAGE_SIZE["qwen3_vl"])
    ref = hf_video(rt, "visionzip", {}, VIDEO_QUESTIONS[0], clip, Q3_VIDEO_BUDGET)
    llm = vllm_llm(ckpts["qwen3_vl"], "visionzip", {}, videos=True, budget=Q3_VIDEO_BUDGET)
    both = [cfg.vision_start_token_id, cfg.video_token_id, cfg.vision_end_token_id] + hf_inputs(rt, QUESTIONS[0], img)[0]
    with pytest.raises(ValueError, match="one image or one video per prompt"):
        vllm_video_generate(llm, [{"prompt_token_ids": both,
                                   "multi_modal_data": {"image": img, "video": video_data(clip)}}])
    with pytest.raises(Exception, match="At most 1 video"):  # vLLM's VLLMValidationError
        vllm_video_generate(llm, [{"prompt_token_ids": ref["prompt"] + ref["prompt"],
                                   "multi_modal_data": {"video": [video_data(clip)] * 2}}])
    out = vllm_video_generate(llm, [video_request(ref["prompt"], clip)])[0]  # still serving
    assert list(out.outputs[0].token_ids) == ref["tokens"] and list(out.prompt_token_ids) == ref["pruned"]
    del llm
    images_only = vllm_llm(ckpts["qwen3_vl"], "visionzip", {}, budget=Q3_VIDEO_BUDGET)
    with pytest.raises(Exception, match="At most 0 video"):
        vllm_video_generate(images_only, [video_request(ref["prompt"], clip)])
    del images_only
    for method in ("fastv", "dart"):
        with pytest.raises(PluginError, match="prunes inside the LLM"):
            overrides(ckpts["qwen3_vl"], method, Q3_VIDEO_BUDGET)
    with pytest.raises(Exception, match="vLLM's own video pruning"):
        LLM(model=ckpts["qwen3_vl"], dtype="float32", enforce_eager=True, max_model_len=1024, seed=0,
            hf_overrides=overrides(ckpts["qwen3_vl"], "visionzip", Q3_VIDEO_BUDGET), video_pruning_rate=0.5,
            limit_mm_per_prompt={"image": 1, "video": 1})
    # the front end reserves one token more in the first slice and one less in the last (the same total): the worker
    # compares the engine's pruned prompt with vLLM's and fails the request
    from integrations.vllm.twin import Twin

    real = Twin.video_slices
    monkeypatch.setattr(Twin, "video_slices",
                        lambda self, *key: (lambda s: (s[0] + 1, *s[1:-1], s[-1] - 1))(real(self, *key)))
    llm = vllm_llm(ckpts["qwen3_vl"], "visionzip", {}, videos=True, budget=Q3_VIDEO_BUDGET)
    with pytest.raises(Exception, match="is not vLLM's"):
        vllm_video_generate(llm, [video_request(ref["prompt"], clip)])


@pytest.fixture(scope="module")
def msvd(tmp_path_factory):
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("msvd_vllm"), ["msvd"])


def harness_video_families() -> tuple:
    """The families whose video benchmarks the harness's vLLM backend answers (``eval.vllm_backend`` reads
    :data:`integrations.vllm.twin.VIDEO_FAMILIES`)."""
    from integrations.vllm.twin import VIDEO_FAMILIES

    return tuple(VIDEO_FAMILIES)


#: (family, method, budget, tok_in): Qwen2.5-VL: visionzip 16: the fixture's clips (4 temporal slices of 2 x 3 tokens)
#: keep everything, 4 per slice prunes (4 slices x min(budget, 6)); OneVision: 8 frames of 4 x 4 pooled tokens, the
#: budget per frame, + the newline (8 x min(budget, 16) + 1); Qwen3-VL: the clips scaled up to 4 temporal slices of
#: 4 x 5 tokens (GIFs at 25 fps and frame folders without fps: each slice's timestamp in the prompt), the budget per
#: slice (4 x budget); random: its draws keyed by the question id in both backends
HARNESS_VIDEO = [("qwen2_5_vl", "visionzip", "16", 24), ("qwen2_5_vl", "consensusdrop", "4", 16),
                 ("qwen2_5_vl", "random", "4", 16), ("llava_onevision", "visionzip", "6", 49),
                 ("llava_onevision", "random", "4", 33), ("qwen3_vl", "visionzip", "2", 8),
                 ("qwen3_vl", "random", "1", 4)]


@pytest.mark.parametrize("family,method,budget,tok_in", HARNESS_VIDEO)
def test_harness_msvd_script_on_vllm_answers_as_the_hf_backend(ckpts, hfs, msvd, tmp_path, family, method, budget,
                                                               tok_in):
    """``BACKEND=vllm bash scripts/eval/msvd.sh <method> <budget>`` with MODEL a tiny Qwen2.5-VL / OneVision / Qwen3-VL
    folder: the MSVD fixture's videos (GIFs and a frame folder) answered as the HF backend answers them, with the same
    token counts and selections."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "runs"
    record = tmp_path / "kept.jsonl"
    env = {**os.environ, "MODEL": ckpts[family], "DATA_ROOT": str(msvd), "OUT": str(out), "PYTHON": sys.executable,
           "LAUNCHER": "python", "WANDB_MODE": "disabled", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "EXTRA_ARGS": "--no-wandb --max-new-tokens 6 --dtype float32", "VTPRUNE_VLLM_RECORD": str(record)}
    for backend in ("hf", "vllm"):
        p = subprocess.run(["bash", "scripts/eval/msvd.sh", method, budget], env={**env, "BACKEND": backend}, cwd=root,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (backend, p.stderr[-3000:])
    name = f"{os.path.basename(ckpts[family])}_{method}_b{budget}"
    hf_dir, vl_dir = out / "msvd" / name, out / "msvd" / f"{name}_vllm"
    read = lambda d: [json.loads(ln) for ln in (d / "merge.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(read(hf_dir)) == 5 and [r["pred"] for r in read(vl_dir)] == [r["pred"] for r in read(hf_dir)]
    res = {d: json.loads((d / "results.json").read_text()) for d in (hf_dir, vl_dir)}
    for key in ("tok_in", "visual_candidates_mean", "samples"):
        assert res[vl_dir]["tokens"][key] == res[hf_dir]["tokens"][key], key
    assert res[vl_dir]["tokens"]["tok_in"] == tok_in
    answers = {d: {} for d in (hf_dir, vl_dir)}
    for d in answers:
        for f in (d / "answers").glob("*.jsonl"):
            for ln in f.read_text().splitlines():
                r = json.loads(ln)
                answers[d][r["_eval"]["uid"]] = r["_eval"]["visual_entering_llm"]
    assert answers[vl_dir] == answers[hf_dir]
    cfg = json.loads((vl_dir / "run_config.json").read_text())
    assert cfg["resolved"]["backend"]["planned_tokens_per_video"]
    # the greedy answers of a random model say little: every selection made inside vLLM is the HF engine's for the
    # same question (random: drawn from the question id in both backends)
    from eval.benchmarks import get_benchmark
    from eval.benchmarks.videoqa import load_video
    from integrations.vllm.inputs import collapse

    rt = hfs[family]
    kept = {tuple(r["prompt"]): r["keep"] for r in map(json.loads, record.read_text().splitlines()) if "keep" in r}
    qs = get_benchmark("msvd", msvd).load()
    assert len(kept) == len(qs)
    eng = rt.prune(method, int(budget))
    cfg = rt.model.config
    markers = (cfg.vision_start_token_id, cfg.vision_end_token_id) if family == "qwen3_vl" else None
    try:
        for q in qs:
            enc = rt.processor([q.text], videos=[load_video(q.video, rt.processor.num_frames)])
            eng.sample_keys = [q.uid]
            with torch.inference_mode():
                eng.vision_inputs(enc["input_ids"], {k: v for k, v in enc.items() if k != "input_ids"})
            assert kept[tuple(collapse(enc["input_ids"][0].tolist(), cfg.video_token_id, markers))] == \
                eng.selections[("vision", 0)].keep.tolist(), q.uid
    finally:
        eng.remove()


def test_harness_video_benchmarks_on_vllm_cover_every_served_video_family(ckpts, msvd, tmp_path, capsys):
    """Every family the plugin serves whose processor takes videos answers video benchmarks on vLLM (OneVision,
    Qwen2.5-VL, Qwen3-VL: eval.vllm_backend reads VIDEO_FAMILIES); an image-only family is refused before vLLM
    starts, with the reason, as on the HF backend."""
    from eval.cli import main
    from eval.vllm_backend import served_families

    assert set(harness_video_families()) == {"qwen2_5_vl", "qwen3_vl", "llava_onevision"} <= set(served_families())
    assert main(["run", "msvd", "--model", ckpts["llava_next"], "--method", "visionzip", "--budget", "16",
                 "--data-root", str(msvd), "--out", str(tmp_path), "--no-wandb", "--backend", "vllm"]) == 2
    assert "llava_next processor does not take" in capsys.readouterr().err
