"""lmms-eval hooks of the local task ``vtprune_shapes`` (loaded by lmms-eval from this file's path,
by ``!function utils.<name>`` in the YAML next to it; nothing here imports this repository)."""

import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    # image paths in data/questions.jsonl are relative to this folder
    path = doc["image"] if os.path.isabs(doc["image"]) else os.path.join(HERE, doc["image"])
    with Image.open(path) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def _normalize(text):
    # testbed.evaluate.normalize
    t = text.strip().lower()
    while t.endswith("."):
        t = t[:-1].rstrip()
    return t


def process_results(doc, results):
    return {"accuracy": 100.0 * float(_normalize(results[0]) == _normalize(doc["answer"]))}
