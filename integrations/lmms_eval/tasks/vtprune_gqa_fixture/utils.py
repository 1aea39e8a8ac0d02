"""lmms-eval hooks of the local task ``vtprune_gqa_fixture`` (loaded by lmms-eval from this file's path,
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


def process_results(doc, results):
    # GQA's exact match as our harness scores it (eval/scorers/gqa.py: convert_gqa_predictions + score_gqa)
    pred = results[0].strip().rstrip(".").lower()
    return {"gqa_accuracy": 100.0 * float(pred == doc["answer"])}
