"""The official side of ``python -m parity``: runs in ``.venv-official`` (scripts/official_env.sh: transformers 4.36.2,
llava-torch 1.2.2.post1, flowcut 1.0.2), started as a script (``python parity/official_worker.py JOB OUT``) so that
nothing of this repository is importable here: ``import llava`` is the official package. Plain functions over the
official API (``load_pretrained_model``, ``process_images``, ``conv_templates``, ``tokenizer_image_token``,
``flowcut.flowcut``, the ``llava/eval`` scorers); the results go to ``OUT`` (``torch.save``), read by our side.

Jobs (``JOB`` is a JSON file, ``{"kind": ..., ...}``):

- ``tokenizer``: train a tiny SentencePiece model (BPE, LLaMA's special ids unk 0 / bos 1 / eos 2, ``<image>`` a
  user-defined piece so that our side has an image token without growing the vocabulary; the official side never
  tokenizes it: ``tokenizer_image_token`` splits the prompt at it) on the given corpus and save it as the official
  ``LlamaTokenizer`` (slow, what the builder loads: ``use_fast=False``) plus its ``tokenizer.json`` as 4.36's
  converter writes it (what transformers 5 loads).
- ``run``: load the model with the official builder in the given precision, then for each method (``none``, or an
  adapter's name with a budget: ``parity/adapters/<name>.py``, loaded here by its file path; its ``enable`` switches
  the method on, its ``record`` hooks read the kept indices) and each batch of cases: the official prompt, ids and
  pixels, the prefill logits, the greedy tokens, the kept indices per stage, and the sequence length entering each
  decoder layer, and each decode step's two largest logits (``top2``, ``parity/step_logits.py``). A method may name its own ``batches`` and ``padding_side`` (FlowCut on LLaVA-NeXT: each image
  alone, "right": its LLM stage refuses "left"). With ``official_path`` (a clone of an official repository) first
  on the path: its ``llava/`` replaces the installed one (refused if ``llava`` then resolves elsewhere).

The official scorers run in their own worker, ``parity/official_scorers.py``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")


def train_tokenizer(job: dict) -> dict:
    import sentencepiece as spm
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    out = job["official_dir"]
    os.makedirs(out, exist_ok=True)
    corpus = os.path.join(out, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(job["corpus"]) + "\n")
    prefix = os.path.join(out, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, model_type="bpe", vocab_size=job["vocab_size"], character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<image>"], byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, num_threads=1,
        normalization_rule_name="identity", minloglevel=2)
    os.remove(corpus)
    os.remove(prefix + ".vocab")
    slow = LlamaTokenizer(vocab_file=prefix + ".model", legacy=False)
    slow.save_pretrained(out)
    fast = LlamaTokenizerFast.from_pretrained(out, from_slow=True, legacy=False)
    fast_dir = job["fast_dir"]
    os.makedirs(fast_dir, exist_ok=True)
    fast.save_pretrained(fast_dir)
    return {"vocab_size": len(slow), "image_piece_id": slow.convert_tokens_to_ids("<image>"),
            "bos": slow.bos_token_id, "eos": slow.eos_token_id}


def _fp32(model) -> None:
    """``model.float()`` and LLaMA's RoPE tables rebuilt in fp32: under 4.36 they were computed at load in the
    load dtype (fp16), and ``.float()`` only casts those rounded values."""
    import torch

    model.float()
    for layer in model.model.layers:
        rope = layer.self_attn.rotary_emb
        rope.inv_freq = 1.0 / (rope.base ** (torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim))
        rope._set_cos_sin_cache(rope.max_seq_len_cached, device=rope.inv_freq.device, dtype=torch.float32)


def _prompt(question: str, conv_mode: str, mm_use_im_start_end: bool) -> str:
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    # llava/eval/model_vqa_loader.py: the image placeholder, a newline, the question
    image = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end else DEFAULT_IMAGE_TOKEN
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], image + "\n" + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


#: the name the official side gives ``parity/adapters/`` (loaded by its path: ``parity`` itself is not importable here)
ADAPTERS = "parity_official_adapters"


def adapters_package() -> str:
    """``parity/adapters/`` as the package :data:`ADAPTERS` (its ``__init__`` imports the standard library only), so
    that an adapter's functions import their shared helpers relatively (``from . import _official``)."""
    import importlib.util

    if ADAPTERS not in sys.modules:
        folder = os.path.join(os.path.dirname(os.path.realpath(__file__)), "adapters")
        spec = importlib.util.spec_from_file_location(ADAPTERS, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[ADAPTERS] = mod
        spec.loader.exec_module(mod)
    return os.path.dirname(sys.modules[ADAPTERS].__file__)


def _adapter(name: str):
    """The official half of ``parity/adapters/<name>.py``, a module of :func:`adapters_package` (nothing else of this
    repository is importable here); ``none`` is the unpruned model."""
    import importlib

    if name == "none":
        return None
    folder = adapters_package()
    if name.startswith("_") or not os.path.isfile(os.path.join(folder, name + ".py")):
        known = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
        raise ValueError(f"official worker: no adapter for {name!r} ({', '.join(['none'] + known)})")
    return importlib.import_module(f"{ADAPTERS}.{name}")


def run(job: dict) -> dict:
    import torch
    from PIL import Image
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model
    from step_logits import record_top2, stacked  # this script's folder, first on the path

    torch.manual_seed(0)
    path = job["model"]
    # an adapter whose code reads its switches at load time (environment variables, config fields) sets them first
    for method in job["methods"]:
        adapter = _adapter(method["name"])
        if adapter is not None and hasattr(adapter, "before_load"):
            adapter.before_load(method)
    tokenizer, model, image_processor, _ = load_pretrained_model(path, None, os.path.basename(path.rstrip("/")),
                                                                 device="cpu")
    if job["dtype"] == "fp32":
        _fp32(model)
    model.eval()
    images_dtype = torch.float32 if job["dtype"] == "fp32" else torch.float16
    conv_mode = job.get("conv_mode", "vicuna_v1")
    res = {"dtypes": {"llm": str(model.dtype), "tower": str(model.get_vision_tower().dtype),
                      "projector": str(next(model.get_model().mm_projector.parameters()).dtype)},
           "runs": []}
    for method in job["methods"]:
        adapter = _adapter(method["name"])
        if adapter is not None:
            adapter.enable(model, method)
        for batch in method.get("batches", job["batches"]):
            # the side the official code pads a batch on; FlowCut's NeXT LLM stage refuses "left" ("Not support
            # left padding now."), so its runs name "right" (alone: no padding either way)
            model.config.tokenizer_padding_side = method.get("padding_side", "left")
            cases = [job["cases"][c] for c in batch]
            prompts = [_prompt(c["question"], conv_mode, getattr(model.config, "mm_use_im_start_end", False))
                       for c in cases]
            ids = [tokenizer_image_token(p, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt") for p in prompts]
            pil = [Image.open(c["image"]).convert("RGB") for c in cases]
            pixels = process_images(pil, image_processor, model.config)
            sizes = [im.size for im in pil]
            width = max(len(x) for x in ids)
            input_ids = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for i, x in enumerate(ids):
                input_ids[i, width - len(x):] = x
                mask[i, width - len(x):] = 1
            pix = pixels.to(images_dtype) if torch.is_tensor(pixels) else [p.to(images_dtype) for p in pixels]
            kept: list = []
            handles = adapter.record(model, kept) if adapter is not None else []
            lengths: list = []  # the sequence length entering each decoder layer (prefill and decode)
            handles += [layer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
                        for layer in model.get_model().layers]
            with torch.inference_mode():
                # what the method's own eval script passes besides the LLaVA inputs (e.g. the question's text)
                extra = adapter.inputs(model, tokenizer, cases, prompts, input_ids) \
                    if adapter is not None and hasattr(adapter, "inputs") else {}
                out = model(input_ids=input_ids, attention_mask=mask, images=pix, image_sizes=sizes, **extra)
                n_prefill_kept = len(kept)
                logits = out.logits if hasattr(out, "logits") else out[0]  # FlowCut's NeXT forward: a tuple
                layer_lengths = lengths[:len(model.get_model().layers)]
                steps: list = []
                top = record_top2(model, steps)
                gen = model.generate(input_ids, attention_mask=mask, images=pix, image_sizes=sizes, do_sample=False,
                                     num_beams=1, max_new_tokens=job["max_new_tokens"], use_cache=True,
                                     pad_token_id=tokenizer.unk_token_id, **extra)
                top.remove()
            for h in handles:
                h.remove()
            res["runs"].append({
                "method": method, "batch": batch, "prompts": prompts, "ids": [x.tolist() for x in ids],
                "pixel_values": pix.float() if torch.is_tensor(pix) else [p.float() for p in pix],
                "logits": logits.float(), "mask_len": logits.shape[1],
                "tokens": gen.tolist(), "top2": stacked(steps), "kept": kept[:n_prefill_kept],
                "bos": tokenizer.bos_token_id,
                "layer_lengths": layer_lengths, "image_sizes": sizes})
    return res


def main(argv: list[str]) -> int:
    import torch

    if len(argv) != 2:
        print("usage: python parity/official_worker.py JOB.json OUT.pt", file=sys.stderr)
        return 2
    job = json.load(open(argv[0]))
    kind = job["kind"]
    root = os.path.realpath(job["official_path"]) if job.get("official_path") else None
    if root is not None:
        if not os.path.isdir(root):
            print(f"official worker: no folder {root}", file=sys.stderr)
            return 2
        sys.path.insert(0, root)
    # an adapter that must bridge the clone to this environment before its llava imports (e.g. a fork written for
    # an older transformers: a config name registered twice) does so here
    for method in job.get("methods", []):
        adapter = _adapter(method["name"])
        if adapter is not None and hasattr(adapter, "before_import"):
            adapter.before_import()
    import llava

    # a clone with its own llava/ tree replaces the installed official package; one without (FlowCut's repository,
    # VisionZip's) runs its method package on the installed llava-torch
    expected = os.path.join(root, "llava") if root and os.path.isdir(os.path.join(root, "llava")) else None
    where = os.path.dirname(os.path.realpath(llava.__file__))
    if (expected and where != expected) or (not expected and not where.endswith(os.path.join("site-packages", "llava"))):
        print(f"official worker: `llava` resolves to {where}, not {expected or 'the installed official package'}",
              file=sys.stderr)
        return 2
    fn = {"tokenizer": train_tokenizer, "run": run}.get(kind)
    if fn is None:
        print(f"official worker: unknown job kind {kind!r}", file=sys.stderr)
        return 2
    torch.save(fn(job), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
