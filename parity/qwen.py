"""Qwen2.5-VL: Hugging Face's own Qwen classes under the transformers release the official Qwen code pins (4.52.4,
MMTok's ``requirements.txt``; ``.venv-official-qwen``, ``bash scripts/official_env.sh qwen``) beside ours
(transformers 5, :func:`llava.load`) on the same tiny folder, case by case (``python -m parity qwen``).

The folder (``qwen2.5-vl-tiny/``, :func:`build`) is the tiny Qwen2.5-VL of ``llava.models.build_tiny`` (4 LLM layers,
4 ViT blocks, the ChatML word-level tokenizer) saved so that both releases read it the same way:

- ``config.json`` as transformers 5 writes it, plus the fields 4.52 reads: ``rope_scaling`` (``mrope_section``) and
  ``rope_theta`` in ``text_config`` and at the top level, and the text fields at the top level (4.52's
  ``Qwen2_5_VLConfig`` keeps them there); transformers 5 reads ``rope_parameters`` and ignores the rest;
- the tokenizer as ``tokenizer.json`` with ``tokenizer_class`` ``PreTrainedTokenizerFast`` (both releases load the
  one file as it is);
- ``preprocessor_config.json``: ``Qwen2VLImageProcessor`` with Qwen2.5-VL's defaults (``min_pixels`` 56 x 56,
  ``max_pixels`` 12845056, patch 14, merge 2, temporal patch 2, CLIP's mean and std);
- ``chat_template.json``: a ChatML template of ours that writes what Qwen2.5-VL's writes for one user turn with one
  image and a question (the default system turn, ``<|vision_start|><|image_pad|><|vision_end|>`` then the text).

The official side (``parity/official_worker_qwen.py``) builds the prompt with ``apply_chat_template``, the ids and
pixels with ``AutoProcessor`` (4.52's ``Qwen2_5_VLProcessor``: it needs torchvision for its video processor, which
the environment pairs with torch 2.14.1), loads ``Qwen2_5_VLForConditionalGeneration`` on SDPA and runs the
prefill and ``generate``. Ours: :func:`llava.load` of the folder, our processor (``QwenVLProcessor``, the
``qwen2_vl`` template), the same calls. Checks per case: the ids (image pads expanded on both sides), the pixels and
``image_grid_thw`` (prep), then the logits and greedy tokens (unpruned). fp32: logits within 1e-5 (two torch and two
transformers releases: the same arithmetic, not the same kernels); fp16: tokens identical, logits reported.

Qwen3-VL (an adapter with ``QWEN_FAMILY = "qwen3-vl"``: PriorTR's Qwen3-VL code): a second tiny folder
(``qwen3-vl-tiny/``, :data:`FAMILIES`) that transformers 5.1 and 5 read alike (the config and tokenizer as
transformers 5 writes them; Qwen3-VL's image processor defaults with the tiny tower's patch: mean and std 0.5, at
least 65536 pixels), run in ``.venv-official-qwen3`` (``bash scripts/official_env.sh qwen3``: transformers 5.1.0,
the release that runs the repository's own ``qwen3_vl`` model files, which the worker installs under that module
name, as the official ``setup.py develop`` symlinks them) beside ours; its own prep and unpruned rows (cases
"qwen3-vl ...").

Methods (``--method <name>``): an adapter with a Qwen2.5-VL half (``QWEN = True`` in ``parity/adapters/<name>.py``:
the registry of Qwen method rows, :func:`qwen_methods`). Its official half (``qwen_before_import``, ``qwen_enable``,
``qwen_record``) runs in the official worker on the clone (``.official/<name>``), its half of ours
(``ours_qwen(budget, dtype, rt) -> (method, budget, options)``, ``record_ours_qwen(rt, store) -> finish``) here; its
``QWEN_BUDGETS`` in the method's own unit (MMTok: the retain ratio); ``QWEN_FAMILIES`` when its repository has the
code of several Qwen families (PriorTR: Qwen3-VL and Qwen2-VL; IVC-Prune: Qwen2.5-VL and Qwen2-VL), with per-family
settings in ``QWEN_BY_FAMILY`` (:func:`qwen_attr`) and the family in each spec (``"family"``, for its
``qwen_enable``). Each image alone (the official Qwen code is
batch-1). Checks per case (group ``qwen-<name>``): the ids, the kept indices, the logits (fp32 within 1e-5, fp16
reported) and the greedy tokens; the detail reports how far the rows the selection read differ (projected tokens,
vision -> vision rows, text rows). MMTok: ``mmtok_qwen2_5_vl`` beside ours in its Qwen reference mode.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch

from .build import DRAWS_MARK, QUESTIONS, Draws, write_images
from .differ import replay_detail, token_differences, top2
from .jobs import Job, JobFailed, Runner, failed_check, run_job
from .report import Check
from .step_logits import record_top2, stacked

NAME = "qwen2.5-vl-tiny"
#: the families of this part: the tiny folder, ``llava.models.build_tiny``'s name, the marker of a build, the official
#: model class (the worker's), the official environment (``scripts/official_env.sh <env>``)
FAMILIES = {
    "qwen2.5-vl": {"folder": NAME, "tiny": "qwen2.5-vl", "marker": "built-qwen.json",
                   "model_class": "Qwen2_5_VLForConditionalGeneration", "env": "qwen"},
    "qwen3-vl": {"folder": "qwen3-vl-tiny", "tiny": "qwen3-vl", "marker": "built-qwen3.json",
                 "model_class": "Qwen3VLForConditionalGeneration", "env": "qwen3"},
    # no stock model in its environment: its rows run only in the repositories' own transformers (QWEN_FORK jobs)
    "qwen2-vl": {"folder": "qwen2-vl-tiny", "tiny": "qwen2-vl", "marker": "built-qwen2vl.json",
                 "model_class": "Qwen2VLForConditionalGeneration", "env": "qwen2vl", "stock": False},
}
#: the tiny Qwen2-VL's LLM depth here: the official Qwen2-VL rules prune before layers 3, 16 and 22 of 28 (V2Drop) and
#: at layer 2 (VLM-Pruner) without scaling them: 24 layers run every stage
QWEN2VL_LAYERS = 24
#: the method rows' two extra images, larger than the four (16 / 18 / 15 / 56 merged tokens): 90 and 143 merged tokens,
#: over the 64 below which MMTok's official Qwen route keeps an image whole
METHOD_IMAGE_SIZES = [(280, 252), (364, 308)]
WORKER = "official_worker_qwen.py"

#: ours, not Qwen's file: a ChatML template that writes Qwen2.5-VL's prompt for one user turn (image + text)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

#: Qwen2.5-VL's image processor defaults (its ``preprocessor_config.json``)
IMAGE_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
                   "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_rescale": True,
                   "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3}

#: Qwen3-VL's image processor defaults (Qwen3-VL-8B-Instruct's ``preprocessor_config.json``: mean and std 0.5,
#: 65536 to 16777216 pixels), the slow processor's name (both sides resize with PIL) and the tiny tower's patch
QWEN3_IMAGE_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
                         "size": {"shortest_edge": 65536, "longest_edge": 16777216}, "temporal_patch_size": 2,
                         "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                         "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                         "do_convert_rgb": True, "resample": 3}

#: the text fields 4.52's ``Qwen2_5_VLConfig`` reads at the top level
TOP_LEVEL_TEXT = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size", "rms_norm_eps", "max_position_embeddings", "hidden_act", "pad_token_id",
                  "eos_token_id", "bos_token_id")


def legacy_config(cfg: dict) -> dict:
    """``config.json`` as transformers 5 writes it, with the fields transformers 4.52 reads added (module doc)."""
    cfg = json.loads(json.dumps(cfg))
    tc = cfg["text_config"]
    rope = tc["rope_parameters"]
    legacy = {"type": "default", "rope_type": "default", "mrope_section": list(rope["mrope_section"])}
    tc["rope_scaling"], tc["rope_theta"] = legacy, rope["rope_theta"]
    cfg["rope_scaling"], cfg["rope_theta"] = dict(legacy), rope["rope_theta"]
    for k in TOP_LEVEL_TEXT:
        cfg.setdefault(k, tc[k])
    return cfg


def exact_weights(model, draws: Draws) -> None:
    """Every weight of ``model`` that its initialisation drew at random (one not constant) drawn again exactly:
    :class:`parity.build.Draws` normal values times the config's ``initializer_range`` (the standard deviation
    transformers draws them with), rounded once to fp32; the constant ones (norms' ones, biases' zeros) kept. The
    initialisation's own draws (``torch.nn.init.normal_``) take a vectorised path on some CPUs and another on others."""
    std = model.config.get_text_config().initializer_range
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if not p.is_floating_point() or (p.numel() > 1 and bool((p == p.reshape(-1)[0]).all())):
                continue
            p.copy_(torch.from_numpy((draws.normal(name, tuple(p.shape)) * std).astype("float32")))


def build(work: Path, seed: int = 0, family: str = "qwen2.5-vl") -> dict:
    """The tiny folder of ``family`` (:data:`FAMILIES`) and the images in ``work`` (idempotent: its marker with the
    same seed and :data:`parity.build.DRAWS_MARK` is reused). The structure, config and tokenizer are
    ``llava.models.build_tiny``'s, the weights :func:`exact_weights` (the same values on every machine)."""
    from llava.models import build_tiny

    fam = FAMILIES[family]
    work = Path(work).resolve()
    marker = work / fam["marker"]
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("seed") == seed and info.get("draws") == DRAWS_MARK:
            if "method_images" not in info:  # a folder built before the method rows
                info["method_images"] = [str(p) for p in write_images(work / "images-methods", seed,
                                                                      METHOD_IMAGE_SIZES)]
                marker.write_text(json.dumps(info, indent=1))
            info.setdefault("family", family)
            return info
    out = work / fam["folder"]
    out.mkdir(parents=True, exist_ok=True)
    rt = build_tiny(fam["tiny"], seed=seed)
    model = rt.model
    if family == "qwen2-vl":  # deeper: the official stage layers are not scaled (QWEN2VL_LAYERS)
        import copy

        import transformers as tf

        cfg = copy.deepcopy(model.config)
        cfg.text_config.num_hidden_layers = QWEN2VL_LAYERS
        if getattr(cfg.text_config, "layer_types", None) is not None:
            cfg.text_config.layer_types = ["full_attention"] * QWEN2VL_LAYERS
        model = tf.Qwen2VLForConditionalGeneration(cfg).eval()
        model.generation_config = rt.model.generation_config
    exact_weights(model, Draws(family, seed))
    model.save_pretrained(out)
    rt.processor.tokenizer.save_pretrained(out)
    if family in ("qwen2.5-vl", "qwen2-vl"):
        cfg = legacy_config(json.loads((out / "config.json").read_text()))
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        tok = json.loads((out / "tokenizer_config.json").read_text())
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok["additional_special_tokens"] = tok.pop("extra_special_tokens", [])
        tok.pop("backend", None)
        (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
        ip = IMAGE_PROCESSOR
        if family == "qwen2-vl":  # 4.45 reads the text fields at the top level only (as folder_451)
            cfg = json.loads((out / "config.json").read_text())
            cfg.pop("text_config", None)
            (out / "config.json").write_text(json.dumps(cfg, indent=1))
            ip = {**IMAGE_PROCESSOR, "processor_class": "Qwen2VLProcessor"}
    else:  # transformers 5.1 reads transformers 5's config and tokenizer files as they are
        ip = {**QWEN3_IMAGE_PROCESSOR, "patch_size": rt.model.config.vision_config.patch_size}
    (out / "preprocessor_config.json").write_text(json.dumps(ip, indent=1))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=1))
    images = write_images(work / "images", seed)
    large = write_images(work / "images-methods", seed, METHOD_IMAGE_SIZES)
    info = {"seed": seed, "family": family, "model": str(out), "images": [str(p) for p in images],
            "method_images": [str(p) for p in large],
            "eos": rt.processor.tokenizer.eos_token_id, "draws": DRAWS_MARK}
    marker.write_text(json.dumps(info, indent=1))
    return info


def cases(info: dict) -> list[dict]:
    return [{"question": q, "image": img} for q, img in zip(QUESTIONS, info["images"])]


def method_cases(info: dict) -> list[dict]:
    """A method's cases: the four images and questions, then the two larger images with the first two questions."""
    return cases(info) + [{"question": QUESTIONS[i % len(QUESTIONS)], "image": img}
                          for i, img in enumerate(info.get("method_images", []))]


def batches(n: int) -> list[list[int]]:
    """Each image alone, then all in one left-padded batch (unequal images: unequal grids and prompt lengths)."""
    return [[i] for i in range(n)] + [list(range(n))]


def qwen_methods() -> list[str]:
    """The methods ``python -m parity qwen`` compares beside their official Qwen code: the adapters with
    ``QWEN = True`` (the registry of Qwen method rows; ``none``, the unpruned model, always)."""
    from . import adapters

    return sorted(n for n in adapters.names() if getattr(adapters.get(n), "QWEN", False))


def family_of(name: str) -> str:
    """The (first) family a Qwen adapter's official code runs (``QWEN_FAMILY``; Qwen2.5-VL unless it says otherwise)."""
    from . import adapters

    return getattr(adapters.get(name), "QWEN_FAMILY", "qwen2.5-vl")


def families_of(name: str) -> tuple[str, ...]:
    """Every family whose official code the adapter runs: ``QWEN_FAMILIES`` (PriorTR: its Qwen3-VL and Qwen2-VL
    folders), else its one :func:`family_of`."""
    from . import adapters

    return tuple(getattr(adapters.get(name), "QWEN_FAMILIES", None) or (family_of(name),))


def qwen_attr(name: str, attr: str, family: str | None = None, default=None):
    """An adapter's Qwen setting (``QWEN_ROOT``, ``QWEN_VENDORED``, ``QWEN_ENV``, ``QWEN_FORK``) for ``family``: its
    ``QWEN_BY_FAMILY[family]`` entry where it has one, else the module's own."""
    from . import adapters

    mod = adapters.get(name)
    per = (getattr(mod, "QWEN_BY_FAMILY", None) or {}).get(family or family_of(name), {})
    return per[attr] if attr in per else getattr(mod, attr, default)


def vendored(name: str, clone: str, family: str | None = None) -> dict | None:
    """An adapter whose official code replaces one of transformers' model folders by its own copy (``QWEN_VENDORED
    = (module, folder in the clone's Qwen folder)``: PriorTR's ``transformers.models.qwen3_vl`` from
    ``image/Qwen3-VL/qwen3``), as
    the worker installs it: ``{"module", "path"}``; None for the others (``family``: the adapter's setting for it)."""
    v = qwen_attr(name, "QWEN_VENDORED", family)
    return None if v is None else {"module": v[0], "path": str(Path(clone) / v[1])}


def method_specs(names, info: dict | None, budgets=None, official_path: str | None = None,
                 family: str | None = None) -> list[dict]:
    """The job's method specs: ``none`` (each image alone and all in one batch), then each method of ``names`` at
    each budget (``budgets``, else its adapter's ``QWEN_BUDGETS``) on :func:`method_cases`, each image alone, with its
    clone (the clone ``python -m parity llava15`` uses: ``official_path``, else ``.official/<name>``; an adapter with
    ``QWEN_ROOT``: that folder of the repository, its Qwen code's). ``info`` None:
    only checks the names and clones. ``family``: only its methods (:func:`family_of`); None: all."""
    from . import adapters
    from .llava15 import clone_for

    known = qwen_methods()
    specs = [{"name": "none"}]
    for name in names:
        if name == "none" or (family is not None and name in known and family not in families_of(name)):
            continue
        if name not in known:
            raise ValueError(f"no Qwen2.5-VL parity adapter for {name!r} (adapters with QWEN = True: "
                             f"{', '.join(known) or 'none'})")
        clone = clone_for(name, official_path)
        sub = qwen_attr(name, "QWEN_ROOT", family)
        if sub is not None and clone is not None:  # its Qwen code lives in another folder of the repository
            root = getattr(adapters.get(name), "ROOT", "").strip("/")
            base = clone[: -len(root)].rstrip("/") if root and clone.endswith(root) else clone
            clone = str(Path(base) / sub)
            if not Path(clone).is_dir():
                raise ValueError(f"{name}: the clone has no {sub}/ (its Qwen code)")
        cs = method_cases(info) if info is not None else []
        for b in budgets or adapters.get(name).QWEN_BUDGETS:
            spec = {"name": name, "budget": b, "clone": clone, "cases": cs, "batches": [[i] for i in range(len(cs))]}
            if len(families_of(name)) > 1:  # which of its folders the official side runs (the adapter's switch)
                spec["family"] = family or family_of(name)
            specs.append(spec)
    return specs


def folder_451(info: dict, work: Path) -> str:
    """The tiny folder as transformers 4.51 reads it (``qwen2.5-vl-tiny-4.51/``, IVC-Prune's fork): the same files, the
    config without ``text_config`` (4.51's ``Qwen2_5_VLConfig`` has no such sub-config and would keep it a plain dict,
    which its generation config cannot read; it reads the text fields at the top level, which :func:`legacy_config`
    writes). Written once per build."""
    import shutil

    src, dst = Path(info["model"]), work / f"{NAME}-4.51"
    if not (dst / "config.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, dst / f.name)
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("text_config", None)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(dst)


def official_job(info: dict, python: str, dtype: str, methods: list[dict], max_new_tokens: int, work: Path,
                 fork: str | None = None) -> Job:
    """The Qwen worker's job for ``methods`` in ``dtype`` (``fork``: a clone's own transformers, first on the path)."""
    from . import adapters

    family = info.get("family", "qwen2.5-vl")
    # IVC-Prune's fork reads the Qwen2.5-VL folder as 4.51 does; the Qwen2-VL folder is written for 4.45 already
    model = folder_451(info, work) if fork and family == "qwen2.5-vl" else info["model"]
    vend = next((v for m in methods if m["name"] != "none" and (v := vendored(m["name"], m["clone"], family))), None)
    job = {"kind": "run", "model": model, "dtype": dtype, "cases": cases(info),
           "batches": batches(len(info["images"])), "methods": methods, "max_new_tokens": max_new_tokens,
           "fork": fork, "model_class": FAMILIES[family]["model_class"], "vendored": vend,
           # an official copy whose M-RoPE positions only generate() computes (transformers 4.45.0.dev0's Qwen2-VL,
           # ``QWEN_POSITIONS_FROM_GENERATE``): the worker hands its forward the positions generate() would
           "positions_from_generate": any(getattr(adapters.get(m["name"]), "QWEN_POSITIONS_FROM_GENERATE", False)
                                          for m in methods if m["name"] != "none"),
           # an official copy whose Qwen2-VL tower attends a batch's images in one masked SDPA call
           # (``QWEN_BATCHED_TOWER``, 4.45): each unpruned batch again with that call split by image
           "tower_per_image": any(getattr(adapters.get(m["name"]), "QWEN_BATCHED_TOWER", False)
                                  for m in methods if m["name"] != "none")}
    name = (f"qwen-{dtype}-" + ("" if family == "qwen2.5-vl" else f"{family}-") + ("fork-" if fork else "")
            + "-".join(m["name"] + str(m.get("budget", "")) for m in methods))
    return Job(name, python, job, Path(work), worker=WORKER)


def official(info: dict, python: str, dtype: str, methods: list[dict], max_new_tokens: int, work: Path,
             fork: str | None = None, runner: Runner | None = None) -> dict:
    """:func:`official_job`'s output (run now, or resumed)."""
    return run_job(official_job(info, python, dtype, methods, max_new_tokens, work, fork), runner)


def ours(info: dict, dtype: str, methods: list[dict], max_new_tokens: int) -> list[dict]:
    import llava

    from . import adapters

    rt = llava.load(info["model"], dtype="float16" if dtype == "fp16" else "float32", attn_implementation="sdpa")
    out = []
    for method in methods:
        mod = None
        if method["name"] == "none":
            rt.unprune()
        else:
            mod = adapters.get(method["name"])
            name, budget, options = mod.ours_qwen(method["budget"], dtype, rt)
            rt.prune(name, budget, **options)
        for batch in method.get("batches", batches(len(info["images"]))):
            cs = [method.get("cases", cases(info))[c] for c in batch]
            inputs = rt.processor([c["question"] for c in cs], [c["image"] for c in cs])
            kept: list = []
            finish = mod.record_ours_qwen(rt, kept) if mod is not None else None
            with torch.inference_mode():
                logits = rt.model(**inputs).logits.float()
                if finish is not None:
                    finish(len(batch))
                steps: list = []
                hook = record_top2(rt.model, steps)
                gen = rt.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                hook.remove()
            width = inputs["input_ids"].shape[1]
            out.append({"method": method, "batch": batch, "input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"], "pixel_values": inputs["pixel_values"].float(),
                        "image_grid_thw": inputs["image_grid_thw"], "logits": logits,
                        "tokens": gen[:, width:].tolist(), "top2": stacked(steps), "kept": kept})
    rt.unprune(detach=True)
    return out


def _strip(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def _diff(a, b) -> float | None:
    """Max abs difference of two rows tensors (inf: other shapes; None: one side did not read them, e.g. our MMTok
    reads no text when it keeps the image whole)."""
    if a is None or b is None:
        return None
    return (a - b).abs().max().item() if a.shape == b.shape else float("inf")


def _fmt(d: float | None) -> str:
    return "-" if d is None else f"{d:.2e}"


def tokens(o: dict, m: dict, eos: int | None, dtype: str) -> tuple[bool, str, dict]:
    """The greedy tokens of one run, both cut at the end of sequence: (identical, the detail's words, the data); where
    they part, each such sample's first differing step with both sides' top-2 logits and the tie verdict in ``dtype``
    (:mod:`parity.differ`)."""
    off_tokens = [_strip(t, eos) for t in o["tokens"]]
    my_tokens = [_strip(t, eos) for t in m["tokens"]]
    data = {"official_tokens": off_tokens, "our_tokens": my_tokens}
    if off_tokens == my_tokens:
        return True, "greedy tokens identical", data
    clauses, data["first_difference"] = token_differences(
        o["batch"], off_tokens, my_tokens, lambda r, j: top2(o.get("top2"), len(o["tokens"][r]), r, j),
        lambda r, j: top2(m.get("top2"), len(m["tokens"][r]), r, j), dtype)
    return False, f"greedy tokens DIFFER ({clauses})", data


def compare_method(o: dict, m: dict, case: str, logits_atol: float | None, eos: int | None, dtype: str) -> Check:
    """One method run (each image alone): ids, the kept indices, the logits of the pruned sequence (both sides run
    the LLM on the kept tokens only: the same length when the same count is kept), the greedy tokens (:func:`tokens`),
    the text rows (identical, where both sides read them); the other rows the selections read (the tower's and the
    projector's outputs: two torch releases' kernels), reported; where the adapter has a ``qwen_replay``, our
    selection on the official side's recorded rows and its verdict (:func:`parity.differ.replay_detail`)."""
    ids_ok = o["input_ids"].tolist() == m["input_ids"].tolist()
    o_kept, m_kept = [k["kept"].tolist() for k in o["kept"]], [k["kept"].tolist() for k in m["kept"]]
    kept_ok = len(o_kept) == len(m_kept) > 0 and o_kept == m_kept
    worst = _diff(o["logits"], m["logits"])
    tok_ok, tok_detail, data = tokens(o, m, eos, dtype)
    ok = ids_ok and kept_ok and tok_ok and (logits_atol is None or worst <= logits_atol)
    rows = {}
    for f in ("features", "vision", "text", "values", "attention"):
        ds = [d for a, b in zip(o["kept"], m["kept"]) if (d := _diff(a.get(f), b.get(f))) is not None]
        rows[f] = max(ds) if ds else None
    # the text rows are rows of the same embedding table on both sides: identical, where both read them
    text_ok = rows["text"] is None or rows["text"] == 0
    ok = ok and text_ok
    # the adapter's replay: our selection on the official side's own rows (the method's arithmetic alone)
    from . import adapters

    replay = getattr(adapters.get(o["method"]["name"]), "qwen_replay", None)
    replay_ok = None
    if replay is not None and o["kept"]:
        replay_ok = all(replay(e).tolist() == e["kept"].tolist() for e in o["kept"])
        ok = ok and replay_ok
    counts = [f"{len(k)} of {int(e['n']) if 'n' in e else int(e['features'].shape[0])}"
              for k, e in zip(o_kept, o["kept"])]
    detail = (("" if ids_ok else "ids DIFFER, ") + f"kept indices {'identical' if kept_ok else 'DIFFER'} "
              f"({', '.join(counts)} kept), logits max abs diff {worst:.2e}"
              + (f" (bound {logits_atol:g})" if logits_atol is not None else "")
              + f", {tok_detail}; rows read, max abs diff: projected "
              f"{_fmt(rows['features'])}, vision-vision {_fmt(rows['vision'])}, text {_fmt(rows['text'])}"
              + ("" if rows["values"] is None else f", layer K-1 values {_fmt(rows['values'])}")
              + ("" if rows["attention"] is None else f", layer K-1 attention {_fmt(rows['attention'])}")
              + ("" if replay_ok is None else f"; {replay_detail(kept_ok, replay_ok)}"))
    return Check("qwen-" + o["method"]["name"], case, ok, detail,
                 {"official_kept": o_kept, "our_kept": m_kept, **data, "rows_max_abs_diff": rows,
                  "replay_on_official_rows": replay_ok})


def compare(off: dict, mine: list[dict], dtype: str, logits_atol: float | None, eos: int | None) -> list[Check]:
    """One prep and one unpruned check per batch: ids (pads and image pads included: both sides left-pad and expand
    the image pads), pixels and grids, then the logits at the real positions and the greedy tokens; a method run:
    :func:`compare_method`."""
    checks = []
    if len(off["runs"]) != len(mine):
        raise ValueError(f"runs out of step: {len(off['runs'])} official, {len(mine)} ours")
    for o, m in zip(off["runs"], mine):
        if o["batch"] != m["batch"] or o["method"] != m["method"]:
            raise ValueError(f"runs out of step: official {o['method']} {o['batch']}, ours {m['method']} {m['batch']}")
        case = f"{dtype} {o['method']['name']} batch {o['batch']}"
        if o["method"]["name"] != "none":
            r = o["method"].get("budget")
            checks.append(compare_method(o, m, f"{dtype} {o['method']['name']}" + ("" if r is None else f" r={r}")
                                         + f" batch {o['batch']}", logits_atol, eos, dtype))
            continue
        ids_ok = o["input_ids"].tolist() == m["input_ids"].tolist() and \
            o["attention_mask"].tolist() == m["attention_mask"].tolist()
        grid_ok = o["image_grid_thw"].tolist() == m["image_grid_thw"].tolist()
        same = o["pixel_values"].shape == m["pixel_values"].shape
        pix = (o["pixel_values"] - m["pixel_values"]).abs().max().item() if same else float("inf")
        checks.append(Check("prep", case, ids_ok and grid_ok and pix == 0,
                            f"ids {'identical' if ids_ok else 'DIFFER'}, image_grid_thw "
                            f"{'identical' if grid_ok else 'DIFFER'}, pixels max abs diff {pix:.3g}",
                            {"official_ids": o["input_ids"].tolist(), "our_ids": m["input_ids"].tolist()}))
        mask = m["attention_mask"].bool()
        worst = _real_rows_diff(o["logits"], m["logits"], mask)
        tok_ok, tok_detail, data = tokens(o, m, eos, dtype)
        ok = tok_ok and (logits_atol is None or worst <= logits_atol)
        detail = f"logits max abs diff {worst:.2e}" + (f" (bound {logits_atol:g})" if logits_atol is not None else "")
        if "tower_per_image" in o:
            clause, data["tower_per_image"] = tower_per_image_detail(o, m, eos, dtype)
            tok_detail += f"; {clause}"
        checks.append(Check("unpruned", case, ok, f"{detail}, {tok_detail}", data))
    return checks


def _real_rows_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference of two batches' logits at the real (unpadded) positions (inf: other shapes)."""
    if a.shape != b.shape:
        return float("inf")
    return max((a[i][mask[i]] - b[i][mask[i]]).abs().max().item() for i in range(mask.shape[0]))


def tower_per_image_detail(o: dict, m: dict, eos: int | None, dtype: str) -> tuple[str, dict]:
    """The official batch run again with its Qwen2-VL tower attending one image at a time (``o["tower_per_image"]``:
    the worker's :func:`tower_per_image`, as transformers 4.57 and 5 attend) against ours: the clause and the data.
    Informational: the row's verdict stays the official code's own; this says whether the batched tower's masked
    attention call is the whole difference (logits identical) or not."""
    split = dict(o, **o["tower_per_image"])
    worst = _real_rows_diff(split["logits"], m["logits"], m["attention_mask"].bool())
    same, words, data = tokens(split, m, eos, dtype)
    data = {"logits_max_abs_diff": worst, "tokens_identical": same, **data}
    return f"official with its tower one image at a time: logits max abs diff {worst:.2e}, {words}", data


def env_of(name: str, family: str) -> str:
    """The official environment a method's rows run in: its adapter's ``QWEN_ENV`` (CLSE's Qwen2-VL copy of
    transformers 4.57.6), else its family's (:data:`FAMILIES`)."""
    return qwen_attr(name, "QWEN_ENV", family) or FAMILIES[family]["env"]


def run(info: dict, python: str | dict, work: Path, dtypes=("fp32", "fp16"), max_new_tokens: int = 8, methods=(),
        budgets=None, official_path: str | None = None, runner: Runner | None = None) -> list[Check]:
    """The unpruned model of ``info``'s family, then each method of ``methods`` (:func:`qwen_methods`) of that family
    at its budgets, in each precision. Cases of a family other than Qwen2.5-VL are named with it. ``python``: the
    official environment's interpreter, or one per environment name (:func:`env_of`). ``runner``: the official jobs'
    (:class:`parity.jobs.Runner`; default one of its own); a failed job is one failing check."""
    checks: list[Check] = []
    family = info.get("family", "qwen2.5-vl")
    methods = method_specs(methods, info, budgets, official_path, family=family)
    # an adapter whose clone ships its own transformers (QWEN_FORK): a job of its own with the fork first on the path,
    # its unpruned rows too (named "fork"), the fork's model beside ours
    forks: dict = {}
    stock = [m for m in methods if m["name"] == "none" or not qwen_attr(m["name"], "QWEN_FORK", family, False)]
    for m in methods:
        if m not in stock:
            forks.setdefault(m["clone"], [{"name": "none"}]).append(m)
    jobs = [(None, stock), *forks.items()]
    if not FAMILIES[family].get("stock", True) and len(stock) == 1:  # no stock model and no method on one here
        jobs = jobs[1:]
    with (nullcontext(runner) if runner else Runner()) as runner:
        # every official job first (run on the runner's threads while ours run here), then each in turn
        plan = []
        for dtype in dtypes:
            for fork, group in jobs:
                env = env_of(next((m["name"] for m in group if m["name"] != "none"), "none"), family) \
                    if any(m["name"] != "none" for m in group) else FAMILIES[family]["env"]
                py = python[env] if isinstance(python, dict) else python
                job = official_job(info, py, dtype, group, max_new_tokens, work, fork=fork)
                plan.append((dtype, fork, group, runner.submit(job)))
        for dtype, fork, group, future in plan:
            prefix = ("" if family == "qwen2.5-vl" else f"{family} ") + ("fork " if fork else "")
            try:
                if future.done():
                    future.result()  # a job that failed already: ours is not run for it
                mine = ours(info, dtype, group, max_new_tokens)
                off = future.result()
            except JobFailed as e:
                checks.append(failed_check(f"{prefix}{dtype} qwen " + " ".join(sorted({m["name"] for m in group})),
                                           e))
                continue
            for c in compare(off, mine, dtype, 1e-5 if dtype == "fp32" else None, info.get("eos")):
                c.case = prefix + c.case
                checks.append(c)
    return checks
