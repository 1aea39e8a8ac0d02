"""Issue 16, item 1 (and issue 33): a resumed run never mixes answers of other data / prompt / model /
method. A run folder records a fingerprint of what its answers were made under (run_config.json
"fingerprint"; every answer carries _eval.qhash and _eval.inputs). A run-wide change (template, model,
method, options, dtype) refuses the resume with one `error:` line naming what changed and exit 2; a data
change recomputes exactly the answers it touches (tests/test_resume_per_question.py has the details);
the merge refuses an answer whose question or inputs differ from the data."""

import json
import shutil
from pathlib import Path

import pytest

from eval.cli import main as eval_main
from eval.results import MergeError, merge
from eval.shards import EVAL_KEY, shard_files


pytestmark = pytest.mark.usefixtures("run_env")  # fixture_data / data: conftest


def eval_run(data, out, *extra, model="tiny:llava", bench="pope"):
    return eval_main(["run", bench, "--model", model, "--max-new-tokens", "2", "--data-root", str(data),
                      "--out", str(out), "--no-wandb", "--run-name", "r", "--method", "random", "--budget", "4",
                      *extra])


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def crashed_run(data, out, *extra, **kw):
    """A run killed after its first batch: the folder holds some answers, not all."""
    with pytest.raises(SystemExit):
        import os

        orig, me = os._exit, os.getpid()
        try:  # this process only: a loader worker forked meanwhile must still leave by the real os._exit
            os._exit = lambda code: (_ for _ in ()).throw(SystemExit(code)) if os.getpid() == me else orig(code)
            eval_run(data, out, "--stop-after", "1", *extra, **kw)
        finally:
            os._exit = orig
    rd = Path(out) / kw.get("bench", "pope") / "r"
    n = sum(1 for p in shard_files(rd) for _ in p.read_text().splitlines())
    assert n >= 1
    return rd


def qfile(data):
    return data / "pope" / "llava_pope_test.jsonl"


def rewrite_questions(path, fn):
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    path.write_text("".join(json.dumps(fn(r)) + "\n" for r in rows))


def test_unchanged_resume_is_lossless_and_records_a_fingerprint(data, tmp_path, capsys):
    rd = crashed_run(data, tmp_path / "runs")
    assert eval_run(data, tmp_path / "runs") == 0
    meta = json.loads((rd / "run_config.json").read_text())
    fp = meta["fingerprint"]
    assert set(fp) >= {"data", "template", "model", "method", "dtype", "code"}
    assert fp["data"]["question_files"]["pope/llava_pope_test.jsonl"]
    recs = [json.loads(ln) for p in shard_files(rd) for ln in p.read_text().splitlines()]
    uids = [r[EVAL_KEY]["uid"] for r in recs]
    n = sum(1 for ln in qfile(data).read_text().splitlines() if ln.strip())
    assert len(uids) == len(set(uids)) == n  # 0 lost, 0 duplicated
    assert all(r[EVAL_KEY]["qhash"] for r in recs)
    assert len((rd / "merge.jsonl").read_text().splitlines()) == n


def last_resume(rd):
    return json.loads((rd / "run_config.json").read_text())["resumes"][-1]


def test_changed_question_file_recomputes_every_changed_answer(data, tmp_path):
    rd = crashed_run(data, tmp_path / "runs")
    n_before = len(recorded_uids(rd))
    rewrite_questions(qfile(data), lambda r: {**r, "text": "Is there a zebra in the image?"})  # same ids
    assert eval_run(data, tmp_path / "runs") == 0
    r = last_resume(rd)
    assert (r["kept"], r["recomputed"], r["new"], r["recompute_reasons"]) == (0, n_before, 6 - n_before,
                                                                               {"question": n_before})
    assert any("question file pope/llava_pope_test.jsonl" in c for c in r["data_changes"])
    merged = [json.loads(ln) for ln in (rd / "merge.jsonl").read_text().splitlines()]
    assert len(merged) == 6 and all(m["prompt"].startswith("Is there a zebra") for m in merged)


def test_other_data_root_with_same_ids_recomputes(data, fixture_data, tmp_path):
    other = Path(shutil.copytree(fixture_data, tmp_path / "other"))
    rewrite_questions(qfile(other), lambda r: {**r, "text": r["text"].replace("Is there", "Is there not")})
    rd = crashed_run(data, tmp_path / "runs")
    n_before = len(recorded_uids(rd))
    assert eval_run(other, tmp_path / "runs") == 0
    assert last_resume(rd)["recomputed"] == n_before and last_resume(rd)["kept"] == 0


def recorded_uids(rd):
    return [json.loads(ln)[EVAL_KEY]["uid"] for p in shard_files(rd) for ln in p.read_text().splitlines()]


def test_same_content_under_another_data_root_resumes(data, tmp_path, capsys):
    rd = crashed_run(data, tmp_path / "runs")
    n_before = len(recorded_uids(rd))
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, copy_function=shutil.copyfile)  # new mtimes: the bytes are hashed again
    assert eval_run(moved, tmp_path / "runs") == 0
    assert (rd / "merge.jsonl").exists()
    assert (last_resume(rd)["kept"], last_resume(rd)["recomputed"]) == (n_before, 0)


def test_changed_image_recomputes_its_question(data, tmp_path, capsys):
    rd = crashed_run(data, tmp_path / "runs")
    first = json.loads(shard_files(rd)[0].read_text().splitlines()[0])
    (rel,) = first[EVAL_KEY]["inputs"]
    img = data / rel
    img.write_bytes(img.read_bytes() + b"\0" * 16)  # same name, other bytes
    assert eval_run(data, tmp_path / "runs") == 0
    r = last_resume(rd)
    assert r["recomputed"] == 1 and r["recompute_reasons"] == {f"input {rel}": 1}
    assert any("image / video set" in c for c in r["data_changes"])


def test_changed_video_frame_folder_recomputes_its_questions(data, tmp_path, capsys):
    kw = {"bench": "msvd", "model": "tiny:video-llava"}
    assert eval_run(data, tmp_path / "runs", **kw) == 0
    rd = tmp_path / "runs" / "msvd" / "r"
    rel = "GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA/videos/msvdvid1"  # a frame folder
    uses = [r[EVAL_KEY]["uid"] for p in shard_files(rd) for r in map(json.loads, p.read_text().splitlines())
            if rel in r[EVAL_KEY]["inputs"]]
    n = len(recorded_uids(rd))
    assert 1 <= len(uses) < n
    frame = sorted((data / rel).iterdir())[0]
    frame.write_bytes(frame.read_bytes() + b"\0" * 16)
    assert eval_run(data, tmp_path / "runs", **kw) == 0
    r = last_resume(rd)
    assert (r["recompute_reasons"], r["kept"]) == ({f"input {rel}": len(uses)}, n - len(uses))


def test_changed_prompt_template_refuses(data, tmp_path, capsys, monkeypatch):
    import dataclasses

    from llava import conversation

    crashed_run(data, tmp_path / "runs")
    t = conversation.TEMPLATES["vicuna_v1"]
    monkeypatch.setitem(conversation.TEMPLATES, "vicuna_v1", dataclasses.replace(t, system=t.system + " Be brief."))
    capsys.readouterr()
    assert eval_run(data, tmp_path / "runs") == 2
    assert "prompt template (vicuna_v1" in one_error_line(capsys.readouterr().err)


def test_changed_model_refuses(data, tmp_path, capsys):
    crashed_run(data, tmp_path / "runs")
    capsys.readouterr()
    assert eval_run(data, tmp_path / "runs", "--seed", "1") == 2  # tiny: random weights, another seed
    line = one_error_line(capsys.readouterr().err)
    assert "changed since they were written" in line and "seed (0 -> 1)" in line


def save_tiny(path, seed):
    from llava.models import load

    rt = load("tiny:llava", seed=seed)
    rt.model.save_pretrained(path)
    rt.tokenizer.save_pretrained(path)
    rt.processor.image_processor.save_pretrained(path)


def test_other_weights_in_a_local_model_folder_refuse(data, tmp_path, capsys):
    model = tmp_path / "model"
    save_tiny(model, 0)
    crashed_run(data, tmp_path / "runs", model=str(model))
    save_tiny(model, 1)  # another checkpoint, same architecture: same file names and sizes
    capsys.readouterr()
    assert eval_run(data, tmp_path / "runs", model=str(model)) == 2
    err = capsys.readouterr().err  # transformers' "Loading weights" progress bar is on stderr too
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "changed since they were written: model (" in line and "model.safetensors" in line


def test_changed_method_option_refuses(data, tmp_path, capsys):
    crashed_run(data, tmp_path / "runs", "--opt", "seed=1")
    capsys.readouterr()
    assert eval_run(data, tmp_path / "runs", "--opt", "seed=2") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "changed since they were written" in line and "options" in line and '"seed": 2' in line


def test_local_model_fingerprint_sees_config_and_weights(tmp_path):
    from eval.fingerprint import compare, model_fingerprint

    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"a": 1}')
    (m / "model.safetensors").write_bytes(b"x" * 10)
    a = model_fingerprint(str(m), 0)
    (m / "model.safetensors").write_bytes(b"x" * 11)
    b = model_fingerprint(str(m), 0)
    (m / "config.json").write_text('{"a": 2}')
    c = model_fingerprint(str(m), 0)
    assert a != b != c and model_fingerprint("tiny:llava", 0) != model_fingerprint("tiny:llava", 1)
    changes, _ = compare({"model": a}, {"model": b})
    assert len(changes) == 1 and changes[0].startswith("model (")
    changes, warnings = compare({"model": a, "code": {"commit": "x"}}, {"model": a, "code": {"commit": "y"}})
    assert not changes and warnings == ["code version x -> y"]  # code alone only warns


def test_code_version_change_alone_resumes(data, tmp_path, caplog):
    import logging

    rd = crashed_run(data, tmp_path / "runs")
    meta = json.loads((rd / "run_config.json").read_text())
    meta["fingerprint"]["code"] = {"commit": "0" * 40, "dirty": False}
    (rd / "run_config.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="eval"):
        assert eval_run(data, tmp_path / "runs") == 0
    assert "code version" in caplog.text
    assert "0" * 40 in [v.get("commit") for v in json.loads((rd / "run_config.json").read_text())["code_versions"]]


def strip_fingerprint(rd):
    """What a run folder written before fingerprints looks like."""
    meta = json.loads((rd / "run_config.json").read_text())
    del meta["fingerprint"]
    (rd / "run_config.json").write_text(json.dumps(meta))
    for p in shard_files(rd):
        recs = [json.loads(ln) for ln in p.read_text().splitlines()]
        for r in recs:
            del r[EVAL_KEY]["qhash"], r[EVAL_KEY]["inputs"]
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_old_folder_without_fingerprint_resumes_when_its_answers_match(data, tmp_path):
    rd = crashed_run(data, tmp_path / "runs")
    strip_fingerprint(rd)
    assert eval_run(data, tmp_path / "runs") == 0
    assert "fingerprint" in json.loads((rd / "run_config.json").read_text())


def test_old_folder_without_fingerprint_recomputes_other_questions(data, tmp_path, capsys):
    rd = crashed_run(data, tmp_path / "runs")
    n_before = len(recorded_uids(rd))
    strip_fingerprint(rd)
    rewrite_questions(qfile(data), lambda r: {**r, "text": "Is there a zebra in the image?"})  # same ids
    assert eval_run(data, tmp_path / "runs") == 0
    assert last_resume(rd)["recompute_reasons"] == {"question": n_before}  # re-verified against the question text


def test_merge_refuses_an_answer_whose_question_hash_differs(data, tmp_path):
    rd = crashed_run(data, tmp_path / "runs")
    assert eval_run(data, tmp_path / "runs") == 0
    from eval.benchmarks import get_benchmark

    bench = get_benchmark("pope", str(data))
    qs = bench.load()
    merge(rd, qs, root=bench.root)  # fine as written
    p = shard_files(rd)[0]
    recs = [json.loads(ln) for ln in p.read_text().splitlines()]
    recs[0][EVAL_KEY]["qhash"] = "0" * 16
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(MergeError) as e:
        merge(rd, qs, root=bench.root)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and str(p) in msg and recs[0][EVAL_KEY]["uid"] in msg
    assert eval_main(["score", str(rd)]) != 0  # the score command refuses too
