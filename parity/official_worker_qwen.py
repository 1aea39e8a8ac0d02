"""The official side of ``python -m parity qwen`` (parity/qwen.py), run by ``.venv-official-qwen``'s Python
(scripts/official_env.sh qwen: transformers 4.52.4, the release MMTok's Qwen2.5-VL code pins) with nothing of this
repository importable: Hugging Face's own ``Qwen2_5_VLForConditionalGeneration`` and ``AutoProcessor`` on the tiny
folder, the prompt from the folder's chat template (``apply_chat_template``), the ids and pixels from the processor,
then the prefill's logits, ``generate``'s greedy tokens and each decode step's two largest logits
(``parity/step_logits.py``), as the official Qwen2.5-VL examples and lmms-eval's
``qwen2_5_vl`` model run it.

A method other than ``none`` is an adapter with ``QWEN = True`` (``parity/adapters/<name>.py``, loaded here by its
file path): its clone (``method["clone"]``) goes first on the path, ``qwen_before_import(clone)`` runs before the
official code is imported, ``qwen_enable(model, processor, method)`` switches the method on a freshly loaded model
and processor (the official code patches both), ``qwen_record(model, store)`` hooks what the official code selects
(one entry per prefill); an optional ``qwen_model_class(transformers)`` names the official model class
the method's model is loaded with (V2Drop's and VLM-Pruner's own ``Qwen2VLForConditionalGeneration``); an
optional ``qwen_inputs(model, inputs)`` returns the keyword arguments the official
``generate`` would add to the prefill (the worker's forward gets them too). Each method gets its own model and
processor. A job with ``"fork"`` (an adapter with ``QWEN_FORK = True``: its clone ships its own transformers,
IVC-Prune's fork of 4.51.3) puts that folder first on the path before transformers is imported, and refuses to run if ``transformers`` then resolves anywhere else. A job
with ``"vendored"`` (``{"module", "path"}``: PriorTR's own ``qwen3_vl`` model files) installs that folder as the
package ``module`` before any model class is read, as the official ``setup.py develop`` symlinks it into
transformers, and refuses to run if the model class then comes from anywhere else. ``"model_class"``: the family's
class (``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``). ``"positions_from_generate"``:
the release computes Qwen's M-RoPE positions only in ``prepare_inputs_for_generation`` (transformers 4.45's Qwen2-VL),
so the worker's forward gets the positions ``generate`` would compute (``get_rope_index``). ``"tower_per_image"``: the
release's Qwen2-VL tower attends every image of a batch in one SDPA call over all their patches with a block-diagonal
mask (transformers 4.45's ``VisionSdpaAttention``; 4.57 and 5 attend one image at a time), so each unpruned batch of
several images runs a second time with that call split by image (:func:`tower_per_image`, nothing else changed) and
its logits, tokens and top-2 go under the run's ``"tower_per_image"``: what the row would be with the other release's
split, the one difference between the two (docs/parity.md, Qwen2-VL).

    python parity/official_worker_qwen.py JOB.json OUT.pt
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager


def _adapter(name: str):
    """The official half of ``parity/adapters/<name>.py`` (``QWEN = True``), loaded as ``official_worker.py`` loads it
    (a module of the adapters' package, so its helpers import relatively; nothing else of this repository)."""
    from official_worker import _adapter as load  # this script's folder, first on the path

    mod = load(name)
    if not getattr(mod, "QWEN", False):
        raise ValueError(f"official qwen worker: the {name} adapter has no Qwen half (QWEN = True)")
    return mod


def _install_vendored(module: str, path: str) -> None:
    """``path`` (a model folder with ``__init__.py``, relative imports into transformers) imported as ``module``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    spec.loader.exec_module(mod)


@contextmanager
def tower_per_image(tower):
    """While ``tower`` (a Qwen2-VL vision tower, called with ``grid_thw``) runs, an SDPA call over all its images'
    patches with their block-diagonal boolean mask becomes one unmasked call per image (the mask's blocks, one per
    temporal slice of each image), the outputs concatenated back; every other call (the language model's, a single
    image's) runs unchanged. A mask that is not exactly those blocks is refused."""
    import torch
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    lengths: list[int] = []
    calls = [0]

    def per_image(query, key, value, attn_mask=None, *args, **kwargs):
        n = query.shape[-2]
        if not lengths or len(lengths) < 2 or attn_mask is None or attn_mask.dtype != torch.bool:
            return real(query, key, value, attn_mask, *args, **kwargs)
        blocks = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool) for k in lengths]).to(attn_mask.device)
        if sum(lengths) != n or attn_mask.shape[-2:] != (n, n) or not bool((attn_mask == blocks).all()):
            raise RuntimeError("tower_per_image: the tower's mask is not the images' block-diagonal mask")
        calls[0] += 1
        return torch.cat([real(q, k, v, None, *args, **kwargs) for q, k, v in
                          zip(query.split(lengths, -2), key.split(lengths, -2), value.split(lengths, -2))], dim=-2)

    def enter(module, args, kwargs):
        grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]
        lengths[:] = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).tolist()

    def leave(module, args, output):
        lengths.clear()

    handles = [tower.register_forward_pre_hook(enter, with_kwargs=True), tower.register_forward_hook(leave)]
    F.scaled_dot_product_attention = per_image
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = real
        for h in handles:
            h.remove()
        lengths.clear()


def _prefill_and_generate(model, inputs, extra: dict, store: list, max_new_tokens: int) -> dict:
    """The prefill's logits (``extra``: what the official ``generate`` adds to it), what the method recorded there,
    then ``generate``'s greedy tokens and each step's top two."""
    import torch
    from step_logits import record_top2, stacked  # this script's folder, first on the path

    with torch.inference_mode():
        logits = model(**inputs, **extra).logits.float()
        kept = list(store)
        steps: list = []
        top = record_top2(model, steps)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        top.remove()
    return {"logits": logits, "tokens": gen[:, inputs["input_ids"].shape[1]:].tolist(), "top2": stacked(steps),
            "kept": kept}


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

    cls_name = job.get("model_class", "Qwen2_5_VLForConditionalGeneration")
    vend = job.get("vendored")
    if vend:
        _install_vendored(vend["module"], vend["path"])
        where = os.path.realpath(sys.modules[getattr(tf, cls_name).__module__].__file__)
        if not where.startswith(os.path.realpath(vend["path"]) + os.sep):
            raise RuntimeError(f"official qwen worker: {cls_name} comes from {where}, not {vend['path']}")
    model_cls = getattr(tf, cls_name)
    tf.logging.set_verbosity_error()  # no load progress bars in the job's output
    torch.manual_seed(0)
    dtype = torch.float32 if job["dtype"] == "fp32" else torch.float16
    res = {"versions": {"transformers": tf.__version__, "torch": torch.__version__, "path": tf.__file__,
                        "model": sys.modules[model_cls.__module__].__file__}, "runs": []}
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
        # Qwen3-VL under transformers 5 and the 4.57 releases (fast by default): the slow (PIL) image processor, as
        # ours
        slow = {"use_fast": False} if cls_name.startswith("Qwen3") else {}
        processor = tf.AutoProcessor.from_pretrained(job["model"], **slow)
        if (4, 57) <= tuple(int(x) for x in tf.__version__.split(".")[:2]) < (5, 0):  # its fast image processor
            processor.image_processor = tf.AutoImageProcessor.from_pretrained(job["model"], use_fast=False)
        load_dtype = {"dtype": dtype} if int(tf.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}
        cls = mod.qwen_model_class(tf) if mod is not None and hasattr(mod, "qwen_model_class") else model_cls
        model = cls.from_pretrained(job["model"], attn_implementation="sdpa", **load_dtype).eval()
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
            # what the official generate() hands the prefill and a plain forward lacks (qwen_inputs: PriorTR's range
            # and context), added to the worker's forward
            extra = mod.qwen_inputs(model, inputs) if mod is not None and hasattr(mod, "qwen_inputs") else {}
            if job.get("positions_from_generate"):  # a release whose M-RoPE positions only generate() computes
                extra["position_ids"] = model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], None,
                                                             inputs["attention_mask"])[0]
            out = _prefill_and_generate(model, inputs, extra, store, job["max_new_tokens"])
            entry = {"method": method, "batch": batch, "prompts": texts, "input_ids": inputs["input_ids"],
                     "attention_mask": inputs["attention_mask"], "pixel_values": inputs["pixel_values"].float(),
                     "image_grid_thw": inputs["image_grid_thw"], **out}
            if job.get("tower_per_image") and mod is None and len(batch) > 1:
                with tower_per_image(model.visual) as calls:
                    split = _prefill_and_generate(model, inputs, extra, store, job["max_new_tokens"])
                if not calls[0]:
                    raise RuntimeError("tower_per_image: the tower made no masked call over several images")
                entry["tower_per_image"] = {k: split[k] for k in ("logits", "tokens", "top2")}
            res["runs"].append(entry)
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
