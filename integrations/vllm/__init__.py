"""Pruning inside vLLM: an out-of-tree plugin (entry point ``vllm.general_plugins`` -> :func:`register`).

Usage (in the environment ``scripts/vllm_env.sh`` builds)::

    from vllm import LLM
    from integrations.vllm import overrides

    llm = LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides=overrides("llava-hf/llava-1.5-7b-hf", "visionzip", 64))
    # = hf_overrides={"architectures": ["VtpruneLlavaForConditionalGeneration"],
    #                 "vtprune": {"method": "visionzip", "budget": 64, "options": {}, "template": None}}

    # a revision of the checkpoint (branch, tag or commit): the same one to both (the plugin refuses a mismatch)
    m = "llava-hf/llava-1.5-7b-hf"
    llm = LLM(model=m, revision="abc123", hf_overrides=overrides(m, "visionzip", 64, revision="abc123"))

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides \\
        '{"architectures": ["VtpruneLlavaForConditionalGeneration"], "vtprune": {"method": "visionzip", "budget": 64}}'

Each image (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision: or video) then enters vLLM's decoder as the method's K tokens (the
prompt, the KV cache and the scheduler count K); the selection is the HF engine's (:mod:`integrations.vllm.stage`). Pre-LLM methods only;
one image or video per prompt; the families of :data:`ARCHITECTURES`. Every file the plugin reads (the config, tokenizer and image
processor in vLLM's front end, the vision stage's weights in its worker) is read at vLLM's ``revision``.
"""

from __future__ import annotations

#: the checkpoint's architecture -> the plugin's (module:class, lazily imported by vLLM)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": ("VtpruneLlavaForConditionalGeneration",
                                      "integrations.vllm.llava:VtpruneLlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("VtpruneLlavaNextForConditionalGeneration",
                                          "integrations.vllm.llava_next:VtpruneLlavaNextForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": (
        "VtpruneQwen2_5_VLForConditionalGeneration", "integrations.vllm.qwen:VtpruneQwen2_5_VLForConditionalGeneration"),
    "Qwen3VLForConditionalGeneration": (
        "VtpruneQwen3VLForConditionalGeneration", "integrations.vllm.qwen:VtpruneQwen3VLForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": (
        "VtpruneLlavaOnevisionForConditionalGeneration",
        "integrations.vllm.llava_onevision:VtpruneLlavaOnevisionForConditionalGeneration"),
}


def register() -> None:
    """vLLM's plugin hook (run in every vLLM process): register the plugin's model classes."""
    from vllm import ModelRegistry

    for name, target in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)


def overrides(model: str, method: str, budget: int | None = None, template: str | None = None, *,
              revision: str | None = None, **options) -> dict:
    """``hf_overrides`` for ``LLM(model=...)`` / ``vllm serve`` that prune with ``method`` at ``budget``: the
    plugin's architecture for the checkpoint's, and the method (checked here: an unknown method, a bad option
    or an in-LLM method fails now, not in the engine's worker). ``revision``: the checkpoint's branch, tag or
    commit, read here (config, tokenizer, image processor) and recorded in the spec: serve it with the same
    ``LLM(..., revision=)`` (the plugin refuses another)."""
    from transformers import AutoConfig

    from .spec import PruneSpec, planned_for_config

    cfg = AutoConfig.from_pretrained(model, revision=revision)
    arch = (getattr(cfg, "architectures", None) or [""])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{model}: architecture {arch!r} is not served by the vtprune vLLM plugin yet "
                         f"(served: {', '.join(ARCHITECTURES)})")
    spec = PruneSpec.from_dict({"method": method, "budget": budget, "options": options, "template": template,
                                "revision": revision})
    from llava.families import registry

    family = registry.by_model_class(arch).id
    if family == "llava":
        planned_for_config(spec, family, cfg)  # the method's checks and its dry run, here
    else:  # the count on the checkpoint's geometry twin, at the size with the most tokens
        from .twin import twin_for

        twin = twin_for(model, spec, revision)
        if hasattr(cfg, "image_grid_pinpoints"):
            h, w = max(cfg.image_grid_pinpoints, key=lambda p: p[0] * p[1])
        else:  # Qwen: a square image of the checkpoint's largest area
            from llava.models import checkpoint_processors

            ip = checkpoint_processors(model, family, revision=revision)[1]
            hi = getattr(getattr(ip, "size", None), "longest_edge", None) or getattr(ip, "max_pixels", None) or 224 * 224
            h = w = int(int(hi) ** 0.5) // 28 * 28
        twin.count(int(w), int(h))  # videos (opt-in: limit_mm_per_prompt) are counted when vLLM starts
    return {"architectures": [ARCHITECTURES[arch][0]], "vtprune": spec.as_dict()}
