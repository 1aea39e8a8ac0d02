"""DeepSpeed inference for real (the `deepspeed` extra): deepspeed.init_inference with tensor-parallel
size 1 and kernel injection off, on CPU (DeepSpeed's CPU accelerator), with every registered method
attached after it: the same tokens as the plain model; and `eval run --launcher deepspeed` (what
LAUNCHER=deepspeed does on every rank) through it, with the same answers as the python launcher."""

import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from conftest import load, make_batch  # noqa: E402
from test_gpu_ready import METHODS, budget  # noqa: E402

from llava.tp import deepspeed_inference  # noqa: E402


@pytest.fixture(scope="module")
def ds_pair():
    plain = load("tiny:llava", seed=1)
    wrapped = deepspeed_inference(load("tiny:llava", seed=1), tp_size=1)
    return plain, wrapped


@pytest.mark.parametrize("method", METHODS)
def test_init_inference_gives_the_plain_models_tokens_for_every_method(ds_pair, method):
    plain, wrapped = ds_pair
    assert wrapped.info["deepspeed"]["tp_size"] == 1 and not wrapped.info["deepspeed"]["kernel_inject"]
    inputs = make_batch(plain)
    outs = []
    for rt in (plain, wrapped):
        eng = rt.prune(method, budget(method, rt.family), **({"seed": 3} if method == "random" else {}))
        try:
            with torch.no_grad():
                outs.append(rt.model.generate(**inputs, max_new_tokens=4, do_sample=False))
            assert eng.prefills == 1
        finally:
            rt.unprune()
    assert torch.equal(outs[0], outs[1])


def test_methods_attached_before_init_inference_are_refused():
    rt = load("tiny:llava", seed=1)
    rt.prune("fastv", 8)
    with pytest.raises(ValueError, match="before attaching"):
        deepspeed_inference(rt)


def test_the_unpruned_engine_of_a_fast_load_moves_to_the_wrapped_model():
    """``load(fast=True)`` attaches the unpruned engine itself; DeepSpeed takes the model (tp 1) and the engine
    is attached again to the wrapped module, still the fast path's, still replaceable by ``prune``."""
    rt = deepspeed_inference(load("tiny:llava", seed=1, fast=True, fast_backend="none", fast_max_new_tokens=4))
    assert rt.engine_by_load and rt.engine.method.name == "none" and rt.engine.fast is not None
    assert rt.engine.model is rt.model  # the wrapped module, not the one load returned
    rt.prune("fastv", 8)
    assert not rt.engine_by_load


def test_eval_run_with_the_deepspeed_launcher_equals_python(fixture_data, tmp_path, run_env):
    """On the trained testbed's shapes questions: answers that differ by question (tiny:llava's POPE answers are
    nearly all the same word), so that the two launchers agreeing means something."""
    from pathlib import Path

    from eval.io import read_jsonl
    from eval.runner import RunConfig, run, run_dir_of
    from varied_answers import assert_answers_vary

    testbed = Path(__file__).resolve().parents[1] / "testbed" / "weights"
    answers = {}
    for launcher in ("python", "deepspeed"):
        cfg = RunConfig(benchmark="shapes", model=str(testbed), bench_options={"n": 8}, method="fastv", budget=8,
                        data_root=str(fixture_data), out=str(tmp_path / launcher), wandb=False, max_new_tokens=3,
                        launcher=launcher)
        assert run(cfg) == 0
        rd = run_dir_of(cfg)
        answers[launcher] = {str(r["question_id"]): r["text"] for r in read_jsonl(rd / "merge.jsonl")}
    assert answers["python"] == answers["deepspeed"] and len(answers["python"]) == 8
    assert_answers_vary(answers["python"].values(), 5)
