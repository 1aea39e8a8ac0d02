"""The official side of ``python -m parity llava15`` for an adapter whose official code is **transformers' own Llava
classes** in a fork of transformers (``OFFICIAL["worker"] = "hf"``: IVC-Prune's transformers 4.51.3 fork), run by
``.venv-official-qwen``'s Python (scripts/official_env.sh qwen) with the clone's ``transformers/src`` first on the path
and nothing of this repository importable.

It loads ``LlavaForConditionalGeneration`` from the tiny ``llava-1.5-tiny-hf`` folder in 4.51's key layout
(``parity.llava15.hf_legacy_folder``; every key read, or it refuses) on SDPA, then for each run the adapter switches the method on (``enable``), sets the prompt's image range
(``inputs``) and records the kept indices (``record``); the ids, mask and pixels are the ones our side built (handed
over in ``JOB["inputs"]``: the fork's method is compared, not its processor). Out: the prefill logits, the greedy
tokens, each decode step's two largest logits (``parity/step_logits.py``), the kept indices per stage.

    python parity/official_worker_hf.py JOB.json OUT.pt
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def _adapter(name: str):
    """The official half of ``parity/adapters/<name>.py``, loaded as ``official_worker.py`` loads it (a module of the
    adapters' package, nothing else of this repository importable); ``none`` is the unpruned model."""
    from official_worker import _adapter as load  # this script's folder, first on the path

    return load(name)


def run(job: dict) -> dict:
    import contextlib
    import io

    import torch
    import transformers as tf
    from step_logits import record_top2, stacked  # this script's folder, first on the path

    torch.manual_seed(0)
    dtype = torch.float32 if job["dtype"] == "fp32" else torch.float16
    model, info = tf.LlavaForConditionalGeneration.from_pretrained(job["model"], torch_dtype=dtype,
                                                                   attn_implementation="sdpa", output_loading_info=True)
    model.eval()
    bad = {k: v for k, v in info.items() if v}
    if bad:  # a key the fork did not read would leave random weights: refuse
        raise ValueError(f"official hf worker: the checkpoint does not load cleanly: {bad}")
    data = torch.load(job["inputs"], weights_only=False)
    res = {"versions": {"transformers": tf.__version__, "torch": torch.__version__, "path": tf.__file__},
           "dtypes": {"llm": str(model.language_model.dtype), "tower": str(model.vision_tower.dtype)},
           "runs": [], "handed_over": True}
    for run_job, x in zip(job["runs"], data):
        method = run_job["method"]
        adapter = _adapter(method["name"])
        ids, mask = x["input_ids"], x["attention_mask"]
        pix = x["pixel_values"].to(dtype)
        kept: list = []
        handles = []
        if adapter is not None:
            adapter.enable(model, method)
            adapter.inputs(model, ids, job["image_token_id"])
            handles = adapter.record(model, kept)
        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):  # the fork prints on every forward
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits.float()
            n_prefill = len(kept)
            steps: list = []
            top = record_top2(model, steps)
            gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pix, do_sample=False, num_beams=1,
                                 max_new_tokens=job["max_new_tokens"], pad_token_id=job["pad_token_id"])
            top.remove()
        for h in handles:
            h.remove()
        if adapter is not None:
            adapter.disable(model)
        width = ids.shape[1]
        res["runs"].append({"method": method, "batch": run_job["batch"], "logits": logits,
                            "tokens": gen[:, width:].tolist(), "top2": stacked(steps), "kept": kept[:n_prefill]})
    return res


def main(argv: list[str]) -> int:
    import torch

    if len(argv) != 2:
        print("usage: python parity/official_worker_hf.py JOB.json OUT.pt", file=sys.stderr)
        return 2
    job = json.load(open(argv[0]))
    if job.get("kind") != "run_hf":
        print(f"official hf worker: unknown job kind {job.get('kind')!r}", file=sys.stderr)
        return 2
    root = os.path.realpath(job["official_path"]) if job.get("official_path") else None
    if root is None or not os.path.isdir(os.path.join(root, "transformers")):
        print(f"official hf worker: no transformers/ folder in {root} (the fork's clone)", file=sys.stderr)
        return 2
    sys.path.insert(0, root)
    import transformers

    where = os.path.dirname(os.path.realpath(transformers.__file__))
    if where != os.path.join(root, "transformers"):
        print(f"official hf worker: `transformers` resolves to {where}, not the fork in {root}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.save(run(job), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
