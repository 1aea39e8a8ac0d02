"""The official "CLIP text tower" route of methods that score visual tokens against the question in CLIP's
joint space (CDPruner ``relevance="clip"``, VisionTrim ``text="clip"``): a CLIP checkpoint with its text tower,
its tokenizer, and the LLM tokenizer that turns the question's token ids back into the string the official
code hands CLIP. Loaded on first use (host work: such a prefill runs on the eager engine)."""

from __future__ import annotations

from typing import Any

import torch


def _named(x: Any) -> bool:
    return isinstance(x, str) or hasattr(x, "__fspath__")


class ClipTextRoute:
    """``clip_model`` / ``clip_tokenizer`` / ``llm_tokenizer``: a hub id or local folder, or the loaded object
    (a loaded ``clip_model`` needs its ``clip_tokenizer``); ``method`` names the owner in errors."""

    def __init__(self, method: str, clip_model: Any, clip_tokenizer: Any, llm_tokenizer: Any):
        self.method, self.clip_model = method, clip_model
        self.clip_tokenizer, self.llm_tokenizer = clip_tokenizer, llm_tokenizer
        self.clip = self.tokenizer = self._llm = None

    def load(self, device) -> Any:
        """The CLIP model on ``device`` (loaded once, eval, no gradients); sets ``tokenizer``."""
        if self.clip is None:
            from transformers import AutoTokenizer, CLIPModel

            clip = CLIPModel.from_pretrained(str(self.clip_model)) if _named(self.clip_model) else self.clip_model
            clip.eval().requires_grad_(False)
            tok = self.clip_tokenizer
            if tok is None:
                if not _named(self.clip_model):
                    raise ValueError(f"{self.method}: give clip_tokenizer with a loaded clip_model")
                tok = str(self.clip_model)
            self.tokenizer = AutoTokenizer.from_pretrained(str(tok)) if _named(tok) else tok
            llm = self.llm_tokenizer
            self._llm = AutoTokenizer.from_pretrained(str(llm)) if _named(llm) else llm
            self.clip = clip
        if next(self.clip.parameters()).device != torch.device(device):
            self.clip.to(device)
        return self.clip

    def question_text(self, ids: torch.Tensor) -> str:
        """The question string of its token ids (special tokens skipped), as the official code passes it."""
        ids = [int(i) for i in ids.reshape(-1).tolist()]
        tok = self._llm
        text = tok.decode(ids, skip_special_tokens=True) if hasattr(tok, "decode") else tok(ids)
        return str(text).strip()
