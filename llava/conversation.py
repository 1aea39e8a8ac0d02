"""LLaVA's own conversation templates (not the HF chat template, which changes benchmark numbers).

Ported from the behaviour of LLaVA's ``conversation.py`` (see ../docs/architecture.md and
evaluation.md section 1): single-turn prompts only, which is what every benchmark uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    assistant: str
    style: str  # "two" (vicuna / llava_v1: "{system} USER: ... ASSISTANT:"), "chatml" (LLaVA's chatml_direct),
    # "qwen_vl" (Qwen2.5-VL's HF chat template), "onevision_hf" (llava-hf OneVision's chat template) or
    # "internvl_hf" (the InternVL -hf checkpoints' chat template)
    #: text the template puts after the assistant tag where generation starts (Qwen3.5's empty think block)
    gen_prefix: str = ""

    def prompt(self, question: str, placeholders: str = "<image>") -> str:
        """The prompt string up to where generation starts. ``placeholders`` is put before the
        question, followed by a newline (LLaVA's ``mm_use_im_start_end = False`` form); pass an
        empty string for a text-only prompt."""
        user_msg = f"{placeholders}\n{question}" if placeholders else question
        if self.style == "two":
            return f"{self.system} {self.user}: {user_msg} {self.assistant}:"
        if self.style == "chatml":
            return (f"<|im_start|>system\n{self.system}<|im_end|><|im_start|>{self.user}\n{user_msg}<|im_end|>"
                    f"<|im_start|>{self.assistant}\n")
        if self.style == "qwen_vl":
            # placeholders: "<|vision_start|><|image_pad|><|vision_end|>" per image, no newline before the text; an
            # empty system: no system turn (Qwen3.5's template adds none by default)
            system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system else ""
            return (f"{system}<|im_start|>{self.user}\n{placeholders}{question}"
                    f"<|im_end|>\n<|im_start|>{self.assistant}\n{self.gen_prefix}")
        if self.style == "onevision_hf":
            # every <image> / <video> is followed by its own newline; no system turn
            ph = placeholders.replace("<image>", "<image>\n").replace("<video>", "<video>\n")
            return f"<|im_start|>{self.user}\n{ph}{question}<|im_end|>\n<|im_start|>{self.assistant}\n"
        if self.style == "internvl_hf":
            # every <IMG_CONTEXT> (expanded by the processor to <img> + its tokens + </img>) gets a newline; no system
            ph = placeholders.replace("<IMG_CONTEXT>", "<IMG_CONTEXT>\n")
            return f"<|im_start|>{self.user}\n{ph}{question}<|im_end|>\n<|im_start|>{self.assistant}\n"
        raise ValueError(self.style)

    @property
    def role_tag(self) -> str:
        """The text that ends every prompt (stripped from 'question' tokens for query signals)."""
        if self.style == "two":
            return f" {self.assistant}:"
        if self.style in ("qwen_vl", "onevision_hf", "internvl_hf"):
            return f"<|im_end|>\n<|im_start|>{self.assistant}\n{self.gen_prefix}"
        return f"<|im_end|><|im_start|>{self.assistant}\n"

    @property
    def sep_text(self) -> str:
        """The text between the last visual placeholder and the question (stripped from the 'question'
        tokens): the newline of LLaVA's templates and OneVision's, ``<|vision_end|>`` for Qwen, ``</img>`` and the
        newline for InternVL."""
        return {"qwen_vl": "<|vision_end|>", "internvl_hf": "</img>\n"}.get(self.style, "\n")


TEMPLATES = {
    "vicuna_v1": Template(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "USER", "ASSISTANT", "two"),
    "llava_v1": Template(
        "llava_v1",
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        "USER", "ASSISTANT", "two"),
    "chatml_direct": Template("chatml_direct", "Answer the questions.", "user", "assistant", "chatml"),
    # Qwen2.5-VL-Instruct's chat template (chat_template.json of the Qwen2-VL / Qwen2.5-VL checkpoints, verified
    # against a public copy of that file): a default system turn, then per image
    # "<|vision_start|><|image_pad|><|vision_end|>" directly followed by the question, "<|im_end|>\n" after each turn
    "qwen2_vl": Template("qwen2_vl", "You are a helpful assistant.", "user", "assistant", "qwen_vl"),
    # Qwen3.5's chat_template.jinja (a public copy of the Qwen3.5 / 3.6 file; not the checkpoint
    # itself, which cannot be downloaded here): no default system turn, the same vision markers and turns as Qwen2.5-VL,
    # and a generation prompt that depends on `enable_thinking`: "<think>\n" (the default: the model reasons first)
    # or "<think>\n\n</think>\n\n" (enable_thinking=False: an empty think block, a direct answer). Short-answer
    # benchmarks need the direct answer: this is the template with enable_thinking=False. `qwen3_5_lmms` adds the
    # system turn lmms-eval's qwen3_5 model sends ("You are a helpful assistant.").
    "qwen3_5": Template("qwen3_5", "", "user", "assistant", "qwen_vl", gen_prefix="<think>\n\n</think>\n\n"),
    "qwen3_5_lmms": Template("qwen3_5_lmms", "You are a helpful assistant.", "user", "assistant", "qwen_vl",
                             gen_prefix="<think>\n\n</think>\n\n"),
    # llava-hf OneVision's chat_template.json (verified on the hub copies of llava-onevision-qwen2-7b-si-hf and
    # -72b-si-hf, updated Aug 2024; the 7b-ov-hf file is assumed identical): "<|im_start|>user\n" + "<image>\n" per
    # image + question + "<|im_end|>\n<|im_start|>assistant\n", no system turn. (The original LLaVA-OV
    # `qwen_1_5` conversation adds a system turn; transformers' unit tests use an older "user <image>" variant.)
    "llava_onevision_hf": Template("llava_onevision_hf", "", "user", "assistant", "onevision_hf"),
    # InternVL -hf checkpoints (InternVL3-*-hf, InternVL3_5-*-HF): the chat template transformers' conversion script
    # writes (convert_internvl_weights_to_hf.py): "<|im_start|>user\n" + "<IMG_CONTEXT>\n" per image + question +
    # "<|im_end|>\n<|im_start|>assistant\n", no system turn; InternVLProcessor expands each <IMG_CONTEXT> to
    # "<img>" + 256 x tiles "<IMG_CONTEXT>" + "</img>". (The original InternVL `chat()` adds a Chinese system
    # prompt; VLMEvalKit and lmms-eval differ on it: pass --template to choose.)
    "internvl_hf": Template("internvl_hf", "", "user", "assistant", "internvl_hf"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
