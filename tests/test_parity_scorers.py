"""Scorer parity (parity/scorers.py): our POPE / TextVQA / ScienceQA scorers against the official LLaVA scripts run
unchanged in .venv-official (parity/official_scorers.py), on planted answer files.

``test_planted_answers_hand_values`` needs no official code: the metrics of the planted answers, worked out by hand
from the official scripts' rules (the reasoning is next to each answer in parity/scorers.py), reproduced by our
scorers. The other tests need ``.venv-official`` and are skipped without it.
"""

from pathlib import Path

import pytest

from conftest import OFFICIAL_PY, needs_official

import eval.scorers.yesno as yesno
from parity import scorers as P


# per category: TP FP TN FN, accuracy, precision, recall, F1, yes ratio, answers
POPE_HAND = {
    # 1 'No, there is not.' TN; 2 'Yes.' TP; 7 'Yes, ... skis. It is not red.' FP; 8 'There is no doubt, yes.' FN
    "adversarial": (1, 1, 1, 1, 2 / 4, 1 / 2, 1 / 2, 1 / 2, 2 / 4, 4),
    # 3 'Yes, there is a car ...' TP; 4 'NO' FP; 9 'No' TN; 10 'Not sure. Probably yes' TP
    "popular": (2, 1, 1, 0, 3 / 4, 2 / 3, 2 / 2, 2 * (2 / 3) / (2 / 3 + 1), 3 / 4, 4),
    # 5 'yes' TP; 6 'not sure' TN; 11 'No,there is none' FP; 12 'I do not think so, but yes' FN; 13 'A chair. ...' TP
    "random": (2, 1, 1, 1, 3 / 5, 2 / 3, 2 / 3, 2 / 3, 3 / 5, 5),
}
# leave-one-out soft accuracy: k of the 10 humans agree -> 0.3 (k=1), 0.6 (2), 0.9 (3), 1.0 (>= 4)
TEXTVQA_HAND = [0.6, 1.0, 0.9, 1.0, 0.9, 0.6, 0.3, 1.0, 0.0, 0.9]
SQA_HAND = {"4": "B", "5": "C", "11": "C", "15": "B", "20": "FAILED", "21": "FAILED", "22": "A", "23": "FAILED",
            "24": "FAILED", "25": "FAILED"}
SQA_CORRECT = {"4", "5", "15", "22"}  # 11's 'C' is beyond its two choices
SQA_IMAGE = {"5", "11", "22", "25"}


def test_planted_answers_hand_values(tmp_path):
    data = P.write_data(tmp_path / "data")
    out = tmp_path / "ours"

    pope = P.ours_pope(data, P.write_answers(P.get_benchmark("pope", data), P.POPE_ANSWERS, tmp_path / "pope.jsonl"), out)
    assert set(pope) == set(POPE_HAND)
    for cat, (tp, fp, tn, fn, acc, prec, rec, f1, yes, n) in POPE_HAND.items():
        m = pope[cat]
        assert (m["TP"], m["FP"], m["TN"], m["FN"], m["samples"]) == (tp, fp, tn, fn, n), cat
        assert [m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]] == pytest.approx(
            [acc, prec, rec, f1, yes], rel=1e-12), cat

    for name in ("textvqa", "textvqa_noocr"):
        records = P.write_answers(P.get_benchmark(name, data), P.TEXTVQA_ANSWERS, tmp_path / f"{name}.jsonl")
        t = P.ours_textvqa(name, data, records, out)
        assert t["per_question"] == pytest.approx(TEXTVQA_HAND, rel=1e-12)
        assert t["accuracy"] == pytest.approx(72.0, rel=1e-12) and t["printed"] == "72.00" and t["samples"] == 10

    sqa = P.ours_sqa(data, P.write_answers(P.get_benchmark("sqa", data), P.SQA_ANSWERS, tmp_path / "sqa.jsonl"), out)
    assert {pid: p["parsed_ans"] for pid, p in sqa["problems"].items()} == SQA_HAND
    assert {pid for pid, p in sqa["problems"].items() if p["correct"]} == SQA_CORRECT
    assert {pid for pid, p in sqa["problems"].items() if p["is_multimodal"]} == SQA_IMAGE
    assert (sqa["acc"], sqa["correct"], sqa["count"]) == (40.0, 4, 10)
    assert sqa["printed"] == {"accuracy": "40.00", "img_accuracy": "50.00"}


@needs_official
def test_official_scripts_agree(tmp_path):
    checks = P.run_scorers(str(OFFICIAL_PY), tmp_path)
    assert [c.case for c in checks] == ["pope adversarial", "pope popular", "pope random", "textvqa", "textvqa_noocr", "sqa"]
    assert all(c.group == "scorers" for c in checks)
    assert [c.case for c in checks if not c.ok] == [], [c.detail for c in checks if not c.ok]
    sqa = checks[-1].data
    assert sqa["official_pred_idx"]["11"] == -1 and sqa["official_pred_idx"]["5"] == 2


@needs_official
def test_planted_parser_change_is_caught(tmp_path, monkeypatch):
    """Our yes/no parser made to ignore 'not': 'not sure' and 'I do not think so, but yes' (random split) flip."""

    def ignores_not(text):
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        return "no" if ("No" in words or "no" in words) else "yes"

    monkeypatch.setattr(yesno, "pope_parse", ignores_not)
    checks = {c.case: c for c in P.run_scorers(str(OFFICIAL_PY), tmp_path)}
    assert not checks["pope random"].ok
    assert "TP: ours 3, official 2" in checks["pope random"].detail
    assert checks["pope adversarial"].ok and checks["pope popular"].ok and checks["sqa"].ok


@needs_official
def test_worker_refuses_repository_llava(tmp_path):
    """With this repository on PYTHONPATH, ``llava`` is ours: the worker exits 2 with one line."""
    import os
    import subprocess

    (tmp_path / "job.json").write_text("[]")
    env = {**os.environ, "PYTHONPATH": str(Path(P.__file__).resolve().parents[1])}
    p = subprocess.run([str(OFFICIAL_PY), str(P.WORKER), str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "not the official package" in p.stderr
    assert not (tmp_path / "out.json").exists()
