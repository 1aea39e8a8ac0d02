"""Why the captured prefill does not run a method, a family or a prompt: every reason in one place.

A refusal is not an error: the prefill runs on the eager engine, and ``engine.stats.path_reason`` (and the
evaluation's per-reason counts, ``eval run``'s results) carry the string, so the strings are an interface. Two
kinds:

* **static** (:func:`captured_refusal`, once at attach, from the family's record, the decoder's attention, the
  method's :class:`llava.needs.Needs` and the method's own reason, ``Needs.capture``: what
  :meth:`llava.method.Method.capture_refusal` answers for its options): the family is not planned, the decoder
  does not run SDPA, an in-tower stage without its masked form, llm stages or a probe on a hybrid decoder,
  llm stages or a query-aware stage after a piecewise vision stage;
* **per prompt** (the functions below, raised as :class:`NotPlanned` by the host plan, :mod:`llava.fast.plan`):
  replayed selections, several images or videos in a row, positions the family's rule does not take, a caller's
  1-D positions with gaps, no positions for a padded 1-D batch (the stock default counts the pads), kept
  M-RoPE positions with extra candidates or a piecewise count, a selection that cannot be planned on the host,
  llm stages after a piecewise stage, a probe beside DeepStack rows.

Every method-specific reason begins with the method's name and a colon.
"""

from __future__ import annotations

from ..families.clip import MASKED_TOWER_ATTN


#: the tower signals the captured prefill computes (the others' arithmetic runs on the eager engine, which the
#: methods that read them say through :meth:`llava.method.Method.capture_refusal`)
CAPTURED_TOWER_KINDS = ("received", "fullwidth", "cls_row")

REPLAY = "replay of recorded selections runs on the eager engine"


class NotPlanned(Exception):
    """The prompt does not fit the fast path (the message says why): it runs on the eager engine."""


def captured_refusal(needs, family, adapter, decoder_attention: str | None) -> str | None:
    """Why the captured prefill does not run this method on this model (None: it does, prompt permitting).
    ``needs``: the attached method's record; ``family``: its family's record (:mod:`llava.families.registry`);
    ``adapter``: the family adapter (its towers and hybrid layers); ``decoder_attention``: the decoder's
    ``_attn_implementation``."""
    if not family.fast:
        return f"the fast path does not plan {family.id} models: {family.fast_reason}"
    if decoder_attention != "sdpa":  # eager attention adds a mask (its bool prompt / decode masks would mask nothing)
        return (f"the fast path's masks are SDPA's (boolean); this decoder runs {decoder_attention!r} attention: "
                "load with attn_implementation='sdpa'")
    name = needs.method
    if needs.pixel_stage:
        return (f"{name}: a pre-tower stage's kept tokens depend on the pixels, and the captured prefill fixes the "
                "tower's shapes before the device runs (each count would be its own graph)")
    if needs.attention_bias:
        return (f"{name}: its attention bias is built from each prompt's rows after the vision stage and added in "
                "every decoder layer (llava/attention_bias.py): the captured prefill and decode do not add it")
    if needs.vision_positions == "keep" and not adapter.keeps_positions:
        return (f"{name}: its vision stage keeps the kept tokens' prompt positions (vision_positions='keep'); the "
                "captured prefill numbers the rows on contiguously")
    if needs.tower_stage:  # captured through the masked tower (clip.run_tower_masked)
        if not needs.tower_masked:
            return (f"{name}: its in-tower stage has no masked variant (select_tower_masked): in-tower stages "
                    "are captured through the masked tower only")
        if needs.tower_attention or any(r.kind in CAPTURED_TOWER_KINDS for r in needs.tower_reads):
            return f"{name}: an in-tower stage with vision attention signals is not captured"
        for k in adapter.pixel_keys:
            impl = getattr(adapter.tower_for(k).config, "_attn_implementation", None) or "eager"
            if impl not in MASKED_TOWER_ATTN:
                return (f"{name}: the masked tower needs {' / '.join(MASKED_TOWER_ATTN)} attention in the "
                        f"vision tower, not {impl!r}")
    if adapter.linear_layers and (needs.llm_layers or needs.probe_layers):
        return (f"{name}: llm stages or an LLM probe on a hybrid decoder (Gated DeltaNet layers) are not "
                "captured (the fast path runs Qwen3.5 with pre-LLM methods)")
    why = needs.capture  # the method's own, for its options
    if not why and needs.capture_kind == "piecewise":
        if needs.llm_layers:
            why = f"{name}: llm stages after a piecewise (data-dependent) vision stage are not captured yet"
        elif needs.query_aware:
            why = f"{name}: a query-aware piecewise vision stage is not captured yet"
    return why if not why or why.startswith(f"{name}:") else f"{name}: {why}"


def several_runs(row: int, kind: str, tokens: int) -> NotPlanned:
    return NotPlanned(f"row {row} does not hold exactly one {kind} run of {tokens} contiguous placeholder tokens "
                      "(several images / videos per prompt run on the eager engine)")


def positions(exc: Exception) -> NotPlanned:
    return NotPlanned(f"the prompt's positions could not be planned ({type(exc).__name__}: {exc})")


def gapped_positions() -> NotPlanned:
    return NotPlanned("the caller's position ids do not number each row's real tokens one after another (the "
                      "captured plan continues them contiguously)")


def stock_positions() -> NotPlanned:
    return NotPlanned("no position ids for a left-padded batch: the stock default numbers each padded row from its "
                      "first pad, which a bucket's padding would change (pass position_ids, as generate() does)")


def kept_positions(method: str) -> NotPlanned:
    return NotPlanned(f"{method}: kept positions (M-RoPE) are planned for the one-graph prefill of the visual tokens "
                      "themselves (no extra [CLS] candidates, no piecewise count)")


def selection(method: str, exc: Exception) -> NotPlanned:
    return NotPlanned(f"{method}: its selection could not be planned on the host ({type(exc).__name__}: {exc})")


def piecewise_stages(method: str) -> NotPlanned:
    return NotPlanned(f"{method}: llm stages after a piecewise vision stage are not planned")


def probe_deepstack(method: str) -> NotPlanned:
    return NotPlanned(f"{method}: an LLM probe on a model with DeepStack rows (Qwen3-VL) is not planned")
