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
    style: str  # "two" (vicuna / llava_v1: "{system} USER: ... ASSISTANT:") or "chatml"

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
        raise ValueError(self.style)

    @property
    def role_tag(self) -> str:
        """The text that ends every prompt (stripped from 'question' tokens for query signals)."""
        return f" {self.assistant}:" if self.style == "two" else f"<|im_end|><|im_start|>{self.assistant}\n"


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
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
