"""What a W&B run of the harness holds, read back from the offline run files (``run-<id>.wandb`` and the
table files next to it, ``eval.wandb_log.read_offline_run``): name / group / job_type / tags, the config
(model, method, budget, options, benchmark, n, commit, run name), every score with its variant name,
tokens entering the LLM and layer-averaged, TTFT, the per-sample answers table; and the testbed sweep's
run (table + accuracy-vs-tokens plots + figure)."""

import inspect
import json
import sys
import types
from pathlib import Path

import pytest

from eval.fixtures import write_fixtures
from eval.io import read_jsonl
from eval.runner import RunConfig, run, run_dir_of
from eval.scorers import pope_parse
from eval.wandb_log import (
    ANSWER_COLUMNS,
    WandbLogger,
    log_results,
    log_sweep_to_wandb,
    read_offline_run,
)

pytestmark = pytest.mark.usefixtures("run_env")


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("wandb_pope"), ["pope"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path


def _run(data, out, **kw):
    c = RunConfig(benchmark="pope", model="tiny:llava", data_root=str(data), out=str(out), max_new_tokens=3, **kw)
    assert run(c) == 0
    rd = run_dir_of(c)
    wb = read_offline_run(rd)
    assert wb["finished"]
    return rd, json.loads((rd / "results.json").read_text()), wb


def _pope_labels(data: Path) -> list[str]:
    """Each question's label as eval_pope.py pairs them: the k-th question of a split, the k-th label."""
    qs = read_jsonl(data / "pope/llava_pope_test.jsonl")
    labels = {c: [r["label"] for r in read_jsonl(data / f"pope/coco/coco_pope_{c}.json")]
              for c in {q["category"] for q in qs}}
    seen: dict = {}
    out = []
    for q in qs:
        k = seen.get(q["category"], 0)
        seen[q["category"]] = k + 1
        out.append(labels[q["category"]][k])
    return out


def test_eval_run_offline_holds_config_scores_tokens_answers(pope_data, offline):
    rd, res, wb = _run(pope_data, offline / "runs", method="consensusdrop", budget=8,
                       options={"fusion": "encoder_only"}, overlay_samples=1)
    assert res["wandb"]["mode"] == "offline" and "error" not in res["wandb"], res["wandb"]
    assert Path(wb["dir"]).parent == rd / "wandb"  # the run lives in the run folder: `wandb sync <run>/wandb/offline-run-*`

    # identity: the harness's run name; one group per benchmark x model; the budget as job type
    assert wb["run"]["name"] == f"pope/{rd.name}" == "pope/tiny-llava_consensusdrop_b8_fusion=encoder_only"
    assert wb["run"]["group"] == "pope/tiny-llava"
    assert wb["run"]["job_type"] == "b8"
    assert set(wb["run"]["tags"]) >= {"pope", "consensusdrop", "b8", "consensusdrop[fusion=encoder_only]", "llava"}

    # config: model, method (name, budget, options, every resolved option), benchmark, n, commit, run name
    c = wb["config"]
    run_cfg = json.loads((rd / "run_config.json").read_text())
    assert c["benchmark"] == "pope" and c["n"] == res["counts"]["questions"] == 6
    assert c["run_name"] == rd.name and c["run_dir"] == str(rd)
    assert c["commit"] == res["git"]["commit"] and c["git_dirty"] == res["git"]["dirty"]
    m = c["model"]
    assert (m["id"], m["name"], m["family"], m["dtype"], m["vision_dtype"]) == \
        ("tiny:llava", "tiny:llava", "llava", "float32", "float32")
    assert "layout" in m and m["layout"] is None  # NeXT's feature layout; LLaVA-1.5 has none
    assert m["template"] == res["model"]["template"] and m["budget_unit"] == res["model"]["budget_unit"]
    me = c["method"]
    assert (me["name"], me["budget"], me["budget_label"], me["options"], me["variant"]) == \
        ("consensusdrop", 8, "b8", {"fusion": "encoder_only"}, "consensusdrop[fusion=encoder_only]")
    assert me["resolved"] == res["method"] == run_cfg["resolved"]["method_config"]
    assert me["resolved"]["fusion"] == "encoder_only"
    assert c["args"] == run_cfg["config"]  # the whole harness config
    assert c["metric_labels"] == res["metric_labels"] and c["primary_metric"] == "POPE-F1avg3"

    # summary: every score under its variant name, the primary as `score`, tokens, TTFT
    s = wb["summary"]
    assert set(res["metrics"]) >= {"POPE-F1avg3", "POPE-F1pooled", "POPE-acc", "POPE-acc-pooled"}
    for k, v in res["metrics"].items():
        assert s[f"metrics/{k}"] == pytest.approx(v), k
    assert s["score"] == pytest.approx(res["metrics"]["POPE-F1avg3"]) and s["score_name"] == "POPE-F1avg3"
    assert s["tokens/entering_llm"] == res["tokens"]["tok_in"] == 8
    assert s["tokens/layer_avg"] == res["tokens"]["tok_eq"] == 8
    assert s["tokens/candidates"] == res["tokens"]["visual_candidates_mean"] == 16
    assert s["time/ttft_ms"] == pytest.approx(res["timing"]["prefill_total_s_mean"] * 1000)
    assert s["time/generate_s_mean"] == pytest.approx(res["timing"]["generate_s_mean"])
    for k in ("questions_per_s", "host_wait_fraction", "device_busy_fraction", "loop_s"):  # the run's pace
        assert s[f"throughput/{k}"] == res["throughput"][k] and res["throughput"][k] > 0, k
    assert s["counts/answered"] == s["counts/questions"] == 6 and s["partial"] is False
    assert s["budget/effective"] == 8

    # the answers table: one row per question, as the answers file has it
    t = wb["tables"]["answers"]
    assert t["columns"] == ANSWER_COLUMNS
    rows = [dict(zip(t["columns"], r)) for r in t["data"]]
    merged = read_jsonl(rd / "merge.jsonl")
    shard = sorted((r for p in sorted((rd / "answers").glob("*.jsonl")) for r in read_jsonl(p)),
                   key=lambda r: r["_eval"]["idx"])
    labels = _pope_labels(pope_data)
    assert len(rows) == len(merged) == len(shard) == 6
    for row, rec, sh, lab in zip(rows, merged, shard, labels):
        ev = sh["_eval"]
        assert (row["question_id"], row["question"], row["prediction"]) == (str(rec["question_id"]), rec["prompt"], rec["text"])
        assert row["uid"] == ev["uid"]
        assert row["answer"] == lab and row["correct"] == (pope_parse(rec["text"]) == lab)
        assert (row["tokens_candidates"], row["tokens_entering_llm"], row["tokens_layer_avg"]) == \
            (ev["visual_candidates"], ev["visual_entering_llm"], ev["visual_layer_avg"])
        assert row["new_tokens"] == ev["new_tokens"] and row["generate_s"] == pytest.approx(ev["time"]["generate"])
    # accuracy from the table = the accuracy the scorer reports (all three splits pooled)
    assert 100 * sum(r["correct"] for r in rows) / len(rows) == pytest.approx(res["metrics"]["POPE-acc-pooled"])
    assert "samples" in wb["tables"]  # the overlay table of eval.results is still there
    # progress while answering: tokens per step in the history
    assert any("tokens/entering_llm_mean" in h for h in wb["history"])


def test_runs_of_one_benchmark_and_model_share_a_group(pope_data, offline):
    _, _, a = _run(pope_data, offline / "runs", method="random", budget=4)
    _, _, b = _run(pope_data, offline / "runs", method="none", budget=None, wandb_tags=["baseline"])
    assert a["run"]["group"] == b["run"]["group"] == "pope/tiny-llava"
    assert (a["run"]["job_type"], b["run"]["job_type"]) == ("b4", "unpruned")
    assert a["run"]["name"] == "pope/tiny-llava_random_b4" and b["run"]["name"] == "pope/tiny-llava_none"
    assert "baseline" in b["run"]["tags"] and "unpruned" in b["run"]["tags"]
    assert b["config"]["method"]["budget"] is None and b["summary"]["tokens/entering_llm"] == 16
    _, _, c = _run(pope_data, offline / "runs", method="random", budget=2, wandb_group="my-group", run_name="r2")
    assert c["run"]["group"] == "my-group" and c["run"]["name"] == "pope/r2"  # --wandb-group / --run-name win


SWEEP = {"meta": {"date": "2026-11-23", "model": "testbed", "n_questions": 12, "seed": 0, "budgets": [4, 16],
                  "command": "python -m testbed.evaluate sweep"},
         "results": [
             {"method": "none", "budget": None, "options": {}, "accuracy": {"overall": 80.0, "counting": 70.0},
              "tokens": {"visual_entering_llm": 64.0, "visual_layer_avg": 64.0, "time_s": 1.5}},
             {"method": "consensusdrop", "budget": 4, "options": {}, "accuracy": {"overall": 50.0, "counting": 40.0},
              "tokens": {"visual_entering_llm": 4.0, "visual_layer_avg": 4.0, "time_s": 0.5}},
             {"method": "consensusdrop", "budget": 16, "options": {}, "accuracy": {"overall": 70.0, "counting": 60.0},
              "tokens": {"visual_entering_llm": 16.0, "visual_layer_avg": 16.0, "time_s": 0.6}},
             {"method": "consensusdrop", "budget": 4, "options": {"fusion": "encoder_only"},
              "accuracy": {"overall": 45.0, "counting": 35.0},
              "tokens": {"visual_entering_llm": 4.0, "visual_layer_avg": 4.0, "time_s": 0.5}},
             {"method": "fastv", "budget": 4, "options": {}, "accuracy": {"overall": 40.0, "counting": 30.0},
              "tokens": {"visual_entering_llm": 64.0, "visual_layer_avg": 14.5, "time_s": 0.7}}],
         "errors": [{"method": "dart", "budget": 4, "options": {}, "error": "ValueError: x"}]}


def test_sweep_run_holds_table_and_accuracy_vs_tokens_plot(offline):
    from PIL import Image

    png = offline / "testbed.png"
    Image.new("RGB", (32, 16), (200, 10, 10)).save(png)
    info = log_sweep_to_wandb(SWEEP, png=png)
    assert info["mode"] == "offline" and "error" not in info, info
    wb = read_offline_run(offline / "wandb")
    assert wb["finished"] and wb["run"]["job_type"] == "sweep" and wb["run"]["group"] == "testbed"
    assert wb["run"]["name"] == "testbed-sweep/2026-11-23" and {"testbed", "sweep"} <= set(wb["run"]["tags"])
    assert wb["config"]["sweep"] == SWEEP["meta"]
    t = wb["tables"]["sweep"]
    assert t["columns"][:8] == ["method", "options", "label", "budget", "tokens_entering_llm", "tokens_layer_avg",
                                "accuracy", "time_s"] and "accuracy/counting" in t["columns"]
    rows = [dict(zip(t["columns"], r)) for r in t["data"]]
    assert len(rows) == len(SWEEP["results"])
    for row, r in zip(rows, SWEEP["results"]):
        assert (row["method"], json.loads(row["options"]), row["budget"]) == (r["method"], r["options"], r["budget"])
        assert (row["tokens_entering_llm"], row["tokens_layer_avg"]) == \
            (r["tokens"]["visual_entering_llm"], r["tokens"]["visual_layer_avg"])
        assert row["accuracy"] == r["accuracy"]["overall"] and row["accuracy/counting"] == r["accuracy"]["counting"]
    assert [r["label"] for r in rows] == ["none", "consensusdrop", "consensusdrop", "consensusdrop[fusion=encoder_only]",
                                          "fastv"]
    # the plots: W&B line charts over the sweep table, x = tokens, y = accuracy, one line per variant
    for key, x in (("accuracy_vs_tokens", "tokens_layer_avg"), ("accuracy_vs_tokens_entering", "tokens_entering_llm")):
        spec = wb["charts"][key]["panel_config"]
        assert spec["panelDefId"] == "wandb/line/v0"
        assert spec["fieldSettings"] == {"x": x, "y": "accuracy", "stroke": "label"}
        assert wb["tables"][f"{key}_table"] == t  # the chart's data = the sweep table
    img = wb["summary"]["plot"]
    assert img["_type"] == "image-file" and (Path(wb["dir"]) / "files" / img["path"]).exists()
    assert wb["summary"]["n_configs"] == 5 and wb["summary"]["n_errors"] == 1


class _BrokenWandb(types.ModuleType):
    """init works, every log raises: the sweep logging must swallow it."""

    class Settings:
        def __init__(self, **kw):
            pass

    class Table:
        def __init__(self, **kw):
            raise RuntimeError("broken table")

    def init(self, **kw):
        return types.SimpleNamespace(id="x", name="n", project="p", url=None, dir=".", summary={},
                                     finish=lambda: None)


def test_partial_sweep_is_named_by_its_methods(offline):
    res = {**SWEEP, "meta": {**SWEEP["meta"], "partial": {"methods": ["consensusdrop"], "date": "2026-11-23"}}}
    assert "error" not in log_sweep_to_wandb(res)
    wb = read_offline_run(offline / "wandb")
    assert wb["run"]["name"] == "testbed-sweep/2026-11-23/only-consensusdrop" and "partial" in wb["run"]["tags"]
    assert len(wb["tables"]["sweep"]["data"]) == 5  # every row (kept + re-measured) is in the table


def test_sweep_logging_never_fails_the_sweep(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_sweep_to_wandb(SWEEP) == {"mode": "disabled"}
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setitem(sys.modules, "wandb", _BrokenWandb("wandb"))
    info = log_sweep_to_wandb(SWEEP)
    assert "sweep" in info["error"] and "broken table" in info["error"]
    import testbed.evaluate as te

    p = inspect.signature(te.run_sweep).parameters
    assert "wandb" in p and p["wandb"].default is False  # off unless `sweep --wandb`


def test_results_that_cannot_be_summarised_do_not_stop_the_wandb_run(offline):
    wb = WandbLogger(project="p", dir=str(offline))
    assert wb.active
    log_results(wb, {"metrics": {"X": 1.0}, "tokens": ["not", "a", "dict"]}, offline / "no-such-run", data_root=offline)
    assert wb.active and wb.error is None  # the summary is skipped with a warning; the run goes on
    log_results(wb, {"metrics": {"X": 2.0}, "primary_metric": "X", "benchmark": "pope"}, offline / "no-such-run",
                data_root=offline)
    assert wb.active and wb.finish()
    r = read_offline_run(offline / "wandb")
    assert r["finished"] and r["summary"]["metrics/X"] == 2.0 and r["summary"]["score"] == 2.0
    assert "answers" not in r["tables"]  # no answers on disk: no table


def test_eval_score_wandb_logs_the_run_like_eval_run(pope_data, offline):
    """`python -m eval score RUN --wandb` (re-scoring a finished run): the same name / group / job type /
    config as `eval run` gives it, tagged `rescored`, with the scores, tokens and answers table."""
    from eval.cli import main

    c = RunConfig(benchmark="pope", model="tiny:llava", data_root=str(pope_data), out=str(offline / "runs"),
                  max_new_tokens=3, method="random", budget=4, wandb=False)
    assert run(c) == 0
    rd = run_dir_of(c)
    assert not (rd / "wandb").exists()
    res = json.loads((rd / "results.json").read_text())
    assert main(["score", str(rd), "--data-root", str(pope_data), "--wandb"]) == 0
    wb = read_offline_run(rd)
    assert wb["finished"]
    assert (wb["run"]["name"], wb["run"]["group"], wb["run"]["job_type"]) == (f"pope/{rd.name}", "pope/tiny-llava", "b4")
    assert set(wb["run"]["tags"]) >= {"pope", "random", "b4", "llava", "rescored"}
    cfg = wb["config"]
    assert (cfg["model"]["family"], cfg["method"]["name"], cfg["method"]["budget"], cfg["n"]) == ("llava", "random", 4, 6)
    assert cfg["method"]["resolved"] == res["method"] and cfg["commit"] == res["git"]["commit"]
    for k, v in res["metrics"].items():
        assert wb["summary"][f"metrics/{k}"] == pytest.approx(v), k
    assert wb["summary"]["tokens/entering_llm"] == 4
    assert len(wb["tables"]["answers"]["data"]) == 6
