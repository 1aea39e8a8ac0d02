"""Issue 33: a fixed data file must not cost the answers already computed. A resume keeps every answer
whose question and input files are unchanged, recomputes (and sets aside) the others, drops answers to
questions no longer in the list, answers the new ones, and says how many of each; run-wide changes are
still refused. The merge and `eval score` apply the same per-answer check."""

import json
import os

import pytest
from PIL import Image

from eval.cli import main as eval_main
from eval.shards import EVAL_KEY, shard_files
from varied_answers import assert_answers_vary, save_varied_llava

pytestmark = pytest.mark.usefixtures("run_env")  # fixture_data / data: conftest


def eval_run(data, out, *extra, run_name="r", bench="pope", model="tiny:llava"):
    return eval_main(["run", bench, "--model", model, "--max-new-tokens", "2", "--data-root", str(data),
                      "--out", str(out), "--no-wandb", "--run-name", run_name, "--method", "random", "--budget", "4",
                      *extra])


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory):
    """A tiny LLaVA whose answers differ by question (tests/varied_answers.py): runs compared answer by answer."""
    return str(save_varied_llava(tmp_path_factory.mktemp("varied") / "gridmodel"))


def qfile(data):
    return data / "pope" / "llava_pope_test.jsonl"


def questions(data):
    return [json.loads(ln) for ln in qfile(data).read_text().splitlines() if ln.strip()]


def write_questions(data, rows):
    qfile(data).write_text("".join(json.dumps(r) + "\n" for r in rows))


def image(data, row):
    return data / "pope" / "val2014" / row["image"]


def records(rd):
    return [json.loads(ln) for p in shard_files(rd) for ln in p.read_text().splitlines()]


def answer_ids(rd):
    return {r[EVAL_KEY]["uid"]: r["answer_id"] for r in records(rd)}


def last_resume(rd):
    return json.loads((rd / "run_config.json").read_text())["resumes"][-1]


def counts(rd):
    r = last_resume(rd)
    return r["kept"], r["recomputed"], r["dropped"], r["new"]


def merged(rd):
    return [(r["question_id"], r["prompt"], r["text"]) for r in
            (json.loads(ln) for ln in (rd / "merge.jsonl").read_text().splitlines())]


def results(rd):
    return json.loads((rd / "results.json").read_text())


def superseded(rd):
    return [json.loads(ln) for p in sorted((rd / "superseded").glob("*.jsonl")) for ln in p.read_text().splitlines()]


def error_lines(err):
    assert "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("error: ")]


def other_image(path):
    """A different valid image in place of ``path`` (same name, size in pixels, format)."""
    img = Image.open(path).convert("RGB")
    Image.new("RGB", img.size, (200, 30, 60)).save(path, format="JPEG")


def test_corrupt_image_stops_the_run_then_the_same_command_answers_only_the_rest(data, varied_model, tmp_path, capsys):
    rows = questions(data)
    bad = image(data, rows[3])
    good = bad.read_bytes()
    bad.write_bytes(b"not a jpeg")  # the 4th question's image: the run stops there
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    capsys.readouterr()
    assert eval_run(data, out, model=varied_model) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"question {rows[3]['question_id']}" in line and str(bad) in line and "3 answers" in line
    first = answer_ids(rd)
    assert sorted(first) == sorted(str(r["question_id"]) for r in rows[:3])
    bad.write_bytes(good)  # restored: the same command again
    assert eval_run(data, out, model=varied_model) == 0
    assert counts(rd) == (3, 0, 0, 3)
    now = answer_ids(rd)
    assert len(now) == 6 and all(now[u] == a for u, a in first.items())  # the 3 answers were kept, not redone
    assert not (rd / "superseded").exists()
    # the same answers and scores as a run that never stopped (answers that differ by question: a real comparison)
    assert eval_run(data, out, model=varied_model, run_name="uninterrupted") == 0
    ref = out / "pope" / "uninterrupted"
    assert_answers_vary([text for _, _, text in merged(ref)], 4)
    assert merged(rd) == merged(ref) and results(rd)["metrics"] == results(ref)["metrics"]


def test_a_replaced_image_recomputes_exactly_the_questions_that_read_it(data, tmp_path, capsys):
    rows = questions(data)
    rows[1]["image"] = rows[0]["image"]  # questions 1 and 2 ask about the same image
    write_questions(data, rows)
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    before = answer_ids(rd)
    other_image(image(data, rows[0]))
    capsys.readouterr()
    assert eval_run(data, out) == 0
    assert counts(rd) == (4, 2, 0, 0)
    rel = f"pope/val2014/{rows[0]['image']}"
    assert last_resume(rd)["recompute_reasons"] == {f"input {rel}": 2}
    after = answer_ids(rd)
    same = {u for u in before if after[u] == before[u]}
    assert same == {str(r["question_id"]) for r in rows[2:]}  # only the two questions of that image were redone
    aside = superseded(rd)  # the old answers are kept aside, with the reason
    assert sorted(r[EVAL_KEY]["uid"] for r in aside) == sorted(str(r["question_id"]) for r in rows[:2])
    assert {r["answer_id"] for r in aside} == {before[str(r["question_id"])] for r in rows[:2]}
    assert all(r[EVAL_KEY]["superseded"]["reason"] == f"input {rel}" for r in aside)
    new = {r[EVAL_KEY]["uid"]: r[EVAL_KEY]["inputs"][rel][1] for r in records(rd) if rel in r[EVAL_KEY]["inputs"]}
    assert len(new) == 2 and all(h != aside[0][EVAL_KEY]["inputs"][rel][1] for h in new.values())
    assert results(rd)["counts"]["answered"] == 6


def test_an_edited_question_recomputes_that_question_only(data, tmp_path):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    before = answer_ids(rd)
    rows = questions(data)
    rows[4]["text"] = rows[4]["text"].replace("Is there a", "Do you see a")
    write_questions(data, rows)
    assert eval_run(data, out) == 0
    assert counts(rd) == (5, 1, 0, 0) and last_resume(rd)["recompute_reasons"] == {"question": 1}
    after = answer_ids(rd)
    assert [u for u in before if after[u] != before[u]] == [str(rows[4]["question_id"])]
    assert merged(rd)[4][1].startswith("Do you see a")


def test_same_bytes_under_a_new_mtime_are_kept_and_hashed_once(data, tmp_path):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    for p in (data / "pope" / "val2014").iterdir():  # a re-download: the same bytes, new times
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    assert eval_run(data, out) == 0
    assert counts(rd) == (6, 0, 0, 0)
    cache = (rd / "input_hashes.jsonl").read_text().splitlines()
    assert len(cache) == 6  # each image read once to check it ...
    assert eval_run(data, out) == 0
    assert counts(rd) == (6, 0, 0, 0) and len((rd / "input_hashes.jsonl").read_text().splitlines()) == 6  # ... then cached


def test_a_removed_question_is_dropped_with_a_note_and_reused_when_it_comes_back(data, tmp_path):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    before = answer_ids(rd)
    rows = questions(data)
    write_questions(data, rows[:2] + rows[3:])
    assert eval_run(data, out) == 0
    assert counts(rd) == (5, 0, 1, 0)
    res = results(rd)
    gone = str(rows[2]["question_id"])
    assert res["counts"]["answered"] == 5 and res["counts"]["left_out"]["uids"] == [gone]
    assert [m[0] for m in merged(rd)] == [r["question_id"] for r in rows[:2] + rows[3:]]
    write_questions(data, rows)  # back again, unchanged: its answer is reused
    assert eval_run(data, out) == 0
    assert counts(rd) == (6, 0, 0, 0) and answer_ids(rd) == before


def test_score_and_merge_refuse_an_answer_whose_input_changed(data, tmp_path, capsys):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    rows = questions(data)
    other_image(image(data, rows[5]))
    capsys.readouterr()
    for cmd in ("score", "merge"):
        assert eval_main([cmd, str(rd)]) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert (f"question {rows[5]['question_id']} was made for another version of its input pope/val2014/"
                f"{rows[5]['image']}") in line and "run the same `eval run` command again" in line
    assert eval_run(data, out) == 0  # which the resume then recomputes
    assert counts(rd) == (5, 1, 0, 0)
    assert eval_main(["score", str(rd)]) == 0


@pytest.mark.parametrize("change", [["--method", "none", "--budget", "none"], ["--budget", "8"], ["--dtype", "bfloat16"]],
                         ids=["method", "budget", "dtype"])
def test_run_wide_changes_are_still_refused(data, tmp_path, capsys, change):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    before = answer_ids(rd)
    args = ["run", "pope", "--model", "tiny:llava", "--max-new-tokens", "2", "--data-root", str(data), "--out", str(out),
            "--no-wandb", "--run-name", "r", "--method", "random", "--budget", "4"]
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    capsys.readouterr()
    assert eval_main(args) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds answers of a different configuration" in line and change[0].lstrip("-") in line
    assert answer_ids(rd) == before and not (rd / "superseded").exists()


def test_missing_inputs_are_listed_once(data, tmp_path, capsys):
    rows = questions(data)
    rows[1]["image"] = rows[0]["image"]
    write_questions(data, rows)
    image(data, rows[0]).unlink()
    capsys.readouterr()
    assert eval_run(data, tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert "error: 1 input file(s)" in err and err.count(rows[0]["image"]) == 1


def legacy(rd):
    """Answers written before input hashes (run-level fingerprint only)."""
    for p in shard_files(rd):
        recs = [json.loads(ln) for ln in p.read_text().splitlines()]
        for r in recs:
            r[EVAL_KEY].pop("inputs", None)
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_answers_without_input_hashes_are_kept_while_the_image_set_is_unchanged(data, tmp_path):
    out = tmp_path / "runs"
    rd = out / "pope" / "r"
    assert eval_run(data, out) == 0
    legacy(rd)
    assert eval_run(data, out) == 0
    assert counts(rd) == (6, 0, 0, 0)
    legacy(rd)
    other_image(image(data, questions(data)[0]))  # which answer read it cannot be told: every image answer is redone
    assert eval_run(data, out) == 0
    assert counts(rd) == (0, 6, 0, 0) and last_resume(rd)["recompute_reasons"] == {"inputs": 6}
    assert all(r[EVAL_KEY]["inputs"] for r in records(rd))  # recorded from now on


def test_input_hasher_caches_by_stat_and_hashes_embedded_images(tmp_path):
    from eval.benchmarks.base import B64Image, Question
    from eval.fingerprint import INLINE, InputHasher, changed_inputs

    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    h = InputHasher(tmp_path, tmp_path / "cache.jsonl")
    q = Question(idx=0, uid="0", qid=0, text="t", prompt="t", image=str(f))
    first = h.inputs(q, persist=True)
    import hashlib

    assert first["a.bin"][1] == hashlib.sha256(b"abc").hexdigest()[:16] and h.hashed == 1
    assert h.inputs(q) == first and h.hashed == 1  # same size and mtime: not read again
    h2 = InputHasher(tmp_path, tmp_path / "cache.jsonl")  # another session: the cache file
    assert h2.inputs(q) == first and h2.hashed == 0
    f.write_bytes(b"abd")
    os.utime(f, ns=(0, 5))
    now = h2.inputs(q)
    assert changed_inputs(first, now) == ["a.bin"] and h2.hashed == 1
    f.unlink()
    assert changed_inputs(first, h2.inputs(q)) == ["a.bin"]  # a missing file never matches
    a = Question(idx=0, uid="0", qid=0, text="t", prompt="t", image=B64Image("aGVsbG8="))
    b = Question(idx=0, uid="0", qid=0, text="t", prompt="t", image=B64Image("aGVsbG9v"))
    assert h.inputs(a)[INLINE][1] == hashlib.sha256(b"aGVsbG8=").hexdigest()[:16]
    assert changed_inputs(h.inputs(a), h.inputs(b)) == [INLINE]
    pil = Image.new("RGB", (2, 2), (1, 2, 3))
    c = Question(idx=0, uid="0", qid=0, text="t", prompt="t", image=pil)
    assert h.inputs(c) == h.inputs(Question(idx=0, uid="0", qid=0, text="t", prompt="t", image=pil.copy()))
