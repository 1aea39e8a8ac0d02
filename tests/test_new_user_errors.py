"""The rough edges a new user hit (issue 63): each wrong input gets one message that names the real problem,
each silent no-op says so."""

import pytest

from llava.cli import main as cli_main
from llava.model_source import local_path_error
from llava.models import load


# ---- item 6: a model path that does not exist ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["/path/that/does/not/exist", "./no-such-model", "../no/such", "models/x/y"])
def test_a_missing_model_directory_is_named_as_such(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path_error(name) == f"no such directory: {name}"
    with pytest.raises(FileNotFoundError, match="^no such directory: "):
        load(name)


def test_an_existing_folder_or_a_hub_id_is_not_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert local_path_error(str(tmp_path / "ckpt")) is None and local_path_error("./ckpt") is None
    assert local_path_error("llava-hf/llava-1.5-7b-hf") is None  # a hub id: the hub client's business
    assert local_path_error("weights.bin").startswith("not a directory: weights.bin (a model is a checkpoint folder")


def test_ask_names_the_missing_directory(capsys):
    assert cli_main(["ask", "--model", "/path/that/does/not/exist", "--question", "hi"]) == 2
    assert capsys.readouterr().err == ("error: cannot load model '/path/that/does/not/exist': "
                                       "no such directory: /path/that/does/not/exist\n")


# ---- item 5: one question as a string ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny:llava", "tiny:qwen2.5-vl"])
def proc(request):
    return load(request.param).processor


def test_one_question_as_a_string_is_a_batch_of_one(proc, tmp_path):
    from conftest import rand_image

    img = tmp_path / "photo.jpg"
    rand_image(1).save(img)
    one = proc("What?", str(img))
    listed = proc(["What?"], [str(img)])
    assert one.keys() == listed.keys() and one["input_ids"].shape[0] == 1
    for k in one:
        assert one[k].equal(listed[k]), k
    text = proc("What?")
    assert text["input_ids"].equal(proc(["What?"])["input_ids"]) and "pixel_values" not in text


def test_a_list_mismatch_names_only_what_was_passed(proc, tmp_path):
    with pytest.raises(ValueError) as e:
        proc(["a?", "b?"], ["x.jpg"])
    assert str(e.value) == "2 questions but 1 image entry: give one entry per question (None for none)"
    with pytest.raises(ValueError) as e:
        proc(["a?", "b?"], "x.jpg")
    assert str(e.value).startswith("2 questions but one image (str): give a list with one image entry per question")
    with pytest.raises(ValueError) as e:
        proc(["a?"], None, [None, None])
    assert str(e.value) == "1 question but 2 video entries: give one entry per question (None for none)"


# ---- item 7: a budget without a method, a budget that prunes nothing, --help's defaults ------------------------


def test_ask_refuses_a_budget_without_a_method(capsys):
    assert cli_main(["ask", "--question", "q", "--budget", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --budget 8 needs a pruning method: the method is 'none' (the default: no pruning)")


def test_eval_run_refuses_a_budget_without_a_method(tmp_path, capsys, monkeypatch):
    """`bash scripts/eval/shapes.sh none 16` becomes `eval run --method none --budget 16`: refused before anything
    loads or is written (it ran unpruned in a folder named ..._b16)."""
    from eval.cli import main as eval_main

    monkeypatch.delenv("RANK", raising=False)
    assert eval_main(["run", "pope", "--method", "none", "--budget", "16", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --budget 16 needs a pruning method")
    assert list(tmp_path.iterdir()) == []


def test_ask_says_when_the_budget_prunes_nothing(capsys):
    """tiny:llava has 16 visual tokens: a budget of 16 or more keeps them all, and ask says so; 8 prunes."""
    assert cli_main(["ask", "--question", "q", "--method", "random", "--budget", "16", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("note: budget 16 >= the 16 visual tokens of this input: nothing was pruned (the answer is the "
                      "unpruned model's)")
    assert out[2].startswith("visual tokens: 16 candidates -> 16 entering the LLM")
    assert cli_main(["ask", "--question", "q", "--method", "random", "--budget", "8", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and "visual tokens: 16 candidates -> 8 entering the LLM" in out


def test_ask_json_carries_the_note(capsys):
    import json

    assert cli_main(["ask", "--question", "q", "--method", "fastv", "--budget", "500", "--max-new-tokens", "1",
                     "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["note"].startswith("budget 500 >= the 16 visual tokens")


def test_help_shows_the_defaults(capsys):
    from eval.cli import build_parser

    with pytest.raises(SystemExit):
        cli_main(["ask", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for want in ("(default: tiny:llava)", "(default: none)", "(default: 32)", "(default: spatial_unpad)"):
        assert want in text
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(run.format_help().split())
    for want in ("--method METHOD pruning method (none: the unpruned model;", "(default: none)", "(default: runs)",
                 "(default: tiny:llava)", "(default: playground/data/eval)", "(default: 8)"):
        assert want in text, want


# ---- friction: eval list's marks, "did you mean", no internal names in messages --------------------------------


def test_eval_list_explains_its_marks(capsys):
    from eval.benchmarks import BENCHMARKS
    from eval.cli import main as eval_main

    assert eval_main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["benchmark", "title", "answer", "length", "metrics", "(*", "=", "the", "primary", "one)"]
    assert [ln.split()[0] for ln in out[1:1 + len(BENCHMARKS)]] == list(BENCHMARKS)
    gqa = out[1].split()
    assert gqa[0] == "gqa" and gqa[-4:] == ["128", "GQA*,", "GQA-binary,", "GQA-open"]
    assert out[1 + len(BENCHMARKS)].startswith("* the primary metric: the one a results table prints")
    assert out[2 + len(BENCHMARKS)].startswith("answer length: max_new_tokens of the official protocol")


@pytest.mark.parametrize("args, want", [
    (["ask", "--question", "q", "--method", "fastvv", "--budget", "3"],
     "error: unknown pruning method 'fastvv' (did you mean 'fastv'?); known methods: apet, "),
    (["ask", "--question", "q", "--method", "VisonZip", "--budget", "3"],
     "error: unknown pruning method 'VisonZip' (did you mean 'visionzip'?); known methods: "),
    (["ask", "--question", "q", "--method", "random", "--budget", "3", "--opt", "seeed=3"],
     "error: random: unknown option(s) ['seeed'] (did you mean 'seed'?); known: ['keep_newlines', 'position_mode', "
     "'seed']"),
    (["ask", "--question", "q", "--method", "qqqq", "--budget", "3"],
     "error: unknown pruning method 'qqqq'; known methods: apet, "),  # nothing close: no guess
])
def test_misspelled_names_get_a_did_you_mean(args, want, capsys):
    assert cli_main(args) == 2
    assert capsys.readouterr().err.startswith(want)


def test_misspelled_benchmark_and_benchmark_option(tmp_path):
    from eval.benchmarks import get_benchmark

    with pytest.raises(KeyError) as e:
        get_benchmark("gqaa", tmp_path)
    assert e.value.args[0].startswith("unknown benchmark 'gqaa' (did you mean 'gqa'?); known: gqa, vqav2")
    with pytest.raises(TypeError) as e:
        get_benchmark("mmbench", tmp_path, all_round=True)
    assert str(e.value) == ("mmbench: unknown benchmark option(s) ['all_round'] (did you mean 'all_rounds'?); known: "
                            "['all_rounds', 'split']")


def test_a_bad_budget_names_the_option_not_the_function(capsys):
    from eval.cli import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["run", "pope", "--budget", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("python -m eval run: error: argument --budget: a budget is a whole number of visual "
                                    "tokens or 'none', got 'abc'")
    assert "_budget" not in err


def test_the_run_summary_says_no_budget_in_words(capsys):
    from eval.summary import print_summary

    res = {"benchmark": "pope", "model": {"id": "tiny:llava", "family": "llava"}, "method": {"method": "none",
           "budget": None}, "metrics": {}, "metric_labels": {}, "files": {"results": "r.json"}}
    print_summary(res)
    assert capsys.readouterr().out.splitlines()[1] == "== pope | tiny:llava (llava) | none, no budget =="
    print_summary({**res, "method": {"method": "random", "budget": 4}})
    assert capsys.readouterr().out.splitlines()[1] == "== pope | tiny:llava (llava) | random, budget 4 =="


def test_bench_names_a_missing_model_directory_and_shows_its_defaults(capsys):
    from bench.efficiency import main as bench_main

    assert bench_main(["--model", "/path/that/does/not/exist", "--methods", "none", "--n", "1"]) == 2
    assert capsys.readouterr().err == ("error: cannot load model '/path/that/does/not/exist': no such directory: "
                                       "/path/that/does/not/exist\n")
    with pytest.raises(SystemExit):
        bench_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--n N timed samples per cell (default: " in text and "--out OUT output folder (default: " in text


def test_bench_ctrl_c_is_one_line(tmp_path, monkeypatch, capsys):
    import bench.efficiency as be

    def stopped(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(be, "run", stopped)
    assert be.main(["--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == (f"interrupted: the cells finished so far are in {tmp_path / 'cells.jsonl'} "
                                       "(--resume continues)\n")


@pytest.mark.parametrize("model, want", [
    ("tiny:lava", "unknown tiny family 'lava' (did you mean 'llava'?); choose from llava, llava-next, video-llava,"),
    ("shape:llava-1.5-7", "unknown shape config 'llava-1.5-7' (did you mean 'llava-1.5-7b'?); shipped: "),
])
def test_misspelled_built_models_get_a_did_you_mean(model, want):
    with pytest.raises(ValueError) as e:
        load(model)
    assert str(e.value).startswith(want)


def test_eval_list_into_head_has_no_traceback():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(f"{sys.executable} -m eval list | head -1", shell=True, cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert p.stdout.startswith("benchmark ") and p.stdout.count("\n") == 1
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr
