"""Tiny datasets in each benchmark's *real* layout (LLaVA's playground/data/eval, Video-LLaVA's
GPT_Zero_Shot_QA), for tests and smoke runs: ``python -m eval fixtures DIR``.

Images are a few dozen pixels; every file the loaders, converters and scorers read is present
with the real file names and field names, so a run on a fixture folder exercises exactly the
code paths of a real one (the answers of a tiny random model are noise, of course).
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

S = "\nAnswer the question using a single word or phrase."
L = "\nAnswer with the option's letter from the given choices directly."


def _img(seed: int, w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def gqa(root: Path) -> None:
    qs = [("201", "n1.jpg", "Is the sky blue?", "yes", "verify"), ("202", "n1.jpg", "What color is the car?", "red", "query"),
          ("203", "n2.jpg", "Which side is the dog on?", "left", "choose"), ("204", "n3.jpg", "What is on the table?", "cup", "query"),
          ("205", "n3.jpg", "Are there any chairs?", "no", "verify")]
    _jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": im, "text": t + S} for q, im, t, _, _ in qs])
    _json(root / "gqa/data/testdev_balanced_questions.json",
          {q: {"question": t, "answer": a, "isBalanced": True, "imageId": im[:-4], "types": {"structural": s}}
           for q, im, t, a, s in qs})
    for i, n in enumerate(("n1", "n2", "n3")):
        _save(_img(i, 50, 30), root / f"gqa/data/images/{n}.jpg")


def vqav2(root: Path) -> None:
    test = [{"question_id": 1000 + i, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"What is object {i}?" + S,
             "category": "default"} for i in range(6)]
    _jsonl(root / "vqav2/llava_vqav2_mscoco_test2015.jsonl", test)
    _jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", test[:4])
    for i in range(6):
        _save(_img(10 + i), root / f"vqav2/test2015/COCO_test2015_{i:012d}.jpg")
    # val (our layout: the official VQA files)
    qs = [{"image_id": 7, "question": "How many dogs are there?", "question_id": 70},
          {"image_id": 8, "question": "What color is the bus?", "question_id": 80}]
    anns = [{"question_id": 70, "image_id": 7, "answers": [{"answer": a, "answer_id": k + 1} for k, a in
                                                              enumerate(["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"])]},
            {"question_id": 80, "image_id": 8, "answers": [{"answer": a, "answer_id": k + 1} for k, a in
                                                              enumerate(["red"] * 4 + ["maroon"] * 6)]}]
    _json(root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", {"questions": qs})
    _json(root / "vqav2/v2_mscoco_val2014_annotations.json", {"annotations": anns})
    for q in qs:
        _save(_img(q["image_id"]), root / f"vqav2/val2014/COCO_val2014_{q['image_id']:012d}.jpg")


def textvqa(root: Path) -> None:
    rows = [("a1", "What is the brand of this camera?", "DAKOTA, DIGITAL", ["dakota"] * 8 + ["kodak"] * 2),
            ("a2", "What number is on the jersey?", "22", ["22"] * 10),
            ("a2", "What color is the jersey?", "22", ["red"] * 3 + ["maroon"] * 7),
            ("a3", "What time is it?", "", ["10:10"] * 5 + ["ten past ten"] * 5)]
    _jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": i, "image": f"{i}.jpg", "text": f"{q}\nReference OCR token: {o}" + S, "category": "default"}
            for i, q, o, _ in rows])
    _json(root / "textvqa/TextVQA_0.5.1_val.json",
          {"dataset_name": "textvqa", "dataset_version": "0.5.1", "dataset_type": "val",
           "data": [{"image_id": i, "question": q, "answers": a, "question_id": k} for k, (i, q, _, a) in enumerate(rows)]})
    for k, i in enumerate(("a1", "a2", "a3")):
        _save(_img(20 + k, 36, 60), root / f"textvqa/train_images/{i}.jpg")


POPE_OBJECTS = {"adversarial": [("snowboard", "no"), ("person", "yes")], "popular": [("car", "yes"), ("dog", "no")],
                "random": [("cup", "yes"), ("kite", "no")]}


def pope(root: Path) -> None:
    rows, qid = [], 1
    for cat, objs in POPE_OBJECTS.items():
        labels = []
        for k, (obj, label) in enumerate(objs):
            img = f"COCO_val2014_{qid:012d}.jpg"
            rows.append({"question_id": qid, "image": img, "text": f"Is there a {obj} in the image?" + S, "category": cat})
            labels.append({"question_id": k + 1, "image": img, "text": f"Is there a {obj} in the image?", "label": label})
            _save(_img(30 + qid), root / f"pope/val2014/{img}")
            qid += 1
        _jsonl(root / f"pope/coco/coco_pope_{cat}.json", labels)
    _jsonl(root / "pope/llava_pope_test.jsonl", rows)


MME_CATEGORIES = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
                  "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
MME_WITH_IMAGES_DIR = {"posters", "celebrity", "scene", "landmark", "artwork"}


def mme(root: Path) -> None:
    base = root / "MME/MME_Benchmark_release_version"
    rows = []
    for k, cat in enumerate(MME_CATEGORIES):
        name = f"{k:04d}"
        ext = "jpg" if cat in MME_WITH_IMAGES_DIR else "png"
        qs = [(f"Is there a {cat} object in the image?", "Yes"), (f"Is there a blue {cat} in the image?", "No")]
        if cat in MME_WITH_IMAGES_DIR:
            img_rel, txt = f"{cat}/images/{name}.{ext}", base / cat / "questions_answers_YN" / f"{name}.txt"
        else:
            img_rel, txt = f"{cat}/{name}.{ext}", base / cat / f"{name}.txt"
        _save(_img(40 + k), base / img_rel)
        txt.parent.mkdir(parents=True, exist_ok=True)
        # one question with MME's single space, one with the double space some release files have
        txt.write_text(f"{qs[0][0]} Please answer yes or no.\t{qs[0][1]}\n{qs[1][0]}  Please answer yes or no.\t{qs[1][1]}\n",
                       encoding="utf-8")
        for q, _ in qs:
            rows.append({"question_id": img_rel, "image": img_rel, "text": q + S, "category": cat})
    _jsonl(root / "MME/llava_mme.jsonl", rows)


def scienceqa(root: Path) -> None:
    items = [
        {"id": "4", "conversations": [{"from": "human", "value": "Which word is a noun?\nA. run\nB. table"},
                                       {"from": "gpt", "value": "B"}]},
        {"id": "5", "image": "5/image.png",
         "conversations": [{"from": "human", "value": "<image>\nContext: A map.\nWhich state is highlighted?\nA. Ohio\nB. Texas\nC. Utah"},
                           {"from": "gpt", "value": "C"}]},
        {"id": "11", "image": "11/image.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is the capital of Utah?\nA. Salt Lake City\nB. Denver"},
                           {"from": "gpt", "value": "A"}]},
        {"id": "15", "conversations": [{"from": "human", "value": "Select the mammal.\nA. frog\nB. whale\nC. shark\nD. eagle"},
                                        {"from": "gpt", "value": "B"}]},
    ]
    _json(root / "scienceqa/llava_test_CQM-A.json", items)
    problems = {"4": {"question": "Which word is a noun?", "choices": ["run", "table"], "answer": 1, "image": None, "split": "test"},
                "5": {"question": "Which state is highlighted?", "choices": ["Ohio", "Texas", "Utah"], "answer": 2, "image": "image.png", "split": "test"},
                "11": {"question": "What is the capital of Utah?", "choices": ["Salt Lake City", "Denver"], "answer": 0, "image": "image.png", "split": "test"},
                "15": {"question": "Select the mammal.", "choices": ["frog", "whale", "shark", "eagle"], "answer": 1, "image": None, "split": "test"},
                "99": {"question": "train only", "choices": ["a", "b"], "answer": 0, "image": None, "split": "train"}}
    _json(root / "scienceqa/problems.json", problems)
    _json(root / "scienceqa/pid_splits.json", {"test": ["4", "5", "11", "15"], "train": ["99"]})
    for k, pid in enumerate(("5", "11")):
        _save(_img(60 + k), root / f"scienceqa/images/test/{pid}/image.png")


def _b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_ROWS = [
    # index, question, hint, A, B, C, D, answer
    (0, "What is the main object?", "nan", "teddy bear", "rabbit", "cat", "dog", "A"),
    (1, "Which season is shown?", "The photo was taken outdoors.", "winter", "summer", "autumn", "nan", "C"),
    (2, "How many people are there?", "nan", "1", "2", "3", "4", "D"),
]


def mmbench(root: Path, folder: str = "mmbench", name: str = "mmbench_dev_20230712") -> None:
    path = root / folder / f"{name}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for k, (i, q, h, a, b, c, d, ans) in enumerate(MMB_ROWS):
            hint = "" if h == "nan" else h
            w.writerow([i, q, hint, a, b, c, "" if d == "nan" else d, ans, "attribute", _b64(_img(70 + k)), "src", "l2",
                        "", "dev"])


def mmvet(root: Path) -> None:
    meta = {"v1_0": {"imagename": "v1_0.png", "capability": ["ocr", "math"], "question": "What is x in the equation?",
                     "answer": "-1<AND>-5"},
            "v1_1": {"imagename": "v1_1.png", "capability": ["rec"], "question": "What is in the picture?", "answer": "a cat"},
            "v1_2": {"imagename": "v1_2.png", "capability": ["rec", "know"], "question": "Which country is this?",
                     "answer": "France<OR>Italy"}}
    _json(root / "mm-vet/mm-vet.json", meta)
    _jsonl(root / "mm-vet/llava-mm-vet.jsonl",
           [{"question_id": int(k[3:]), "image": v["imagename"], "text": v["question"]} for k, v in meta.items()])
    for k, v in enumerate(meta.values()):
        _save(_img(80 + k), root / f"mm-vet/images/{v['imagename']}")


def seed(root: Path) -> None:
    qs = [(101, "image", 1, "SEED-Bench-image/a.jpg", "A"), (102, "image", 2, "SEED-Bench-image/b.jpg", "B"),
          (103, "image", 1, "SEED-Bench-image/c.jpg", "C"), (201, "video", 10, "SEED-Bench-video-image/v1.png", "D")]
    _jsonl(root / "seed_bench/llava-seed-bench.jsonl",
           [{"image": im, "text": f"Question {q}?\nA. one\nB. two\nC. three\nD. four" + L, "category": "x", "question_id": q}
            for q, _, _, im, _ in qs])
    _json(root / "seed_bench/SEED-Bench.json",
          {"questions": [{"question_id": str(q), "data_type": dt, "question_type_id": t, "answer": a, "data_id": im}
                         for q, dt, t, im, a in qs],
           "question_type": {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}})
    for k, (_, _, _, im, _) in enumerate(qs):
        _save(_img(90 + k), root / "seed_bench" / im)


def vizwiz(root: Path) -> None:
    rows = [{"question_id": i, "image": f"VizWiz_test_{i:08d}.jpg",
             "text": f"What is this {i}?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + S}
            for i in range(3)]
    _jsonl(root / "vizwiz/llava_test.jsonl", rows)
    for r in rows:
        _save(_img(100 + r["question_id"]), root / f"vizwiz/test/{r['image']}")


def _gif(path: Path, seed_: int, frames: int = 10) -> None:
    imgs = [_img(seed_ * 100 + k, 32, 24) for k in range(frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=40, loop=0)


VIDEO = {"msvd": ("MSVD_Zero_Shot_QA", "videos", ""), "msrvtt": ("MSRVTT_Zero_Shot_QA", "videos/all", ""),
         "tgif": ("TGIF_Zero_Shot_QA", "mp4", ""), "activitynet": ("Activitynet_Zero_Shot_QA", "all_test", "v_")}


def videoqa(root: Path, which: str) -> None:
    d, vids, prefix = VIDEO[which]
    base = root / "GPT_Zero_Shot_QA" / d
    qs = [{"video_name": f"{which}vid{i // 2}", "question": f"what is happening in clip {i}?", "question_id": f"{which}_{i}"}
          for i in range(5)]
    # answers deliberately in a different order than the questions: the runner pairs by id
    ans = [{"answer": f"answer {i}", "type": 0, "question_id": f"{which}_{i}"} for i in reversed(range(5))]
    _json(base / "test_q.json", qs)
    _json(base / "test_a.json", ans)
    for k, name in enumerate(sorted({q["video_name"] for q in qs})):
        if k == 1:  # one video as a directory of frame images
            for j in range(9):
                _save(_img(500 + j, 32, 24), base / vids / f"{prefix}{name}" / f"{j:05d}.jpg")
        else:
            _gif(base / vids / f"{prefix}{name}.gif", k + 1)


WRITERS = {"gqa": gqa, "vqav2": vqav2, "vqav2_val": vqav2, "textvqa": textvqa, "textvqa_noocr": textvqa, "pope": pope,
           "mme": mme, "sqa": scienceqa, "mmbench": mmbench,
           "mmbench_cn": lambda r: mmbench(r, "mmbench_cn", "mmbench_dev_cn_20231003"), "mmvet": mmvet, "seed": seed,
           "vizwiz": vizwiz, **{k: (lambda r, k=k: videoqa(r, k)) for k in VIDEO}}


def write_fixtures(root, benchmarks=None) -> Path:
    root = Path(root)
    done = set()
    for name in benchmarks or list(WRITERS):
        fn = WRITERS[name]
        if id(fn) in done:
            continue
        done.add(id(fn))
        fn(root)
    return root
