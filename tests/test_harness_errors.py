"""Issue 16, items 2-4: every bad input to `python -m eval run` / `python -m llava.cli ask` ends
as one `error: ...` line with exit code 2 that names the file (and line, for a JSONL), and a run
that fails its checks writes nothing, so the corrected command is never refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.cli import main as eval_main
from eval.runner import RunConfig, run, run_dir_of
from llava.cli import main as llava_main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("run_env")  # fixture_data / data: conftest


def eval_run(data, out, *extra, bench="pope", model="tiny:llava"):
    return eval_main(["run", bench, "--model", model, "--max-new-tokens", "2", "--data-root", str(data),
                      "--out", str(out), "--no-wandb", *extra])


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- item 2: unreadable data


def test_truncated_question_file_names_path_and_line(data, tmp_path, capsys):
    qfile = data / "pope" / "llava_pope_test.jsonl"
    lines = qfile.read_text().splitlines(keepends=True)
    qfile.write_text("".join(lines[:2]) + lines[2][:25] + "\n" + "".join(lines[3:]))  # line 3 cut short
    assert eval_run(data, tmp_path / "runs", "--method", "random", "--budget", "4") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{qfile}:3:" in line
    assert not (tmp_path / "runs").exists()


def test_garbled_json_question_file_names_path_and_line(data, tmp_path, capsys):
    qfile = data / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA" / "test_q.json"
    qfile.write_text('[\n{"video_name": "a",\n "question": "x", oops}\n]\n')
    assert eval_run(data, tmp_path / "runs", bench="msvd", model="tiny:video-llava") == 2
    assert f"{qfile}:3:" in one_error_line(capsys.readouterr().err)


def test_empty_video_folder_fails_the_pre_run_check(data, tmp_path, capsys):
    folder = data / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA" / "videos" / "msvdvid1"  # the frame-folder video
    assert folder.is_dir()
    for f in folder.iterdir():
        f.unlink()
    assert eval_run(data, tmp_path / "runs", "--method", "random", "--budget", "4", bench="msvd",
                    model="tiny:video-llava") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"empty folder {folder}" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    from eval.benchmarks.videoqa import load_video

    with pytest.raises(ValueError, match=f"video folder {folder} is empty"):
        load_video(folder, 8)


def test_ask_on_an_empty_video_folder_names_it(tmp_path, capsys):
    folder = tmp_path / "clip"
    folder.mkdir()
    assert llava_main(["ask", "--model", "tiny:video-llava", "--question", "what?", "--video", str(folder)]) == 2
    assert str(folder) in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- item 3: one error line, exit 2


BAD_METHOD_ARGS = [
    (["--method", "fastvv", "--budget", "4"], "unknown pruning method 'fastvv'"),
    (["--method", "random", "--budget", "0"], "budget must be > 0"),
    (["--method", "random", "--budget", "-5"], "budget must be > 0"),
    (["--method", "random", "--budget", "4", "--opt", "nonsense=1"], "unknown option(s) ['nonsense']"),
]


@pytest.mark.parametrize("args, msg", BAD_METHOD_ARGS)
def test_eval_run_bad_method_input_is_one_line_exit_2_and_writes_nothing(fixture_data, tmp_path, capsys, args, msg):
    assert eval_run(fixture_data, tmp_path / "runs", *args, "--run-name", "r") == 2
    assert msg in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # item 4: nothing written before the checks


@pytest.mark.parametrize("args, msg", BAD_METHOD_ARGS)
def test_llava_ask_bad_method_input_is_one_line_exit_2(args, msg, capsys):
    assert llava_main(["ask", "--question", "what?", *args]) == 2
    assert msg in one_error_line(capsys.readouterr().err)


UNREACHABLE = "downsample: budget 8 is not reachable with non-overlapping s x s windows on a 4x4 patch grid; " \
    "reachable budgets: 16 (s=1), 4 (s=2), 1 (s=4) (or set `stride`)"


def test_llava_ask_budget_the_method_cannot_reach_on_the_family_is_one_line_exit_2(capsys):
    """Issue 50 item 3: a budget refused only when the method first sees the layout (InternVL's tiny 4x4 grid:
    8 windows are unreachable) is bad input, not a traceback; a reachable budget on the same grid answers."""
    assert llava_main(["ask", "--question", "what?", "--model", "tiny:internvl", "--method", "downsample",
                       "--budget", "8"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: " + UNREACHABLE
    assert llava_main(["ask", "--question", "what?", "--model", "tiny:internvl", "--method", "downsample",
                       "--budget", "4", "--max-new-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["visual_entering_llm"] == res["visual_candidates"] // 16 * 4  # 2x2 windows on each 4x4 tile


def test_eval_run_budget_the_method_cannot_reach_is_one_line_exit_2(fixture_data, tmp_path, capsys):
    """The harness: the same refusal, found at the first batch, ends the run with the one line (exit 2)."""
    rc = eval_run(fixture_data, tmp_path / "runs", "--method", "downsample", "--budget", "8", "--run-name", "r",
                  model="tiny:internvl")
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert err == ["error: " + UNREACHABLE]


# Issue 56 item 4: a budget (or option) the method refuses only when it sees the sample's layout, in every method
# that had such a refusal as a plain ValueError (a traceback): AdaV's k = 2 * floor(floor(B / 2) / crops) = 0,
# AdaV's crop_offset_bug on a layout with newlines, ConsensusDrop's D + C != the unit's budget, VisPruner's
# official gather (reference=True) on an |R| it cannot split.
ATTNMIX_OV_8 = ("attnmix: budget 8 over 13 crops keeps nothing (AdaV keeps 2*floor(floor(B/2)/N) per unit); "
                "use a budget >= 26")


def test_llava_ask_attnmix_budget_below_two_per_crop_is_one_line_exit_2(capsys):
    """The built-in picture on tiny LLaVA-OneVision is 13 crops: B = 8 gives floor(4 / 13) = 0 per crop; the
    budget the message names (2 x 13 = 26) answers."""
    assert llava_main(["ask", "--question", "what?", "--model", "tiny:llava-onevision", "--method", "attnmix",
                       "--budget", "8"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: " + ATTNMIX_OV_8
    assert llava_main(["ask", "--question", "what?", "--model", "tiny:llava-onevision", "--method", "attnmix",
                       "--budget", "26", "--max-new-tokens", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"]["budget"] == 26 and res["visual_entering_llm"] < res["visual_candidates"]


def test_eval_run_attnmix_budget_below_two_per_crop_is_one_line_exit_2(fixture_data, tmp_path, capsys):
    """The harness: the POPE fixture's small first image is 2 crops on tiny OneVision; B = 3 gives
    floor(floor(3 / 2) / 2) = 0 per crop, found at the first batch: the one line, exit 2."""
    rc = eval_run(fixture_data, tmp_path / "runs", "--method", "attnmix", "--budget", "3", "--run-name", "r",
                  model="tiny:llava-onevision")
    assert rc == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert err == ["error: attnmix: budget 3 over 2 crops keeps nothing (AdaV keeps 2*floor(floor(B/2)/N) per "
                   "unit); use a budget >= 4"]


@pytest.mark.parametrize("model, args, msg", [
    ("tiny:llava-next", ["attnmix", "8", "crop_offset_bug=true"],
     "attnmix: crop_offset_bug reproduces the released code, which runs the 'spatial' LLaVA-NeXT layout only "
     "(load with next_layout='spatial')"),  # spatial_unpad (the default) has newline tokens
    ("tiny:llava", ["consensusdrop", "8", "dominant=6", "contextual=1"],
     "consensusdrop: dominant 6 + contextual 1 must equal the budget 8"),
    # tiny LLaVA: 16 patches; B = 6: T_imp = int(6 x 0.75) = 4, T_div = 2, |R| = 16 - 4 = 12, the official first
    # round removes r = min(8, 12 - 2) = 8 > |R| // 2 = 6
    ("tiny:llava", ["vispruner", "6", "reference=true"],
     "vispruner(reference=True): |R| = 12 with r = 8 to remove; the official gather needs |R| even and "
     "r <= |R| // 2 (it would fail here). Use reference=False for our rule."),
])
def test_llava_ask_layout_refusals_are_one_line_exit_2(model, args, msg, capsys):
    method, budget, *opts = args
    argv = ["ask", "--question", "what?", "--model", model, "--method", method, "--budget", budget]
    for o in opts:
        argv += ["--opt", o]
    assert llava_main(argv) == 2
    assert one_error_line(capsys.readouterr().err) == "error: " + msg


def test_eval_run_subprocess_has_no_traceback(fixture_data, tmp_path):
    p = subprocess.run([sys.executable, "-m", "eval", "run", "pope", "--method", "random", "--budget", "-5",
                        "--data-root", str(fixture_data), "--out", str(tmp_path), "--no-wandb"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert p.returncode == 2
    assert "budget must be > 0" in one_error_line(p.stderr)


# ---------------------------------------------------------------- item 4: a failed start leaves no trap


def test_failed_model_load_writes_no_run_config(fixture_data, tmp_path, capsys):
    rc = eval_run(fixture_data, tmp_path / "runs", "--method", "random", "--budget", "4", "--run-name", "r",
                  model="tiny:nope")
    assert rc == 2  # a bad model id is bad input: one line, exit 2
    assert "cannot load model 'tiny:nope'" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs" / "pope" / "r" / "run_config.json").exists()


def test_folder_without_answers_never_blocks_a_new_config(fixture_data, tmp_path, capsys):
    # a run_config.json of another configuration, but no answers (what a failed start used to leave)
    old = RunConfig(benchmark="pope", data_root=str(fixture_data), out=str(tmp_path), run_name="same", method="random",
                    budget=8, max_new_tokens=2)
    rd = run_dir_of(old)
    rd.mkdir(parents=True)
    (rd / "run_config.json").write_text(json.dumps({"config": {**old.__dict__, "max_new_tokens": 2}}))
    new = RunConfig(benchmark="pope", data_root=str(fixture_data), out=str(tmp_path), run_name="same", method="random",
                    budget=4, max_new_tokens=2, wandb=False)
    assert run(new) == 0
    saved = json.loads((rd / "run_config.json").read_text())
    assert saved["config"]["budget"] == 4 and "resolved" in saved
    # with answers in it, a different configuration is still refused
    assert run(RunConfig(**{**new.__dict__, "budget": 8})) == 2
    assert "different configuration" in capsys.readouterr().err


def test_budget_above_the_visual_tokens_is_said_and_recorded(fixture_data, tmp_path, caplog, capsys):
    import logging

    c = RunConfig(benchmark="pope", data_root=str(fixture_data), out=str(tmp_path), method="random", budget=1000,
                  max_new_tokens=2, wandb=False)
    with caplog.at_level(logging.WARNING, logger="eval"):
        assert run(c) == 0
    said = [r for r in caplog.records if "nothing is pruned" in r.getMessage()]
    assert len(said) == 1 and "budget 1000 >= the 16 visual tokens" in said[0].getMessage()
    res = json.loads((run_dir_of(c) / "results.json").read_text())
    assert res["budget"]["requested"] == 1000 and res["budget"]["effective"] is None
    assert res["budget"]["unpruned_samples"] == res["budget"]["samples"] == 6
    assert "effective budget none (unpruned)" in capsys.readouterr().out
    c4 = RunConfig(benchmark="pope", data_root=str(fixture_data), out=str(tmp_path), method="random", budget=4,
                   max_new_tokens=2, wandb=False)
    assert run(c4) == 0
    res = json.loads((run_dir_of(c4) / "results.json").read_text())
    assert res["budget"] == {"requested": 4, "effective": 4, "unpruned_samples": 0, "samples": 6}


def test_ask_keeps_the_traceback_of_a_bug(monkeypatch, capsys):
    def broken_generate(*a, **k):
        raise ValueError("a bug inside generate")

    from llava.models import load

    rt = load("tiny:llava")
    monkeypatch.setattr(rt.model, "generate", broken_generate)
    monkeypatch.setattr("llava.models.load", lambda *a, **k: rt)
    with pytest.raises(ValueError, match="a bug inside generate"):  # not turned into an `error:` line
        llava_main(["ask", "--question", "what?", "--method", "random", "--budget", "4"])
    monkeypatch.undo()
    assert llava_main(["ask", "--question", "what?", "--model", "tiny:nope"]) == 2  # a bad model id is bad input
    assert "cannot load model 'tiny:nope'" in one_error_line(capsys.readouterr().err)


def test_option_without_a_value_is_exit_2(fixture_data, tmp_path, capsys):
    for call in (lambda: eval_run(fixture_data, tmp_path, "--method", "random", "--budget", "4", "--opt", "nonsense"),
                 lambda: llava_main(["ask", "--question", "q", "--opt", "nonsense"])):
        with pytest.raises(SystemExit) as e:
            call()
        assert e.value.code == 2
        assert "--opt expects key=value, got 'nonsense'" in one_error_line(capsys.readouterr().err)
