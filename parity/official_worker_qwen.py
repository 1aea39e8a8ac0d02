"""The official side of ``python -m parity qwen`` (parity/qwen.py), run by ``.venv-official-qwen``'s Python
(scripts/official_env.sh qwen: transformers 4.52.4, the release MMTok's Qwen2.5-VL code pins) with nothing of this
repository importable: Hugging Face's own ``Qwen2_5_VLForConditionalGeneration`` and ``AutoProcessor`` on the tiny
folder, the prompt from the folder's chat template (``apply_chat_template``), the ids and pixels from the processor,
then the prefill's logits and ``generate``'s greedy tokens, as the official Qwen2.5-VL examples and lmms-eval's
``qwen2_5_vl`` model run it.

    python parity/official_worker_qwen.py JOB.json OUT.pt
"""

from __future__ import annotations

import json
import os
import sys


def run(job: dict) -> dict:
    import torch
    import transformers as tf
    from PIL import Image

    torch.manual_seed(0)
    dtype = torch.float32 if job["dtype"] == "fp32" else torch.float16
    processor = tf.AutoProcessor.from_pretrained(job["model"])
    model = tf.Qwen2_5_VLForConditionalGeneration.from_pretrained(job["model"], torch_dtype=dtype,
                                                                   attn_implementation="sdpa").eval()
    res = {"versions": {"transformers": tf.__version__, "torch": torch.__version__}, "runs": []}
    for method in job["methods"]:
        if method["name"] != "none":
            raise ValueError(f"official qwen worker: no adapter for {method['name']!r} yet (the unpruned model only)")
        for batch in method.get("batches", job["batches"]):
            cases = [job["cases"][c] for c in batch]
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": c["question"]}]}],
                add_generation_prompt=True, tokenize=False) for c in cases]
            images = [Image.open(c["image"]).convert("RGB") for c in cases]
            processor.tokenizer.padding_side = "left"
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
            with torch.inference_mode():
                logits = model(**inputs).logits.float()
                gen = model.generate(**inputs, max_new_tokens=job["max_new_tokens"], do_sample=False)
            width = inputs["input_ids"].shape[1]
            res["runs"].append({"method": method, "batch": batch, "prompts": texts,
                                "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                                "pixel_values": inputs["pixel_values"].float(),
                                "image_grid_thw": inputs["image_grid_thw"], "logits": logits,
                                "tokens": gen[:, width:].tolist(), "kept": []})
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
