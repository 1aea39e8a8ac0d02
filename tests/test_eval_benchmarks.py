"""Each benchmark on a fixture dataset in its real layout (written by eval.fixtures): questions and
prompts as LLaVA builds them, and hand-written answer files through the official conversion and
scoring with the scores worked out in the comments. No model involved."""

import json

import pytest

from eval.benchmarks import BENCHMARKS, get_benchmark
from eval.benchmarks.base import LETTER_ANSWER, SHORT_ANSWER
from eval.datacheck import check_benchmark
from eval.fixtures import write_fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("eval_data"))


def answers(bench, texts):
    """LLaVA answer records for the benchmark's questions, in question order."""
    qs = bench.load()
    assert len(qs) == len(texts)
    return [bench.record(q, t, "m") for q, t in zip(qs, texts)]


#: the generated benchmarks at a few questions a seed (their defaults, 800 x 5 seeds, take ~20 s to make: CI time)
SMALL = {"shapes": {"n": 10}, "shapes2": {"n": 10}}


def test_every_benchmark_loads_in_file_order(data):
    for name in BENCHMARKS:
        b = get_benchmark(name, data, **SMALL.get(name, {}))
        qs = b.load()
        assert qs and [q.idx for q in qs] == list(range(len(qs)))
        assert len({q.uid for q in qs}) == len(qs), name
        rep = check_benchmark(b)
        assert rep.ok_inference and rep.ok_scoring, rep.text()


def test_datacheck_names_missing_files_and_sources(tmp_path, data):
    rep = check_benchmark(get_benchmark("pope", tmp_path))
    text = rep.text()
    assert not rep.ok_inference
    assert "MISSING  pope/llava_pope_test.jsonl" in text and "eval.zip" in text
    assert "pope/coco/coco_pope_random.json" in text and "AoiDragon/POPE" in text
    # inference files present, a referenced image missing
    (data / "gqa/data/images/n2.jpg").rename(data / "gqa/data/images/n2.bak")
    try:
        rep = check_benchmark(get_benchmark("gqa", data))
        assert not rep.ok_inference and "n2.jpg" in rep.text()
    finally:
        (data / "gqa/data/images/n2.bak").rename(data / "gqa/data/images/n2.jpg")


def test_gqa(data, tmp_path):
    b = get_benchmark("gqa", data)
    qs = b.load()
    assert qs[0].text == "Is the sky blue?" + "\n" + SHORT_ANSWER and qs[0].prompt == qs[0].text
    # answers yes, red, left, cup, no; outputs below: right, right, wrong ('right' != 'left'), right, right
    res = b.finalize(answers(b, ["Yes", "red.", "right", "Cup", "No"]), tmp_path, "ckpt")
    # 4/5 = 80; binary = verify/choose (201 ok, 203 wrong, 205 ok) = 2/3; open = query (202, 204) = 2/2
    assert res["metrics"]["GQA"] == 80.0
    assert res["metrics"]["GQA-binary"] == pytest.approx(200 / 3) and res["metrics"]["GQA-open"] == 100.0
    preds = json.loads((tmp_path / "upload/testdev_balanced_predictions.json").read_text())
    assert preds[1] == {"questionId": "202", "prediction": "red"}


def test_vqav2_testdev_upload_and_val_score(data, tmp_path):
    b = get_benchmark("vqav2", data)
    res = b.finalize(answers(b, ["Two", "a Dog.", "yes", "3"]), tmp_path, "ckpt")
    up = json.loads((tmp_path / "answers_upload/llava_vqav2_mscoco_test-dev2015/ckpt.json").read_text())
    # every test2015 question (6), answered test-dev ones normalised, the rest empty
    assert [u["answer"] for u in up] == ["2", "dog", "yes", "3", "", ""]
    assert res["pending"] and res["pending"][0].startswith("VQAv2-testdev:")
    v = get_benchmark("vqav2_val", data)
    assert v.load()[0].text == "How many dogs are there?\n" + SHORT_ANSWER
    # q70 humans: nine '2' (after 'two' -> '2') and one '3': '3' scores 0.3; q80: 4 red / 6 maroon: 'red' scores 1
    r = v.finalize(answers(v, ["3", "red"]), tmp_path, "ckpt")
    assert r["metrics"]["VQAv2-val"] == pytest.approx(65.0)


def test_textvqa_ocr_and_noocr(data, tmp_path):
    b = get_benchmark("textvqa", data)
    qs = b.load()
    assert qs[0].text.split("\n") == ["What is the brand of this camera?", "Reference OCR token: DAKOTA, DIGITAL", SHORT_ANSWER]
    assert [q.uid for q in qs] == ["a1", "a2", "a2#1", "a3"]  # TextVQA question ids are image ids: made unique
    # a1 'kodak' (2 of 10 humans) = 0.6; a2 '22' = 1; a2 colour 'red' (3 red / 7 maroon) = (3*2/3 + 7*1)/10 = 0.9;
    # a3 'The 10:10' -> '10:10' (5 of 10) = 1  -> mean 3.5 / 4 = 87.5
    res = b.finalize(answers(b, ["kodak", "22", "red", "The 10:10"]), tmp_path, "ckpt")
    assert res["metrics"]["TextVQA-OCR"] == pytest.approx(87.5)
    n = get_benchmark("textvqa_noocr", data)
    assert n.load()[0].text.split("\n") == ["What is the brand of this camera?", SHORT_ANSWER]
    assert n.finalize(answers(n, ["kodak", "22", "red", "The 10:10"]), tmp_path, "c")["metrics"]["TextVQA-noOCR"] == pytest.approx(87.5)


def test_pope(data, tmp_path):
    b = get_benchmark("pope", data)
    # labels: adversarial (no, yes), popular (yes, no), random (yes, no) -- see eval.fixtures.POPE_OBJECTS
    res = b.finalize(answers(b, ["No", "Yes", "yes", "Yes, there is", "Yes", "not sure"]), tmp_path, "ckpt")
    m = res["metrics"]
    # per split F1: 1, 2/3, 1 -> mean 88.89; pooled TP 3 FP 1 TN 2 FN 0 -> F1 85.71
    assert m["POPE-F1avg3"] == pytest.approx(100 * (8 / 3) / 3)
    assert m["POPE-F1pooled"] == pytest.approx(100 * 1.5 / 1.75)
    assert m["POPE-F1-popular"] == pytest.approx(200 / 3)


def test_mme(data, tmp_path):
    b = get_benchmark("mme", data)
    qs = b.load()
    assert len(qs) == 28 and qs[0].qid == qs[1].qid and qs[1].uid == qs[0].uid + "#1"
    # ground truth per image: (Yes, No). Answer 'Yes' everywhere -> acc 50, acc+ 0 -> 50 per subtask,
    # except 'existence' answered (Yes, No) -> 200.  P = 9*50 + 200 = 650, C = 4*50 = 200
    texts = ["Yes"] * 28
    texts[1] = "No"
    res = b.finalize(answers(b, texts), tmp_path, "ckpt")
    assert res["metrics"] == {"MME-P": 650.0, "MME-C": 200.0, "MME-P+C": 850.0}
    line = (tmp_path / "eval_tool/answers/ckpt/existence.txt").read_text().splitlines()[1].split("\t")
    assert line[1].endswith("  Please answer yes or no.") and line[2:] == ["No", "No"]  # GT found via the double-space rule


def test_scienceqa(data, tmp_path):
    b = get_benchmark("sqa", data)
    qs = b.load()
    assert qs[0].image is None and qs[0].prompt == "Which word is a noun?\nA. run\nB. table\n" + LETTER_ANSWER
    assert qs[1].prompt.startswith("<image>\nContext: A map.") and "<image>" not in qs[1].text
    # pid 4 (text) 'B' right; 5 (image) 'The answer is C.' right; 11 (image) 'B' wrong; 15 (text) 'b' FAILED
    res = b.finalize(answers(b, ["B", "The answer is C.", "B", "b"]), tmp_path, "ckpt")
    assert res["metrics"] == {"SQA-IMG": 50.0, "SQA-all": 50.0}


def test_mmbench_prompt_score_and_submission(data, tmp_path):
    from openpyxl import load_workbook

    b = get_benchmark("mmbench", data)
    qs = b.load()
    # row 1: hint first, only three options (D is empty -> NaN -> options stop), letter instruction last
    assert qs[1].text == ("The photo was taken outdoors.\nWhich season is shown?\nA. winter\nB. summer\nC. autumn\n"
                          + LETTER_ANSWER)
    assert qs[1].prompt == qs[1].text.rsplit("\n", 1)[0]
    assert qs[0].load_image().size == (40, 30)  # base64 image from the TSV
    # row 0 'A' right; row 1 'autumn' -> option text C, right; row 2 '3' -> option text '3' = C, answer D: wrong
    res = b.finalize(answers(b, ["A", "autumn", "3"]), tmp_path, "ckpt")
    assert res["metrics"]["MMB-dev-local"] == pytest.approx(200 / 3)
    ws = load_workbook(tmp_path / "answers_upload/mmbench_dev_20230712/ckpt.xlsx").active
    rows = list(ws.values)
    assert list(rows[0]) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[3][0] == 2 and rows[3][6] == "3" and rows[2][5] is None
    cn = get_benchmark("mmbench_cn", data)
    assert cn.load()[0].text.endswith("\n请直接回答选项字母。")
    rounds = get_benchmark("mmbench", data, all_rounds=True).load()
    assert len(rounds) == 4 + 3 + 4 and rounds[1].text.split("\n")[1:5] == ["A. rabbit", "B. cat", "C. dog", "D. teddy bear"]


def test_seed_vizwiz_mmvet(data, tmp_path):
    s = get_benchmark("seed", data)
    # 101 'A' right, 102 'B.' wrong (exact match), 103 'C' right, 201 (video frame) 'D' right
    r = s.finalize(answers(s, ["A", "B.", "C", "D"]), tmp_path, "ckpt")
    assert (r["metrics"]["SEED-all"], r["metrics"]["SEED-IMG"], r["metrics"]["SEED-video"]) == (75.0, pytest.approx(200 / 3), 100.0)
    v = get_benchmark("vizwiz", data)
    assert "respond with 'Unanswerable'" in v.load()[0].text
    v.finalize(answers(v, ["Unanswerable", "Two", "a cup."]), tmp_path, "ckpt")
    assert [x["answer"] for x in json.loads((tmp_path / "answers_upload/ckpt.json").read_text())] == ["unanswerable", "2", "cup"]
    m = get_benchmark("mmvet", data)
    assert m.load()[0].text == "What is x in the equation?"  # free-form: no suffix
    r = m.finalize(answers(m, ["x = -1", "a cat", "Paris"]), tmp_path, "ckpt")
    assert json.loads((tmp_path / "results/ckpt.json").read_text()) == {"v1_0": "x = -1", "v1_1": "a cat", "v1_2": "Paris"}
    assert r["pending"][0].startswith("MM-Vet:")


@pytest.mark.parametrize("name", ["msvd", "msrvtt", "tgif", "activitynet"])
def test_videoqa_layout_and_answers_by_id(data, name):
    from eval.benchmarks.videoqa import load_video

    b = get_benchmark(name, data)
    qs = b.load()
    assert all(q.extra["video_found"] for q in qs)
    # the fixture's test_a.json is in reverse order: reference answers are paired by question id
    assert [q.extra["answer"] for q in qs] == [f"answer {i}" for i in range(5)]
    assert qs[4].text == qs[4].prompt == "what is happening in clip 4?"
    frames = load_video(qs[0].video, 8)
    assert len(frames) == 8 and frames[0].size == (32, 24)
    rec = b.record(qs[0], b.postprocess("a dog runs</s>"), "m")
    assert rec == {"id": f"{name}_0", "question": "what is happening in clip 0?", "answer": "answer 0", "pred": "a dog runs"}


def test_kept_token_overlay_geometry():
    import numpy as np
    from PIL import Image

    from eval.overlay import kept_overlay, unit0_patches, view_mode

    white = Image.new("RGB", (80, 40), (255, 255, 255))
    # LLaVA-1.5: pad to square with the CLIP mean colour, then 4 x 4 patches; keep patches 0 and 5
    ov = np.asarray(kept_overlay(white, view_mode("llava", False, True), 4, 56, [0, 5], display=64)).astype(int)
    cell = lambda r, c: ov[r * 16 + 8, c * 16 + 8]  # noqa: E731 - centre pixel of patch (r, c)
    assert list(cell(1, 1)) == [255, 255, 255] and list(cell(1, 2)) == [63, 63, 63]  # kept vs dimmed (x 0.25)
    assert list(cell(0, 0)) == [122, 116, 104]  # kept padding: the CLIP-mean background of pad-to-square
    # Video-LLaVA frames keep [CLS] first: frame 0 is flat 0..16 (patch p at p + 1), 17 is the next [CLS]
    assert unit0_patches(4, [0, 1, 6, 16, 17, 40], cls_first=True) == [0, 5, 15] and unit0_patches(4, [3, 16]) == [3]
    assert view_mode("video_llava", True, True) == "crop" and view_mode("llava_next", False, True) == "squash"


def test_lmms_plugin_is_optional_and_registered():
    import importlib.util
    import py_compile
    from importlib.metadata import entry_points
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "integrations" / "lmms_eval" / "plugin.py"
    py_compile.compile(str(path), doraise=True)  # compiled, never imported without lmms-eval
    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vtprune"]
    assert eps and eps[0].value == "integrations.lmms_eval.plugin:manifest"
    if importlib.util.find_spec("lmms_eval") is None:
        with pytest.raises(ImportError):
            importlib.import_module("integrations.lmms_eval.plugin")
