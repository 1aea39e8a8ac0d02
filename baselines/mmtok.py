"""MMTok (ICLR 2026, arXiv 2508.18264, "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs"):
keep the visual tokens that best *cover* both the question's tokens (text -> vision) and the whole visual token
set (vision -> vision), a maximum-coverage problem solved greedily. Pre-LLM, per image (LLaVA-1.5, Qwen2.5-VL) /
crop (LLaVA-NeXT).

Doc: docs/methods/mmtok.md. Official code: Ironieser/MMTok (commit d1522cd), ``mmtok/core/semantic_selector.py``
(``greedy_merged_jit_kernel`` 23-65, ``mm_coverage_selection`` 88-148), ``mmtok/core/mmtok_core.py``
(``_encode_text_with_token_pooling`` 71-85, ``apply_selection`` 87-116, ``select_vision_tokens`` 118-172,
``apply_selection_preprocess_qwen`` 174-204), ``mmtok/core/text_processor.py`` (stop words, 17-54). Our own
implementation from the paper and the official algorithm.

Algorithm, per unit of n candidate tokens, budget T (``budget``; ``retain_ratio``: T = int(ratio * n)):

1. Text Z (m, D): the question's tokens embedded by the LLM's own embedding table (the prompt's rows,
   ``VisionSignals.text_embeds``). ``text="question"`` (default): every question token; ``text="keywords"``
   (the official LLaVA filter on the prompt's tokens): the tokens of the question's words that are not stop words,
   the two lmms-eval answer-format sentences removed (needs ``llm_tokenizer``); ``text="keywords_retokenized"``
   (the official route exactly): that keyword string re-tokenised word by word and embedded by ``embed_tokens``.
2. X (n, D) the projected tokens, X' (n, Dv) the vision tower's select-layer features; every row L2-normalised
   (x / max(|x|, 1e-8)), fp32.
3. P = softmax(Z X^T / tau_t, dim=1) / m (text -> vision), Q = softmax(X' X'^T / tau_v, dim=1) / n (vision ->
   vision); C = [P; alpha Q], (m + n, n).
4. Greedy maximum coverage, k = min(T, n) steps from best = 0 (m + n): gain_j = sum_rows max(C[:, j] - best, 0),
   picked columns at -inf, j* = argmax (first index on ties), best = max(best, C[:, j*]).
5. Keep the picks in ascending order (no merging); a unit with at most T candidates is kept whole.

Our design: NeXT newline tokens are kept as layout, outside the budget (``keep_newlines``); the greedy runs on the
device (no host read; units of one size batched); the text rows are gathered (eager) or masked (fast path).
Reference mode (``numerics="official"``): rows normalised in their own dtype before the fp32 cast, each unit's
greedy alone, as the official kernel.

The official Qwen2.5-VL route (``mmtok/qwen/``: ``qwen2_5_vl_mmtok.py`` 19-77, ``modeling_qwen2_5_vl_mmtok.py`` 65-73,
``qwen2_5_VLmodel_mmtok.py`` 152-224, ``mmtok_core.py`` 174-204), as options: ``vv_space="merge_mean"`` (X' = the last
ViT block's output averaged over each merged token's 4 patches, ``VisionSignals.group_mean[-1]``),
``text="question_retokenized"`` ("Question: " + the question re-tokenised word by word, no keyword filter),
``scope="sample"`` (one selection over all the prompt's image tokens), ``retain_ratio`` (T = int(r * n)),
``whole_at_most=64`` (the official core keeps a selection over at most 64 tokens whole), with ``numerics="official"``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics
from llava.options import Option
from llava.selection import Selection

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")
TEXT_MODES = ("question", "keywords", "keywords_retokenized", "question_retokenized")
VV_SPACES = ("vision", "projected", "merge_mean")
SCOPES = ("unit", "sample")
#: the official Qwen2.5-VL text: this prefix + the user's text (``apply_selection_preprocess_qwen``, mmtok_core.py 194)
QWEN_TEXT_PREFIX = "Question: "
#: official temperatures: tau_t 0.02 (``mmtok()``, llava_inject.py 56-63), 0.01 on Qwen2.5-VL
#: (``mmtok_qwen2_5_vl``, qwen2_5_vl_mmtok.py 41-48); tau_v 0.2 and alpha 0.5 on both
TV_TEMPERATURE = {"qwen2_5_vl": 0.01}
TV_TEMPERATURE_DEFAULT = 0.02
NORM_FLOOR = 1e-8  # semantic_selector.py 85-86

#: the official stop words (text_processor.py 18-27)
NON_VISUAL_WORDS = frozenset({
    "a", "an", "the",
    "is", "are", "was", "were", "be", "been", "being",
    "have", "has", "had", "do", "does", "did",
    "it", "they", "he", "she", "we", "you", "i",
    "what", "where", "when", "why", "how", "who", "which",
    "and", "or", "but", "so", "if", "then",
    "question", "answer",
    "to", "for", "with", "by", "from", "at", "into", "onto", "upon",
})
WORD_REGEX = re.compile(r"\b\w+\b")
#: the lmms-eval answer-format sentences the official code removes (text_processor.py 30-31, 50)
FORMAT_PROMPTS = ("Answer the question using a single word or phrase.",
                  "Answer with the option's letter from the given choices directly.")


# ------------------------------------------------------------------------------------ pure functions


def l2_normalize(x: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """Rows over max(|row|, 1e-8), returned in fp32: ``"ours"`` casts first, ``"official"`` divides in the rows'
    own dtype and casts after (``_l2_normalize(x).float()``, semantic_selector.py 104-106)."""
    if numerics == "official":
        return (x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)).float()
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def coverage_matrix(text: torch.Tensor, features: torch.Tensor, vision: torch.Tensor, *, tv_temperature: float,
                    vv_temperature: float = 0.2, alpha: float = 0.5, text_mask: torch.Tensor | None = None,
                    numerics: str = "ours") -> torch.Tensor:
    """C = [P; alpha Q] ((..., m + n, n), fp32) of one unit or a batch of equal-size units.
    text (m, D) (shared by the batch), features (..., n, D) projected tokens, vision (..., n, Dv) the
    vision-vision space. P = softmax(Zn Xn^T / tau_t, dim=-1) / m, Q = softmax(Vn Vn^T / tau_v, dim=-1) / n,
    in the official order (semantic_selector.py 104-118). ``text_mask`` (m,) bool: only its rows are text (the
    fast path's padded block); the other rows of P are 0 (they never add gain) and m counts the real rows."""
    xn = l2_normalize(features, numerics)
    vn = l2_normalize(vision, numerics)
    zn = l2_normalize(text, numerics)
    n = xn.shape[-2]
    P = zn @ xn.transpose(-1, -2)  # (..., m, n)
    Q = vn @ vn.transpose(-1, -2)  # (..., n, n)
    inv_tv, inv_vv = 1.0 / tv_temperature, 1.0 / vv_temperature
    if text_mask is None:
        P = torch.softmax(P * inv_tv, dim=-1) / max(zn.shape[0], 1)
    else:
        w = text_mask.to(device=P.device, dtype=torch.bool)
        m = w.sum().clamp(min=1).to(P.dtype)
        P = torch.where(w[:, None], torch.softmax(P * inv_tv, dim=-1) / m, torch.zeros_like(P))
    Q = torch.softmax(Q * inv_vv, dim=-1) / n
    return torch.cat([P, Q * alpha], dim=-2)


def coverage_greedy(C: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy maximum coverage on C (B, R, n) (or (R, n)): ``k`` picks in pick order, (B, k) / (k,), on C's
    device, no host read. Each step gain_j = sum_r max(C[r, j] - best_r, 0) with picked columns at -inf, the
    first maximal j (``argmax``), best = max(best, C[:, j]); best starts at 0 (semantic_selector.py 44-63).

    Eight ops a step: the difference is written into one (B, R, n) scratch buffer and clamped there (no fresh
    R x n tensors per step), the -inf of a picked column is one ``scatter_``."""
    squeeze = C.dim() == 2
    C3 = C[None] if squeeze else C
    B, R, n = C3.shape
    k = max(0, min(int(k), n))
    best = C3.new_zeros((B, R, 1))
    mask = C3.new_zeros((B, n))
    scratch = torch.empty_like(C3) if k else None
    picks = []
    for _ in range(k):
        gain = torch.sub(C3, best, out=scratch).clamp_min_(0).sum(dim=-2).add_(mask)
        j = gain.argmax(dim=-1)  # (B,), first maximum
        picks.append(j)
        best = torch.maximum(best, C3.gather(2, j[:, None, None].expand(B, R, 1)))
        mask.scatter_(1, j[:, None], float("-inf"))
    out = torch.stack(picks, 1) if picks else torch.zeros((B, 0), dtype=torch.long, device=C3.device)
    return out[0] if squeeze else out


def coverage_greedy_official(C: torch.Tensor, k: int) -> torch.Tensor:
    """Reference mode of :func:`coverage_greedy`: one unit C (R, n), the official kernel's ops in its order
    (``greedy_merged_jit_kernel``, semantic_selector.py 40-65: ``(C - best[:, None]).clamp_min_(0).sum(0)``, the
    -inf score mask added in place, ``argmax``, ``index_select`` of the column, ``maximum``). Picks in pick order."""
    R, n = C.shape
    k = max(0, min(int(k), n))
    best = torch.zeros(R, device=C.device, dtype=C.dtype)
    score_mask = torch.zeros(n, device=C.device, dtype=C.dtype)
    neg_inf = torch.full((1,), float("-inf"), dtype=C.dtype, device=C.device)
    picks = torch.zeros(k, dtype=torch.long, device=C.device)
    for i in range(k):
        delta = (C - best.unsqueeze(1)).clamp_min_(0).sum(dim=0)
        delta.add_(score_mask)
        idx = torch.argmax(delta).view(1)
        picks[i:i + 1] = idx
        col = C.index_select(1, idx).squeeze(1)
        score_mask.scatter_(0, idx, neg_inf)
        best = torch.maximum(best, col)
    return picks


def keyword_token_mask(pieces: list[str]) -> list[bool]:
    """Which of the question's tokens (their decoded texts, in order) carry a keyword: the official
    ``extract_keywords_simple`` (text_processor.py 44-54) on the question string - the answer-format sentences
    removed, the words ``\\b\\w+\\b`` whose lower case is not a stop word - mapped back to the tokens that
    overlap a kept word. With no keyword the official code falls back to the whole (format-stripped) text:
    then every token outside the removed sentences that is not blank."""
    text = "".join(pieces)
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    removed = [False] * len(text)
    for s in FORMAT_PROMPTS:
        for mt in re.finditer(re.escape(s), text):
            for c in range(mt.start(), mt.end()):
                removed[c] = True
    kept_text = "".join(" " if removed[c] else ch for c, ch in enumerate(text))
    words = [(mt.start(), mt.end()) for mt in WORD_REGEX.finditer(kept_text)
             if mt.group(0).lower() not in NON_VISUAL_WORDS]
    # an empty piece (a byte that completes no character yet) belongs to the character that follows it
    spans = [(a, max(b, a + 1)) for a, b in spans]
    if not words:  # the official fallback: the whole text
        return [bool(kept_text[a:b].strip()) for a, b in spans]
    return [any(a < we and ws < b for ws, we in words) for a, b in spans]


def keyword_string(text: str) -> str:
    """The official ``extract_keywords_simple`` (text_processor.py 44-54) on a string: the answer-format sentences
    removed, the words ``\\b\\w+\\b`` that are not stop words joined by one space; no keyword: the text itself."""
    if not text:
        return ""
    for s in FORMAT_PROMPTS:
        text = text.replace(s, "")
    words = [w for w in WORD_REGEX.findall(text) if w.lower() not in NON_VISUAL_WORDS]
    return " ".join(words) if words else text


def retokenized_ids(tokenizer: Any, text: str) -> list[int]:
    """The official ``_encode_text_with_token_pooling`` ids (mmtok_core.py 71-85): ``text.split()`` tokenised with
    ``is_split_into_words=True`` (special tokens as the tokenizer adds them, truncated at its maximum length), the
    leading BOS dropped when there is more than one id."""
    ids = tokenizer(text.split(), is_split_into_words=True, truncation=True)["input_ids"]
    ids = [int(i) for i in ids]
    bos = getattr(tokenizer, "bos_token_id", None)
    return ids[1:] if len(ids) > 1 and bos is not None and ids[0] == bos else ids


def question_text(tokenizer: Any, ids: list[int]) -> str:
    """The question's text from its token ids for re-tokenising: the special tokens dropped except the unknown
    token, kept as its text (a word a lossy vocabulary lacks then re-tokenises to the unknown id, as the official
    text, tokenised from the user's string, does; byte-level vocabularies have none)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}
    return tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=False)


def load_input_embedding(checkpoint: str) -> torch.nn.Embedding:
    """The input embedding table of a checkpoint (hub id or local folder), read alone from its safetensors: the one
    tensor whose name ends in ``embed_tokens.weight`` (``language_model.model.embed_tokens.weight`` in llava-hf,
    ``model.language_model.embed_tokens.weight`` in transformers 5's saves), as a frozen ``nn.Embedding`` on the
    host in the stored dtype. For ``embed_tokens=`` given by name (the harness's ``--opt``)."""
    import json
    import os

    from safetensors import safe_open

    def path(name):
        if os.path.isdir(checkpoint):
            p = os.path.join(checkpoint, name)
            return p if os.path.exists(p) else None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(checkpoint, name)
        except EntryNotFoundError:
            return None

    index = path("model.safetensors.index.json")
    if index is not None:
        with open(index) as f:
            files = json.load(f)["weight_map"]
        names = [k for k in files if k.endswith("embed_tokens.weight")]
        shard = path(files[names[0]]) if len(names) == 1 else None
    else:
        shard = path("model.safetensors")
        names = []
        if shard is not None:
            with safe_open(shard, "pt") as f:
                names = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
    if len(names) != 1 or shard is None:
        raise ValueError(f"mmtok: embed_tokens={checkpoint!r}: expected one '*embed_tokens.weight' tensor in its "
                         f"safetensors, found {names}")
    with safe_open(shard, "pt") as f:
        weight = f.get_tensor(names[0])
    return torch.nn.Embedding.from_pretrained(weight, freeze=True)


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The decoded text of each token of ``ids`` in context, concatenating to ``decode(ids)``: token i ends where the
    decode of ``ids[:i+1]`` stops agreeing with the decode of all of them (prefix decodes, so that SentencePiece's word
    boundaries survive; a byte token that completes no character yet gets an empty piece, the one completing it the
    character)."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    out, at = [], 0
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[:i + 1], skip_special_tokens=True)
        end = 0
        while end < min(len(cur), len(full)) and cur[end] == full[end]:
            end += 1
        end = max(end, at)
        out.append(full[at:end])
        at = end
    if out:
        out[-1] += full[at:]
    return out


def mmtok(features: torch.Tensor, vision: torch.Tensor, text: torch.Tensor | Callable, layout, budget: int | None, *,
          tv_temperature: float, vv_temperature: float = 0.2, alpha: float = 0.5,
          text_mask: torch.Tensor | None = None, retain_ratio: float | None = None, keep_newlines: bool = True,
          numerics: str = "ours", scope: str = "unit", whole_at_most: int | None = None) -> torch.Tensor:
    """Indices (ascending) of the tokens MMTok keeps for one sample: per unit the greedy maximum coverage of
    T = ``budget`` (or int(``retain_ratio`` * n), the official Qwen2.5-VL count) of its n candidates, the whole
    unit when n <= T. features (N, D) projected tokens, vision (N, Dv) the vision-vision space, text (m, D) the
    text rows (``text_mask``: the real ones among them) or a callable returning (text, text_mask), called only when
    some unit is pruned; ``layout`` the sample's :func:`llava.ops.unit_layout` (its per-unit token indices;
    ``newlines`` kept as layout with ``keep_newlines``). ``scope="sample"``: one selection over all the sample's
    candidates together (the units concatenated in prompt order, T = ``budget`` or int(``retain_ratio`` * all of
    them)), as the official Qwen2.5-VL forward selects over all the prompt's image tokens at once. ``whole_at_most``:
    a selection over at most that many candidates keeps them all whatever T (the official Qwen2.5-VL route: 64)."""
    check_numerics("mmtok", numerics)
    if scope not in SCOPES:
        raise ValueError(f"mmtok: scope must be one of {SCOPES}, got {scope!r}")
    dev = features.device
    kept: list[torch.Tensor] = [layout.newlines] if keep_newlines else []
    by_size: dict[tuple[int, int], list[torch.Tensor]] = {}
    units = list(layout.tokens)
    if scope == "sample" and len(units) > 1:
        units = [torch.cat(units)]
    for cand in units:
        n = int(cand.numel())
        k = int(retain_ratio * n) if retain_ratio is not None else int(budget)
        # official: a unit with at most T tokens is returned whole (mmtok_core.py 145-146); on Qwen2.5-VL that T is
        # the core's default 64, not the ratio's count (whole_at_most)
        if n <= k or (whole_at_most is not None and n <= whole_at_most):
            kept.append(cand)
        elif k > 0:
            by_size.setdefault((n, k), []).append(cand)
    if by_size and callable(text):
        text, text_mask = text()
    opts = dict(tv_temperature=tv_temperature, vv_temperature=vv_temperature, alpha=alpha, text_mask=text_mask,
                numerics=numerics)
    for (n, k), cands in by_size.items():
        if numerics == "official":  # each unit alone, the official kernel (select_vision_tokens' loop)
            for cand in cands:
                C = coverage_matrix(text, features[cand], vision[cand], **opts)
                kept.append(cand[coverage_greedy_official(C, k)])
        else:
            cand = torch.stack(cands)  # (B, n)
            C = coverage_matrix(text, features[cand], vision[cand], **opts)
            kept.append(cand.gather(1, coverage_greedy(C, k)).reshape(-1))
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=dev)
    return torch.cat(kept).sort().values


# ------------------------------------------------------------------------------------ the method


@register
class MMTok(Method):
    """MMTok: per image / crop the tokens that greedily maximise the coverage of the question's tokens (P) and of
    the visual token set (alpha Q); ``text="question"`` (default: every question token), ``"keywords"`` (the
    official stop-word filter on the prompt's tokens, needs ``llm_tokenizer``) or ``"keywords_retokenized"`` (the
    official route: also ``embed_tokens``)."""

    name = "mmtok"
    #: text="question": masked text rows and the greedy on the device; text="keywords" is refused
    #: (:meth:`capture_refusal`: host tokenizer work)
    capturable = "full"
    vision_stage = True
    query_aware = True
    families = FAMILIES
    #: Qwen vision blocks whose per-merged-token mean the engine computes (VisionSignals.group_mean): (-1,) with
    #: vv_space="merge_mean" (set per instance), none otherwise
    vision_group_mean_blocks: tuple[int, ...] = ()
    unsupported_reason = ("MMTok runs on the families its paper and official code cover (LLaVA-1.5, LLaVA-NeXT, "
                          "Qwen2.5-VL); refused elsewhere")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "text": Option("question", TEXT_MODES,
                           doc="question (ours: every question token's LLM embedding) or keywords (official LLaVA "
                               "route: stop words and the answer-format sentences removed; needs llm_tokenizer)"),
            # text="keywords" / "keywords_retokenized": the LLM tokenizer (hub id / path / tokenizer object)
            "llm_tokenizer": None,
            # text="keywords_retokenized": the LLM's input embedding that embeds the re-tokenised keyword string: a
            # module / callable ids -> rows (model.get_input_embeddings()) or a checkpoint (hub id / folder) whose
            # embed_tokens.weight is read alone (load_input_embedding)
            "embed_tokens": None,
            # tau_t: None = the official per family (0.02; 0.01 on Qwen2.5-VL)
            "tv_temperature": None,
            # tau_v (official 0.2)
            "vv_temperature": 0.2,
            # weight of the vision -> vision coverage (official 0.5)
            "alpha": 0.5,
            "vv_space": Option("vision", VV_SPACES,
                               doc="vision -> vision space: vision (official on LLaVA: the tower's select-layer "
                                   "features; on Qwen2.5-VL the merger's normed input), projected (the LLM-input "
                                   "tokens) or merge_mean (official on Qwen2.5-VL: the last ViT block's output "
                                   "averaged over each merged token's 4 patches; Qwen only)"),
            "scope": Option("unit", SCOPES,
                            doc="unit: one selection per image / crop; sample: one over all the sample's visual tokens "
                                "(official Qwen2.5-VL: T = int(retain_ratio * all of the prompt's image tokens))"),
            # None: a selection is skipped only when n <= T (ours); an int: also when n <= it (official Qwen2.5-VL:
            # 64, the core's default target_vision_tokens that select_vision_tokens compares n with)
            "whole_at_most": None,
            # None: T = budget per unit; a fraction: T = int(ratio * n) per unit (official Qwen2.5-VL retain_ratio)
            "retain_ratio": None,
            # LLaVA-NeXT newline tokens: kept as layout outside the budget (ours) or dropped
            "keep_newlines": True,
            # "ours" (fp32 normalisation, units batched) or "official" (reference mode: the official arithmetic)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.retain_ratio is None and budget is None:
            raise ValueError("mmtok: a budget T (tokens per image / crop) or retain_ratio is required")
        if self.retain_ratio is not None and not (0 < float(self.retain_ratio) <= 1):
            raise ValueError(f"mmtok: retain_ratio must be in (0, 1], got {self.retain_ratio!r}")
        if self.text != "question" and self.llm_tokenizer is None:
            raise ValueError(f"mmtok: text={self.text!r} needs llm_tokenizer (the LLM's tokenizer, to read the "
                             "question's words)")
        if self.text.endswith("_retokenized") and self.embed_tokens is None:
            raise ValueError(f"mmtok: text={self.text!r} needs embed_tokens (the LLM's input embedding, e.g. "
                             "model.get_input_embeddings())")
        if self.whole_at_most is not None and (isinstance(self.whole_at_most, bool) or int(self.whole_at_most) < 0):
            raise ValueError(f"mmtok: whole_at_most must be None or a count >= 0, got {self.whole_at_most!r}")
        if self.vv_space == "merge_mean":  # the Qwen tower's last block, averaged per merged token (a Qwen signal)
            self.vision_group_mean_blocks = (-1,)
            self.families = ("qwen2_5_vl",)
            self.unsupported_reason = ("vv_space='merge_mean' reads the Qwen2.5-VL tower's last block averaged over "
                                       "each merged token's 4 patches (the official Qwen space); other families: "
                                       "vv_space='vision'")
        for k in ("vv_temperature",) + (("tv_temperature",) if self.tv_temperature is not None else ()):
            if not float(getattr(self, k)) > 0:
                raise ValueError(f"mmtok: {k} must be > 0, got {getattr(self, k)!r}")
        self._tok = self._embed = None

    def capture_refusal(self):
        if self.vv_space == "merge_mean":
            return ("mmtok: vv_space='merge_mean' runs on the eager engine: the fast path's static tower does not "
                    "compute the last block's per-token means")
        if self.text != "question":
            return (f"mmtok: text={self.text!r} runs on the eager engine: it decodes the question's token ids with "
                    "the LLM tokenizer to find its words (host text work between the tower and the selection); "
                    "text='question' (default) is captured")
        return super().capture_refusal()

    def tau_t(self) -> float:
        if self.tv_temperature is not None:
            return float(self.tv_temperature)
        return TV_TEMPERATURE.get(self.family, TV_TEMPERATURE_DEFAULT)

    def _tokenizer(self):
        if self._tok is None:
            tok = self.llm_tokenizer
            if isinstance(tok, str) or hasattr(tok, "__fspath__"):
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(tok))
            self._tok = tok
        return self._tok

    def _embedding(self, device):
        """``embed_tokens`` as given, or the table of the named checkpoint (read once, moved to ``device``)."""
        emb = self.embed_tokens
        if not (isinstance(emb, str) or hasattr(emb, "__fspath__")):
            return emb
        if self._embed is None:
            self._embed = load_input_embedding(str(emb))
        if self._embed.weight.device != torch.device(device):
            self._embed.to(device)
        return self._embed

    def keyword_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Host indices (into the question's tokens) of the keyword tokens of ``ids`` (host)."""
        pieces = token_pieces(self._tokenizer(), [int(i) for i in ids.reshape(-1).tolist()])
        return torch.tensor([i for i, keep in enumerate(keyword_token_mask(pieces)) if keep], dtype=torch.long)

    def text_of(self, sig) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text rows Z (and the mask of the real ones, or None): eager, the question's rows gathered (the
        i-th question token is the i-th True of ``question_mask``: a stable sort, no host read); captured (the
        fast path's padded block), the block with its question mask."""
        text, mask = sig.text_rows("question")
        if sig.captured or sig.text_mask is not None or sig.question_ids is None:
            return text, mask
        if self.text.endswith("_retokenized"):  # the official routes: a string re-tokenised word by word, embedded
            tok = self._tokenizer()
            ids = [int(i) for i in sig.question_ids.reshape(-1).tolist()]
            if self.text == "keywords_retokenized":  # LLaVA: the keyword string (mmtok_core.py 107-108)
                words = keyword_string(tok.decode(ids, skip_special_tokens=True))
            else:  # Qwen2.5-VL: "Question: " + the question, no filter (mmtok_core.py 194-198)
                words = QWEN_TEXT_PREFIX + question_text(tok, ids).strip()
            ids = retokenized_ids(tok, words)
            embed = self._embedding(text.device)
            weight = next(iter(embed.parameters()), None) if hasattr(embed, "parameters") else None
            dev = weight.device if weight is not None else text.device
            rows = embed(torch.tensor(ids, dtype=torch.long, device=dev))
            return rows.to(device=text.device, dtype=text.dtype), None
        m = int(sig.question_ids.numel())  # host
        rows = torch.argsort((~mask).to(torch.int8), stable=True)[:m]  # the question rows, in order
        if self.text == "keywords":
            rows = rows[self.keyword_rows(sig.question_ids).to(rows.device)]
        return text.index_select(0, rows), None

    def select_vision(self, sig):
        if self.text != "question" and (sig.captured or sig.text_mask is not None):
            raise NotImplementedError(self.capture_refusal())
        if self.vv_space == "merge_mean":
            vision = sig.group_mean[-1]
            if self.numerics == "official":  # cast to the LLM's dtype first (qwen2_5_VLmodel_mmtok.py 108)
                vision = vision.to(sig.features.dtype)
        else:
            vision = sig.vision_features if self.vv_space == "vision" else sig.features
        keep = mmtok(sig.features, vision, lambda: self.text_of(sig), sig.unit_layout(), self.budget,
                     tv_temperature=self.tau_t(), vv_temperature=float(self.vv_temperature), alpha=float(self.alpha),
                     retain_ratio=None if self.retain_ratio is None else float(self.retain_ratio),
                     keep_newlines=self.keep_newlines, numerics=self.numerics, scope=self.scope,
                     whole_at_most=None if self.whole_at_most is None else int(self.whole_at_most))
        return Selection(keep=keep)
