"""Tiny random weights in the official LLaVA layout, and the same weights in the transformers 5 layout we load.

``build(work, official_python)`` writes, under ``work``:

- ``clip/``: a CLIP vision tower as the official code loads it (``CLIPVisionModel.from_pretrained`` of the folder
  named by ``mm_vision_tower``): 112 px, patch 14 (64 patches + [CLS]), 8 layers, so that FlowCut makes adaptive cuts
  (after layers 1 and 3) before its final one (after layer 5); ``preprocessor_config.json`` (CLIP's). The folder is a
  whole ``CLIPModel`` checkpoint (the vision tower plus a tiny text tower :data:`CLIP_TEXT`, ``text_projection``,
  ``visual_projection``, ``logit_scale``, and a byte-level CLIP tokenizer, :func:`write_clip_tokenizer`), as
  ``openai/clip-vit-large-patch14-336`` is: CDPruner's official ``load_text_tower`` loads
  ``CLIPVisionModelWithProjection``, ``CLIPTokenizerFast`` and ``CLIPTextModelWithProjection`` from the same folder
  (our ``relevance="clip"``: ``CLIPModel.from_pretrained``). The vision tensors are the ones a vision-only build
  draws (:class:`Draws` keyed by the tensor's name); the text side comes from draws of its own.
- ``llava-v1.5-tiny/``: the official LLaVA-1.5 checkpoint layout (``LlavaLlamaForCausalLM``, ``model_type
  llava_llama``; ``model.mm_projector.{0,2}`` mlp2x_gelu, select layer -2, ``image_aspect_ratio pad``,
  ``mm_use_im_patch_token False``) with its slow SentencePiece tokenizer (trained by the official worker).
- ``llava-1.5-tiny-hf/``: the same weights mapped by :func:`official_to_hf` to ``LlavaForConditionalGeneration``
  (transformers 5), the tokenizer's ``tokenizer.json`` and the same image processor config.
- ``images/``: PNGs of several sizes and aspect ratios (pad-to-square and resizing exercised).

Every weight is fp16-representable (drawn in float64, rounded to fp16), so the official fp16 load holds the same
values as the fp32 one. The attention projections are drawn with a larger gain than the other layers so that the
[CLS] rows are peaked (FlowCut's entropy-based amounts then differ from layer to layer and from image to image).

Every number here comes from :class:`Draws`: integer draws (SplitMix64 on numpy ``uint64``, keyed by the seed and the
tensor's name) and elementwise IEEE arithmetic (``+ - * /``, ``sqrt``, casts: one correctly rounded result per
element), nothing whose result depends on torch's thread count or on the CPU's SIMD path (``torch.randn``'s vectorised
fill, ``interpolate``, reductions). The images and weights of a seed are therefore the same bytes under any thread
count and on any x86-64 CPU (tests/test_parity_inputs.py pins their digests).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from .jobs import Job, Runner, run_job

#: the tiny architecture (the official config keys; the transformers 5 configs are built from the same values)
TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4, image_size=112,
             patch_size=14, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
             attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0)
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
           initializer_range=0.02, tie_word_embeddings=False)
VOCAB = 400
#: the tiny CLIP text tower of the ``clip/`` folder (a ``CLIPModel``: CDPruner's official text relevance).
#: ``eos_token_id`` 2: the pooling both transformers 4.36 and 5 keep for such configs (the row of the highest id,
#: ``<|endoftext|>``), as ``openai/clip-vit-large-patch14-336``'s config; 32 positions, so that longer questions
#: are cut into several segments by the official code (and ours)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=64,
                 attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
#: the CLIP tokenizer's merges (``merges.txt`` after its ``#version`` line); the vocabulary is the 256 byte symbols,
#: their ``</w>`` forms, these merges' results, ``<|startoftext|>``, ``<|endoftext|>`` (the highest id)
CLIP_MERGES = ["t h", "i n", "th e</w>", "a n", "r e", "i s</w>", "o n", "e r"]
#: the ``built.json`` field that says the ``clip/`` folder holds the text tower (older builds lack it: rebuilt)
CLIP_TEXT_MARK = dict(CLIP_TEXT, merges=len(CLIP_MERGES), version=1)
#: the markers' (``built*.json``) field naming how the weights and images were drawn: a build without it, or with
#: another, is drawn again (:class:`Draws`)
DRAWS_MARK = "splitmix64-irwin-hall-1"

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
OFFICIAL_NAME = "llava-v1.5-tiny"  # the official builder loads a LLaVA model only when the name says 'llava'
HF_NAME = "llava-1.5-tiny-hf"
#: (width, height) of the test images: square, wide, tall, and one the processor shrinks
IMAGE_SIZES = [(112, 112), (160, 96), (90, 140), (224, 200)]

#: the tokenizer's training text: the vicuna_v1 conversation, LLaVA's answer prompts, the questions we ask
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT:",
    "A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT: </s>",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Is there a red circle in the image? Please answer yes or no. Yes No",
    "How many squares are there? 0 1 2 3 4 5 6 7 8 9 10 100 2024",
    "What colour is the large triangle on the left side of the picture?",
    "Describe the scene in detail: a dog, a cat, a table, the sky, blue, green, yellow, white, black.",
    "Which object is closest to the camera? Where is the small blue square? Why is it here?",
]
#: the builds the opt-in parity tests run (``tests/test_parity*.py``, their ``built`` fixtures): seed 0, the one
#: every published figure first came from, and seed 4, on which (with the inputs drawn by torch before
#: :class:`Draws`) PruMerge+ kept every patch of two images (the zero global token) and VisPruner's NeXT [CLS] order
#: parted at T = 128 (docs/parity.md); the exact draws give both seeds other values. Two builds are a sample too:
#: ``python -m parity --seeds`` runs more
PARITY_SEEDS = (0, 4)
PARITY_SEED_IDS = tuple(f"seed{s}" for s in PARITY_SEEDS)

QUESTIONS = [
    "What is in the image?",
    "Is there a red circle in the image? Please answer yes or no.",
    "How many squares are there? Answer the question using a single word or phrase.",
    "Describe the scene in detail.",
]


def official_to_hf(sd: dict, tower_sd: dict) -> dict:
    """The official LLaVA-1.5 state dict (``model.*`` LLaMA + ``model.mm_projector.{0,2}``, ``lm_head``) and the CLIP
    tower's (``vision_model.*``, loaded from ``mm_vision_tower``) as ``LlavaForConditionalGeneration``'s keys in
    transformers 5: ``model.language_model.*``, ``model.vision_tower.*`` (transformers 5's CLIPVisionModel has no
    ``vision_model`` level),
    ``model.multi_modal_projector.linear_{1,2}.*``, ``lm_head.*``. Refuses keys it does not know (a silent drop
    would load random weights)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.mm_projector."):
            idx, rest = k[len("model.mm_projector."):].split(".", 1)
            name = {"0": "linear_1", "2": "linear_2"}.get(idx)
            if name is None:
                raise KeyError(f"{k}: only the mlp2x_gelu projector (Linear, GELU, Linear) is mapped")
            out[f"model.multi_modal_projector.{name}.{rest}"] = v
        elif k.startswith("model.vision_tower.vision_tower.vision_model."):  # checkpoints carrying the tower
            out["model.vision_tower." + k[len("model.vision_tower.vision_tower.vision_model."):]] = v
        elif k.startswith("model.") and k.split(".")[1] in ("embed_tokens", "layers", "norm"):
            out["model.language_model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            out[k] = v
        elif k.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints saved; recomputed at load
            continue
        else:
            raise KeyError(f"{k}: not a key of an official LLaVA-1.5 checkpoint")
    for k, v in tower_sd.items():
        if not k.startswith("vision_model."):
            raise KeyError(f"{k}: not a CLIPVisionModel key")
        out.setdefault("model.vision_tower." + k[len("vision_model."):], v)
    return out


def splitmix64(state: int, n: int) -> np.ndarray:
    """The first ``n`` outputs of SplitMix64 from ``state`` (numpy ``uint64``, arithmetic modulo 2**64)."""
    z = np.uint64(state) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Draws:
    """Seeded random numbers computed exactly: the same values under any torch thread count, on any CPU and any numpy
    release (no numpy generator, whose streams may change between releases). Each draw is keyed by ``(key, name)``:
    its values are SplitMix64 (Steele, Lea and Flood 2014) of the counters 0, 1, ... of a 64-bit start that the
    SHA-256 of ``"<key>/<name>"`` gives, so a tensor's values depend on its name, not on what was drawn before it.

    ``uniform``: 32-bit integers / 2**32 (exact in float64). ``normal``: the Irwin-Hall sum of twelve such uniforms
    minus 6 (mean 0, variance 1, within (-6, 6)), summed as integers, so exact too."""

    def __init__(self, *key):
        self.key = "/".join(str(k) for k in key)

    def words(self, name: str, n: int) -> np.ndarray:
        """``n`` 64-bit words of the draw ``name``."""
        return splitmix64(int.from_bytes(hashlib.sha256(f"{self.key}/{name}".encode()).digest()[:8], "little"), n)

    def _u32(self, name: str, n: int) -> np.ndarray:
        w = self.words(name, (n + 1) // 2)
        return np.stack([w >> np.uint64(32), w & np.uint64(0xFFFFFFFF)], axis=-1).reshape(-1)[:n]

    def uniform(self, name: str, shape) -> np.ndarray:
        """float64 in [0, 1), multiples of 2**-32."""
        n = math.prod(shape)
        return (self._u32(name, n).astype(np.float64) / 2.0 ** 32).reshape(shape)

    def normal(self, name: str, shape) -> np.ndarray:
        """float64, approximately standard normal (module doc of the class)."""
        n = math.prod(shape)
        u = self._u32(name, 12 * n).reshape(n, 12).astype(np.int64)
        total = u[:, 0]
        for j in range(1, 12):  # integer sums: exact in any order
            total = total + u[:, j]
        return ((total - 6 * 2 ** 32).astype(np.float64) / 2.0 ** 32).reshape(shape)


def fp16_values(x: np.ndarray) -> torch.Tensor:
    """float64 values rounded to fp16 (round to nearest even), as an fp32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).astype(np.float16).astype(np.float32))


def _draw(shape, gain: float, draws: Draws, name: str) -> torch.Tensor:
    fan_in = shape[-1] if len(shape) > 1 else 1
    scale = gain / math.sqrt(fan_in) if len(shape) > 1 else gain
    return fp16_values(draws.normal(name, shape) * scale)


def random_state(keys_shapes: dict, draws: Draws, kind: str) -> dict:
    """Seeded random values (:class:`Draws`, one draw per key) for every (key, shape), fp16-representable: norms near
    1, biases small, attention projections with gain 2 in the tower and 1.5 in the LLM (peaked rows), other matrices
    gain 1, embeddings unit scale."""
    out = {}
    for k, shape in sorted(keys_shapes.items()):
        shape = tuple(shape)
        if "norm" in k or "layrnorm" in k or "layernorm" in k:
            base = 1.0 if k.endswith("weight") else 0.0
            out[k] = fp16_values(base + 0.1 * draws.normal(k, shape))
        elif k.endswith("bias"):
            out[k] = fp16_values(0.05 * draws.normal(k, shape))
        elif "embed" in k or "embedding" in k:
            out[k] = _draw(shape, 1.0, draws, k) if len(shape) == 1 else fp16_values(draws.normal(k, shape))
        elif any(p in k for p in ("q_proj", "k_proj")):
            out[k] = _draw(shape, 2.0 if kind == "tower" else 1.5, draws, k)
        else:
            out[k] = _draw(shape, 1.0, draws, k)
    return out


def _save_safetensors(sd: dict, path: Path, dtype=torch.float16) -> None:
    from safetensors.torch import save_file

    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def bilinear(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """``coarse`` (C, h0, w0) resized to (C, h, w) bilinearly with half-pixel centres (as ``interpolate(...,
    mode="bilinear", align_corners=False)``), in float64 elementwise operations only."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        hi = src - i0
        return i0, i1, 1.0 - hi, hi

    y0, y1, ly0, ly1 = axis(coarse.shape[1], h)
    x0, x1, lx0, lx1 = axis(coarse.shape[2], w)
    top = coarse[:, y0][:, :, x0] * lx0 + coarse[:, y0][:, :, x1] * lx1
    bottom = coarse[:, y1][:, :, x0] * lx0 + coarse[:, y1][:, :, x1] * lx1
    return top * ly0[:, None] + bottom * ly1[:, None]


def image_array(seed: int, i: int, w: int, h: int) -> np.ndarray:
    """Image ``i`` of ``seed`` (h, w, 3 uint8): a 6 x 6 grid of random colours resized bilinearly, plus noise
    (:class:`Draws`, exact: the same bytes everywhere)."""
    draws = Draws("image", seed, i, f"{w}x{h}")
    img = bilinear(draws.uniform("coarse", (3, 6, 6)), h, w) + 0.08 * draws.normal("noise", (3, h, w))
    return np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 2, 0).copy()


def write_images(folder: Path, seed: int = 0, sizes=None) -> list[Path]:
    """Smooth random images (:func:`image_array`), one per (width, height) of ``sizes`` (default
    :data:`IMAGE_SIZES`), as PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES if sizes is None else sizes):
        p = folder / f"image{i}_{w}x{h}.png"
        Image.fromarray(image_array(seed, i, w, h)).save(p)
        paths.append(p)
    return paths


def _image_processor_config(size: int | None = None) -> dict:
    s = TOWER["image_size"] if size is None else size
    return {"crop_size": {"height": s, "width": s}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
            "rescale_factor": 1 / 255, "size": {"shortest_edge": s}}


def official_shapes(tower: dict, vocab: int, newline: bool = False) -> tuple[dict, dict]:
    """The shapes of the official checkpoint's keys: (the LLM + the mlp2x_gelu projector [+ ``model.image_newline``]
    in ``LlavaLlamaForCausalLM``'s keys, the CLIP tower in transformers 4.36's ``CLIPVisionModel`` keys
    (``vision_model.*``; 5.x drops that level), position ids left out)."""
    import transformers as tf

    with torch.device("meta"):
        llm = {k: tuple(v.shape) for k, v in
               tf.LlamaForCausalLM(tf.LlamaConfig(**LLM, vocab_size=vocab)).state_dict().items()}
        tower_shapes = {"vision_model." + k: tuple(v.shape) for k, v in
                        tf.CLIPVisionModel(tf.CLIPVisionConfig(**tower)).state_dict().items()
                        if not k.endswith("position_ids")}
    d_v, d = tower["hidden_size"], LLM["hidden_size"]
    llm.update({"model.mm_projector.0.weight": (d, d_v), "model.mm_projector.0.bias": (d,),
                "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,)})
    if newline:
        llm["model.image_newline"] = (d,)
    return llm, tower_shapes


def _bytes_to_unicode() -> dict:
    """GPT-2 / CLIP's reversible byte -> unicode symbol table (256 symbols), as their tokenizers build it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab(merges=None) -> dict:
    """The tiny CLIP vocabulary (token -> id): the 256 byte symbols, their ``</w>`` forms, the results of
    ``merges`` (default :data:`CLIP_MERGES`), then ``<|startoftext|>`` and ``<|endoftext|>`` (the highest id)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in (merges or CLIP_MERGES)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer(folder: Path) -> None:
    """A byte-level CLIP tokenizer (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
    ``special_tokens_map.json``; no ``tokenizer.json``: transformers 4.36's ``CLIPTokenizerFast`` and 5's
    ``CLIPTokenizer`` each build their fast tokenizer from these files)."""
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(special, tokenizer_class="CLIPTokenizer", do_lower_case=True, errors="replace",
             model_max_length=CLIP_TEXT["max_position_embeddings"], add_prefix_space=False), indent=1))


def clip_text_shapes(tower: dict) -> dict:
    """The shapes of a ``CLIPModel``'s keys besides the vision tower's: ``text_model.*`` (:data:`CLIP_TEXT`),
    ``text_projection.weight``, ``visual_projection.weight`` (the keys are the same in transformers 4.36 and 5),
    position ids and ``logit_scale`` left out."""
    import transformers as tf

    cfg = tf.CLIPConfig(text_config=dict(CLIP_TEXT, vocab_size=len(clip_vocab())), vision_config=dict(tower),
                        projection_dim=CLIP_TEXT["projection_dim"])
    with torch.device("meta"):
        sd = tf.CLIPModel(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()
            if not k.startswith("vision_model.") and not k.endswith("position_ids") and k != "logit_scale"}


def _write_tower(clip_dir: Path, tower: dict, tower_shapes: dict, draws: Draws,
                 text_draws: Draws | None = None) -> dict:
    """The CLIP tower folder the official builder loads (fp32 weights, config, image processor config); returns
    its random vision state dict (``vision_model.*``, from ``draws``). With ``text_draws``: a whole ``CLIPModel``
    checkpoint (the same vision tensors; the text tower, ``text_projection``, ``visual_projection`` from
    ``text_draws``; ``logit_scale`` = log(1 / 0.07)) and its CLIP tokenizer."""
    tower_sd = random_state(tower_shapes, draws, "tower")
    if text_draws is None:
        _save_safetensors(tower_sd, clip_dir / "model.safetensors", torch.float32)
        cfg = dict(tower, architectures=["CLIPVisionModel"], model_type="clip_vision_model", torch_dtype="float32")
    else:
        text_sd = random_state(clip_text_shapes(tower), text_draws, "tower")
        text_sd["logit_scale"] = torch.tensor(math.log(1 / 0.07)).half().float()
        _save_safetensors({**tower_sd, **text_sd}, clip_dir / "model.safetensors", torch.float32)
        cfg = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": CLIP_TEXT["projection_dim"],
               "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": "float32",
               "vision_config": dict(tower, model_type="clip_vision_model"),
               "text_config": dict(CLIP_TEXT, vocab_size=len(clip_vocab()), model_type="clip_text_model")}
        write_clip_tokenizer(clip_dir)
    (clip_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(tower["image_size"]),
                                                                  indent=1))
    return tower_sd


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of folder ``src`` copied into ``dst``."""
    import shutil

    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, dst / f.name)


def build(work: Path, official_python: str, seed: int = 0, tower: dict | None = None,
          runner: Runner | None = None) -> dict:
    """Build the three folders and the images (idempotent: a finished build, marked by ``built.json`` with the same
    seed, tower and :data:`DRAWS_MARK`, is reused). Returns the paths. ``tower``: the CLIP tower's config (default :data:`TOWER`, 8 x 8
    patches; :func:`build_for` gives an adapter the 24 x 24 one its official code hard-codes). ``runner``: the
    official tokenizer job's (:mod:`parity.jobs`; always run: its product is the tokenizer folders)."""
    import transformers as tf

    tower = dict(TOWER if tower is None else tower)
    work = Path(work).resolve()
    marker = work / "built.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if (info.get("seed") == seed and info.get("tower", TOWER) == tower and info.get("clip_text") == CLIP_TEXT_MARK
                and info.get("draws") == DRAWS_MARK):
            return info
    clip_dir, off_dir, hf_dir = work / "clip", work / OFFICIAL_NAME, work / HF_NAME
    for d in (clip_dir, off_dir, hf_dir):
        d.mkdir(parents=True, exist_ok=True)
    tok = run_job(Job("tokenizer", official_python, {"kind": "tokenizer", "official_dir": str(off_dir),
                                                     "fast_dir": str(hf_dir), "corpus": CORPUS, "vocab_size": VOCAB},
                      work, outputs=("official_dir", "fast_dir"), resumable=False), runner)
    vocab = tok["vocab_size"]
    llm_shapes, tower_shapes = official_shapes(tower, vocab)
    tower_sd = _write_tower(clip_dir, tower, tower_shapes, Draws("llava-1.5", seed, "tower"),
                            text_draws=Draws("llava-1.5", seed, "clip-text"))
    # the LLM + projector in the official LlavaLlamaForCausalLM keys
    d_v = tower["hidden_size"]
    llm_sd = random_state(llm_shapes, Draws("llava-1.5", seed, "llm"), "llm")
    _save_safetensors(llm_sd, off_dir / "model.safetensors")
    official_cfg = dict(LLM, architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", vocab_size=vocab,
                        bos_token_id=tok["bos"], eos_token_id=tok["eos"], pad_token_id=0, torch_dtype="float16",
                        mm_vision_tower=str(clip_dir), mm_projector_type="mlp2x_gelu", mm_hidden_size=d_v,
                        mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
                        image_aspect_ratio="pad", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                        tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, use_mm_proj=True,
                        tokenizer_model_max_length=2048, tokenizer_padding_side="right", use_cache=True,
                        pretraining_tp=1)
    (off_dir / "config.json").write_text(json.dumps(official_cfg, indent=1))
    # the transformers 5 checkpoint, by our mapping
    tcfg = tf.LlamaConfig(**LLM, vocab_size=vocab, bos_token_id=tok["bos"], eos_token_id=tok["eos"])
    hf_cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**tower), text_config=tcfg,
                            image_token_id=tok["image_piece_id"],
                            projector_hidden_act="gelu", vision_feature_layer=-2,
                            vision_feature_select_strategy="default", multimodal_projector_bias=True)
    model = tf.LlavaForConditionalGeneration(hf_cfg)
    missing, unexpected = model.load_state_dict(official_to_hf(llm_sd, tower_sd), strict=False)
    if missing or unexpected:
        raise KeyError(f"the mapped checkpoint does not fit LlavaForConditionalGeneration: missing {missing}, "
                       f"unexpected {unexpected}")
    model.save_pretrained(hf_dir)
    (hf_dir / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(tower["image_size"]), indent=1))
    images = write_images(work / "images", seed)
    info = {"seed": seed, "tower": tower, "clip": str(clip_dir), "official": str(off_dir), "hf": str(hf_dir),
            "images": [str(p) for p in images], "vocab_size": vocab, "image_token_id": tok["image_piece_id"],
            "clip_text": CLIP_TEXT_MARK, "draws": DRAWS_MARK}
    marker.write_text(json.dumps(info, indent=1))
    return info


def build_for(grid: int | None, work: Path, official_python: str, seed: int = 0, runner: Runner | None = None) -> dict:
    """The tiny LLaVA-1.5 weights for an adapter's patch ``grid`` (its ``GRID``; None or 8: :func:`build` in ``work``;
    24: the NeXT build's 96 px / patch 4 tower, 24 x 24 patches as CLIP-L/336's, in ``work / "grid24"``, for official
    code that hard-codes that grid)."""
    if grid in (None, TOWER["image_size"] // TOWER["patch_size"]):
        return build(work, official_python, seed, runner=runner)
    if grid != NEXT_TOWER["image_size"] // NEXT_TOWER["patch_size"]:
        raise ValueError(f"parity: no tiny tower with a {grid} x {grid} patch grid (8 or 24)")
    return build(Path(work) / f"grid{grid}", official_python, seed, tower=NEXT_TOWER, runner=runner)


# -- LLaVA-NeXT (anyres) ----------------------------------------------------------------------------------------------
#: the NeXT tower: 96 px crops, patch 4 -> a 24 x 24 patch grid per crop (576 patches + [CLS]), as CLIP-L/336's;
#: official FlowCut's NeXT packing (``flowcut/llava_arch.py`` ``restore_image_features_sorted``) hard-codes 24 x 24
NEXT_TOWER = dict(TOWER, image_size=96, patch_size=4)
#: the official ``image_grid_pinpoints`` (multiples of the crop, the shapes of LLaVA-1.6's 336 list), in the official
#: reading (width, height)
NEXT_PINPOINTS = [[96, 192], [192, 96], [192, 192], [96, 288], [288, 96]]
NEXT_OFFICIAL_NAME = "llava-v1.6-tiny"
NEXT_HF_NAME = "llava-next-tiny-hf"
#: (width, height) of the NeXT images: a square one (a tie between the 96x192 and 192x96 pinpoints), a wide one
#: (192x96, unpadded columns), a tall one (96x192), one on the 192x192 grid whose unpadded height 99 * 48 / 176 =
#: 26.999... (float) sits just under an integer (official ``int``: 26 rows kept, transformers' rounding: 28)
NEXT_IMAGE_SIZES = [(96, 96), (160, 96), (90, 140), (176, 99)]


def official_next_to_hf(sd: dict, tower_sd: dict) -> dict:
    """The official LLaVA-NeXT state dict (LLaVA-1.5's keys plus ``model.image_newline``, the ``spatial_unpad``
    row separator) and the CLIP tower's, as ``LlavaNextForConditionalGeneration``'s keys in transformers 5: as
    :func:`official_to_hf`, and ``model.image_newline`` kept under its name. Refuses a checkpoint without
    ``model.image_newline`` (``spatial_unpad`` needs it) and every key it does not know."""
    if "model.image_newline" not in sd:
        raise KeyError("model.image_newline: missing (an official spatial_unpad checkpoint carries it)")
    out = official_to_hf({k: v for k, v in sd.items() if k != "model.image_newline"}, tower_sd)
    out["model.image_newline"] = sd["model.image_newline"]
    return out


def next_hf_config(vocab: int, tok: dict):
    """``LlavaNextConfig`` of the tiny NeXT model; :data:`NEXT_PINPOINTS` unchanged, as transformers' conversion
    script copies the official list."""
    import transformers as tf

    tcfg = tf.LlamaConfig(**LLM, vocab_size=vocab, bos_token_id=tok["bos"], eos_token_id=tok["eos"])
    return tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**NEXT_TOWER), text_config=tcfg,
                              image_token_index=tok["image_piece_id"], projector_hidden_act="gelu",
                              vision_feature_layer=-2, vision_feature_select_strategy="default",
                              multimodal_projector_bias=True,
                              image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS])


def _next_processor_config(pinpoints) -> dict:
    return dict(_image_processor_config(NEXT_TOWER["image_size"]), image_processor_type="LlavaNextImageProcessor",
                image_grid_pinpoints=[list(p) for p in pinpoints], do_pad=True)


def write_hf_next(folder: Path, llm_sd: dict, tower_sd: dict, vocab: int, tok: dict, tokenizer_from: Path) -> None:
    """The transformers 5 NeXT checkpoint by :func:`official_next_to_hf` (weights, config, image processor
    config, the tokenizer files copied from ``tokenizer_from``)."""
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    model = tf.LlavaNextForConditionalGeneration(next_hf_config(vocab, tok))
    missing, unexpected = model.load_state_dict(official_next_to_hf(llm_sd, tower_sd), strict=False)
    if missing or unexpected:
        raise KeyError(f"the mapped checkpoint does not fit LlavaNextForConditionalGeneration: missing {missing}, "
                       f"unexpected {unexpected}")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(_next_processor_config(NEXT_PINPOINTS), indent=1))
    _copy_tokenizer(tokenizer_from, folder)


def build_next(work: Path, official_python: str, seed: int = 0, runner: Runner | None = None) -> dict:
    """The LLaVA-NeXT folders (idempotent, marker ``built-next.json``; older markers without its ``clip_text``
    field or :data:`DRAWS_MARK` are rebuilt): ``clip-next/`` (the 96 px / patch 4 tower, a whole ``CLIPModel`` with the tiny text tower and
    tokenizer as the 1.5 build's ``clip/``: the vision tensors a vision-only build draws, the text side from draws of
    its own; CDPruner's official ``load_text_tower``),
    ``llava-v1.6-tiny/`` (official layout: ``image_aspect_ratio anyres``, ``mm_patch_merge_type spatial_unpad``,
    :data:`NEXT_PINPOINTS`, ``model.image_newline``; the LLaMA, projector and tokenizer of the 1.5 build's sizes,
    the tokenizer the 1.5 build trained), ``llava-next-tiny-hf/`` (by :func:`official_next_to_hf`) and
    ``images-next/``. Runs :func:`build` first (the tokenizer)."""
    work = Path(work).resolve()
    base = build(work, official_python, seed, runner=runner)
    marker = work / "built-next.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("seed") == seed and info.get("clip_text") == CLIP_TEXT_MARK and info.get("draws") == DRAWS_MARK:
            return info
    clip_dir, off_dir, hf_dir = work / "clip-next", work / NEXT_OFFICIAL_NAME, work / NEXT_HF_NAME
    for d in (clip_dir, off_dir):
        d.mkdir(parents=True, exist_ok=True)
    cfg15 = json.loads((Path(base["official"]) / "config.json").read_text())
    tok = {"bos": cfg15["bos_token_id"], "eos": cfg15["eos_token_id"], "image_piece_id": base["image_token_id"]}
    vocab = base["vocab_size"]
    llm_shapes, tower_shapes = official_shapes(NEXT_TOWER, vocab, newline=True)
    tower_sd = _write_tower(clip_dir, NEXT_TOWER, tower_shapes, Draws("llava-next", seed, "tower"),
                            text_draws=Draws("llava-next", seed, "clip-text"))
    llm_sd = random_state(llm_shapes, Draws("llava-next", seed, "llm"), "llm")
    _save_safetensors(llm_sd, off_dir / "model.safetensors")
    official_cfg = dict(cfg15, mm_vision_tower=str(clip_dir), mm_hidden_size=NEXT_TOWER["hidden_size"],
                        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                        image_grid_pinpoints=NEXT_PINPOINTS)
    (off_dir / "config.json").write_text(json.dumps(official_cfg, indent=1))
    _copy_tokenizer(base["official"], off_dir)  # the slow SentencePiece tokenizer the builder loads
    write_hf_next(hf_dir, llm_sd, tower_sd, vocab, tok, Path(base["hf"]))
    images = write_images(work / "images-next", seed, NEXT_IMAGE_SIZES)
    info = {"seed": seed, "clip": str(clip_dir), "official": str(off_dir), "hf": str(hf_dir),
            "images": [str(p) for p in images], "vocab_size": vocab, "image_token_id": base["image_token_id"],
            "eos": tok["eos"], "bos": tok["bos"], "clip_text": CLIP_TEXT_MARK, "draws": DRAWS_MARK}
    marker.write_text(json.dumps(info, indent=1))
    return info
