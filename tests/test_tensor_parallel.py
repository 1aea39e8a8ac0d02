"""Tensor parallelism (DeepSpeed AutoTP, tp = 2) on this CPU: two ranks spawned from pytest (gloo, no launcher,
DeepSpeed's shared-memory op off) give the single-process plain model's greedy tokens for every registered
method on every tiny family (fp32, logits within 1e-5), with the language model's weights really halved on
each rank and the towers whole; the harness's TP groups (`LAUNCHER=deepspeed TP=2 NPROC=2|4`) answer as
one process does; the refusals. The whole matrix runs here (about 20 s) with 2 new tokens per prompt (the
prefill's and one decode step's: every decode step after the first runs the same code, and the methods act in the
prefill only); `python -m bench.tp_check` is the same check as a command (4 new tokens by default;
docs/evaluation.md section 3)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from bench import gpu_check as G  # noqa: E402
from eval.dist import DistInfo, detect  # noqa: E402
from bench.tp_check import FAMILIES, TPCheckConfig, run_check  # noqa: E402
from llava.method import method_class, method_supports  # noqa: E402
from llava.tp import grain_size, lm_policy  # noqa: E402
from varied_answers import assert_answers_vary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = G.registered_methods()  # "none" and "novisual" included
#: methods whose llm stages take a gradient (Method.llm_grad: TRIO), refused at attach under AutoTP
GRAD = {m for m in METHODS if method_class(m).llm_grad}
#: greedy tokens per prompt in the matrix: the prefill's token and one decode step's (CI time; the command's default
#: is 4)
NEW_TOKENS = 2


@pytest.fixture(scope="module")
def report():
    return run_check(TPCheckConfig(tp=2, families=list(FAMILIES), methods=METHODS, new_tokens=NEW_TOKENS))


def _result(report, family, method):
    (r,) = [r for r in report["results"] if r["family"] == family and r["method"] == method]
    return r


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_gives_the_plain_models_tokens(report, family, method):
    r = _result(report, family, method)
    fam = G.family_key(family)
    if method != "none" and not method_supports(method, fam):
        assert r["verdict"] == "n/a"
        return
    if r["verdict"] == "n/a":  # refused by the plain model too: a hybrid model's linear-attention layer read
        assert fam == "qwen3_5" and "linear-attention" in r["reason"]
        return
    if method in GRAD:  # a backward through AutoTP's all-reduce linears: refused at attach, with the reason
        assert r["verdict"] == "refused" and "tensor parallelism" in r["reason"] and "TP=1" in r["reason"], r
        return
    assert r["verdict"] == "PASS", r
    assert r["tokens_equal"] and r["ranks_agree"] and r["max_logit_delta"] <= 1e-5
    assert len(r["tokens"]) == 3 and all(len(t) == NEW_TOKENS for t in r["tokens"])


def test_hybrid_refusals_are_the_only_ones_and_every_method_ran_somewhere(report):
    ran = {r["method"] for r in report["results"] if r["verdict"] == "PASS"}
    assert ran == set(METHODS) - GRAD and GRAD == {"trio"}
    assert {r["method"] for r in report["results"] if r["verdict"] == "refused"} == GRAD
    assert report["overall"] == "PASS"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_language_model_is_halved_on_each_rank_and_the_towers_are_whole(report, family):
    (m,) = [m for m in report["models"] if m["family"] == family]
    sharded = m["sharded"]
    assert m["deepspeed"]["tp_size"] == 2 and m["deepspeed"]["groups"] == {"tp": 2, "dp": 1, "tp_rank": 0, "dp_rank": 0}
    for name, (full, mine) in sharded.items():
        assert name.startswith(("model.language_model.layers.", "lm_head.")), name  # nothing outside the LLM
        if len(full) == 1:  # a column-parallel projection's bias (Qwen2's q / k / v)
            assert name.endswith("_proj.bias") and mine[0] * 2 == full[0], (name, full, mine)
            continue
        row_parallel = name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight"))
        dim = 1 if row_parallel else 0  # row-parallel: the input features split; column-parallel: the outputs
        assert mine[dim] * 2 == full[dim] and mine[1 - dim] == full[1 - dim], (name, full, mine)
    layers = 4  # every tiny LLM has 4 decoder layers
    attn = [0, 1, 2, 3] if family != "qwen3.5" else [1, 3]  # tiny Qwen3.5: layers 0 and 2 are Gated DeltaNet
    for i in range(layers):
        for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.language_model.layers.{i}.{p}.weight" in sharded
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert (f"model.language_model.layers.{i}.self_attn.{p}.weight" in sharded) == (i in attn)
    assert "lm_head.weight" in sharded
    assert m["params"]["rank"] == m["params"]["planned"]["per_rank"] < m["params"]["plain"]  # llava.tp.rank_params
    assert not any(".linear_attn." in n for n in sharded)  # Gated DeltaNet layers: replicated


def test_lm_policy_names_the_decoders_attention_and_mlp_and_refuses_what_it_cannot_shard():
    from conftest import load

    rt = load("tiny:llava", seed=1)
    lm = rt.model.model.language_model
    policy = lm_policy(rt.model, lm)
    assert {c.__name__: v for c, v in policy.items()} == {"LlamaAttention": (".o_proj",), "LlamaMLP": (".down_proj",)}

    class Tower(torch.nn.Module):  # a module outside the LLM with the decoder's MLP class would be sharded too
        def __init__(self):
            super().__init__()
            self.mlp = type(lm.layers[0].mlp)(lm.config)

    rt.model.extra = Tower()
    with pytest.raises(ValueError, match="outside the language model"):
        lm_policy(rt.model, lm)
    del rt.model.extra
    lm.layers[1].mlp.down_proj = torch.nn.Identity()  # a mixture-of-experts MLP has no linear down_proj
    with pytest.raises(ValueError, match="no linear down_proj"):
        lm_policy(rt.model, lm)


def test_grain_size_gives_every_rank_a_share_of_tiny_models_and_keeps_autotps_default_for_real_ones():
    from types import SimpleNamespace as NS

    assert grain_size(NS(hidden_size=64, intermediate_size=128), 2) == 8  # 64 per rank at grain 64: lm_head 64 | 0
    assert grain_size(NS(hidden_size=4096, intermediate_size=11008), 2) == 64  # LLaVA-1.5-7B (Vicuna-7B)
    assert grain_size(NS(hidden_size=5120, intermediate_size=13824), 4) == 64  # LLaVA-1.5-13B at tp 4
    assert grain_size(NS(hidden_size=8192, intermediate_size=29568), 4) == 64  # Qwen2-72B: 29568 / 256 splits unevenly
    assert grain_size(NS(hidden_size=64, intermediate_size=128), 1) == 64  # 64 features: one block


def test_a_sharded_projection_that_is_not_gathered_is_refused_not_read():
    """The engine's LLM signal code reads all heads: a q_proj giving one rank's half is an error, never a signal."""
    from conftest import load

    from llava.attention_rows import LayerQK

    rt = load("tiny:llava", seed=1)
    lm = rt.model.model.language_model
    layer = lm.layers[1]
    x = torch.randn(5, lm.config.hidden_size)
    pos = torch.arange(5)
    full = LayerQK(layer, x, lm.rotary_emb, pos).queries(torch.tensor([4]))
    assert full.shape == (4, 1, 16)
    half = torch.nn.Linear(64, 32, bias=False)
    half.weight.data = layer.self_attn.q_proj.weight.data[:32].clone()
    layer.self_attn.q_proj = half
    with pytest.raises(RuntimeError, match="gives 32 features, not the 4 heads x 16"):
        LayerQK(layer, x, lm.rotary_emb, pos).queries(torch.tensor([4]))


def test_dist_info_cuts_the_world_into_groups_of_consecutive_ranks(monkeypatch):
    infos = [DistInfo(rank=r, world=4, local_rank=r, tp=2) for r in range(4)]
    assert [(i.dp, i.dp_rank, i.writes) for i in infos] == [(2, 0, True), (2, 0, False), (2, 1, True), (2, 1, False)]
    assert [(i.dp, i.dp_rank, i.writes) for i in (DistInfo(rank=r, world=2) for r in range(2))] == [(2, 0, True), (2, 1, True)]
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="multiple of the tensor-parallel size"):
        detect(None, tp=2)


def test_a_resume_with_another_tp_is_refused():
    from eval.run_config import RunConfig, default_run_name, resume_mismatch as _resume_mismatch

    old = {k: v for k, v in RunConfig(benchmark="pope").resume_view().items() if k != "tp"}  # written before --tp
    assert _resume_mismatch(old, RunConfig(benchmark="pope")) == {}
    assert _resume_mismatch(old, RunConfig(benchmark="pope", tp=2)) == {"tp": (1, 2)}
    assert default_run_name(RunConfig(benchmark="pope", tp=2)).endswith("_tp2")
    assert "tp" not in default_run_name(RunConfig(benchmark="pope"))


def test_eval_run_in_one_process_refuses_tp2(fixture_data, tmp_path, run_env, capsys):
    from eval.cli import main

    code = main(["run", "pope", "--model", "tiny:llava", "--data-root", str(fixture_data), "--out", str(tmp_path),
                 "--no-wandb", "--tp", "2"])
    assert code == 2 and "world of 1 process(es) must be a multiple of the tensor-parallel size" in capsys.readouterr().err
    assert not list(tmp_path.rglob("run_config.json"))


def test_the_scripts_refuse_tp_with_the_python_launcher(tmp_path):
    e = {**os.environ, "OUT": str(tmp_path), "LAUNCHER": "python", "TP": "2", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "scripts/eval/pope.sh"), "fastv", "8"], env=e, capture_output=True, text=True)
    assert p.returncode == 2 and "TP=2 needs LAUNCHER=deepspeed or torchrun" in p.stderr


def test_tp_with_the_fast_path_or_vllm_is_refused_before_anything_runs():
    from eval.run_config import RunConfig, tp_check as _tp_check

    assert "drop --fast" in _tp_check(RunConfig(benchmark="pope", tp=2, fast=True))
    assert "tensor_parallel_size" in _tp_check(RunConfig(benchmark="pope", tp=2, backend="vllm"))
    assert _tp_check(RunConfig(benchmark="pope", tp=2)) is None


SHAPES_ARGS = ("--no-wandb", "--batch-size", "20", "--bench-opt", "n=40")


def _shapes_answers(out):
    (run,) = (out / "shapes").glob("*")
    answers = {}
    for f in sorted((run / "answers").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            answers.setdefault(r["question_id"], []).append(r["text"])
    return run, answers, json.loads((run / "results.json").read_text())


def _shapes(tmp_path, name, method, **env):
    out = tmp_path / name
    e = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
         "EXTRA_ARGS": " ".join(SHAPES_ARGS), **env}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        e.pop(k, None)
    p = subprocess.run(["bash", str(ROOT / "scripts/eval/shapes.sh"), method, "16"], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return _shapes_answers(out)


def _shapes_in_this_process(tmp_path, name, method):
    """What `LAUNCHER=python bash scripts/eval/shapes.sh <method> 16` runs (`python -m eval run shapes ...
    --launcher python`, the testbed's weights), called in this process (eval.cli.main): one interpreter start fewer."""
    from eval.cli import main

    out = tmp_path / name
    assert main(["run", "shapes", "--model", str(ROOT / "testbed/weights"), "--method", method, "--budget", "16",
                 "--data-root", str(tmp_path), "--out", str(out), *SHAPES_ARGS, "--launcher", "python"]) == 0
    return _shapes_answers(out)


# FastV (an llm stage: attention rows gathered across the group): the launcher's path; every method's selection at
# TP=2 is checked in one process above (test_tp2_gives_the_plain_models_tokens), so one method here (CI time)
@pytest.mark.parametrize("method", ["fastv"])
def test_the_deepspeed_launcher_at_tp2_answers_as_one_process(tmp_path, method, run_env):
    """`LAUNCHER=deepspeed TP=2 NPROC=4 bash scripts/eval/shapes.sh <method> 16` (the real launcher) on the
    trained testbed: the answers and the score of one process (`python -m eval run`, as LAUNCHER=python runs it,
    here in this test process); two groups answer each question once, each group's writer in its own shard
    file."""
    if not (ROOT / "testbed/weights/config.json").exists():
        pytest.skip("testbed/weights is not in this checkout")
    _, ref, ref_res = _shapes_in_this_process(tmp_path, "python", method)
    # the testbed's answers differ by question (13 different of 40 at FastV 16): the equality compares real answers
    assert_answers_vary([t[0] for t in ref.values()], 10)
    # NPROC=4: two groups of TP=2 (the launcher's grouping; one group of TP=2 under the deepspeed launcher is
    # tests/test_slurm.py's multinode deepspeed-2, and every method at TP=2 the matrix above: CI time)
    for nproc in (4,):
        run, got, res = _shapes(tmp_path, f"tp2x{nproc}", method, LAUNCHER="deepspeed", TP="2", NPROC=str(nproc))
        assert run.name.endswith("_tp2")
        assert {q: t[0] for q, t in got.items()} == {q: t[0] for q, t in ref.items()} and len(ref) == 40
        assert all(len(t) == 1 for t in got.values())  # every question answered once
        assert sorted(p.name for p in (run / "answers").glob("*.jsonl")) == [f"{nproc // 2}_{i}.jsonl" for i in range(nproc // 2)]
        assert res["metrics"] == ref_res["metrics"]
        cfg = json.loads((run / "run_config.json").read_text())
        assert cfg["config"]["tp"] == 2 and cfg["resolved"]["tensor_parallel"] == {"tp": 2, "groups": nproc // 2}
        assert cfg["resolved"]["model"]["deepspeed"]["tp_size"] == 2 and cfg["resolved"]["launcher"] == "deepspeed"
