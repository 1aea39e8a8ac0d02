"""The official side of ``python -m parity qwen`` (parity/qwen.py), run by ``.venv-official-qwen``'s Python
(scripts/official_env.sh qwen: transformers 4.52.4, the release MMTok's Qwen2.5-VL code pins) with nothing of this
repository importable: Hugging Face's own ``Qwen2_5_VLForConditionalGeneration`` and ``AutoProcessor`` on the tiny
folder, the prompt from the folder's chat template (``apply_chat_template``), the ids and pixels from the processor,
then the prefill's logits and ``generate``'s greedy tokens, as the official Qwen2.5-VL examples and lmms-eval's
``qwen2_5_vl`` model run it.

A method other than ``none`` is an adapter with ``QWEN = True`` (``parity/adapters/<name>.py``, loaded here by its
file path): its clone (``method["clone"]``) goes first on the path, ``qwen_before_import(clone)`` runs before the
official code is imported, ``qwen_enable(model, processor, method)`` switches the method on a freshly loaded model
and processor (the official code patches both), ``qwen_record(model, store)`` hooks what the official code selects
(one entry per prefill). Each method gets its own model and processor. A job with ``"fork"`` (an adapter with
``QWEN_FORK = True``: its clone ships its own transformers, IVC-Prune's fork of 4.51.3) puts that folder first on the
path before transformers is imported, and refuses to run if ``transformers`` then resolves anywhere else.

    python parity/official_worker_qwen.py JOB.json OUT.pt
"""

from __future__ import annotations

import json
import os
import sys


def _adapter(name: str):
    """The official half of ``parity/adapters/<name>.py`` (``QWEN = True``), loaded by its file path."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), "adapters", name + ".py")
    if name.startswith("_") or not os.path.isfile(path):
        raise ValueError(f"official qwen worker: no adapter for {name!r}")
    spec = importlib.util.spec_from_file_location(f"parity_adapter_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not getattr(mod, "QWEN", False):
        raise ValueError(f"official qwen worker: the {name} adapter has no Qwen2.5-VL half (QWEN = True)")
    return mod


def run(job: dict) -> dict:
    if job.get("fork"):  # the clone's own transformers replaces this environment's
        sys.path.insert(0, job["fork"])
    import torch
    import transformers as tf

    if job.get("fork"):
        where = os.path.dirname(os.path.realpath(tf.__file__))
        if where != os.path.join(os.path.realpath(job["fork"]), "transformers"):
            raise RuntimeError(f"official qwen worker: transformers resolves to {where}, not the fork in {job['fork']}")
    from PIL import Image

    torch.manual_seed(0)
    dtype = torch.float32 if job["dtype"] == "fp32" else torch.float16
    res = {"versions": {"transformers": tf.__version__, "torch": torch.__version__, "path": tf.__file__}, "runs": []}
    imported: set = set()
    for method in job["methods"]:
        mod = None
        if method["name"] != "none":
            mod = _adapter(method["name"])
            clone = method.get("clone")
            if clone and method["name"] not in imported:
                sys.path.insert(0, clone)
                if hasattr(mod, "qwen_before_import"):
                    mod.qwen_before_import(clone)
                imported.add(method["name"])
        processor = tf.AutoProcessor.from_pretrained(job["model"])
        model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(job["model"], torch_dtype=dtype,
                                                                       attn_implementation="sdpa").eval()
        store: list = []
        handles = []
        if mod is not None:
            mod.qwen_enable(model, processor, method)
            handles = mod.qwen_record(model, store)
        for batch in method.get("batches", job["batches"]):
            cases = [method.get("cases", job["cases"])[c] for c in batch]
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c["question"]}]}],
                add_generation_prompt=True, tokenize=False) for c in cases]
            images = [Image.open(c["image"]).convert("RGB") for c in cases]
            processor.tokenizer.padding_side = "left"
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
            del store[:]
            with torch.inference_mode():
                logits = model(**inputs).logits.float()
                kept = list(store)
                gen = model.generate(**inputs, max_new_tokens=job["max_new_tokens"], do_sample=False)
            width = inputs["input_ids"].shape[1]
            res["runs"].append({"method": method, "batch": batch, "prompts": texts,
                                "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                                "pixel_values": inputs["pixel_values"].float(),
                                "image_grid_thw": inputs["image_grid_thw"], "logits": logits,
                                "tokens": gen[:, width:].tolist(), "kept": kept})
        for h in handles:
            h.remove()
    return res


def main(argv: list[str]) -> int:
    import torch

    if len(argv) != 2:
        print("usage: python parity/official_worker_qwen.py JOB.json OUT.pt", file=sys.stderr)
        return 2
    job = json.load(open(argv[0]))
    if job.get("kind") != "run":
        print(f"official qwen worker: unknown job kind {job.get('kind')!r}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.save(run(job), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
