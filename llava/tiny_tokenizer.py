"""A word-level tokenizer for the tiny test models (no download needed).

Splits on whitespace, keeps newlines and punctuation as tokens, and prepends BOS like Llama's.
With ``chatml=True`` (the Qwen2.5-VL and LLaVA-OneVision tiny models) the ChatML / Qwen vision special
tokens are appended after every other token (the ids of all existing tokens are unchanged) and, like
Qwen2's tokenizer, no BOS is added and ``<|im_end|>`` is the EOS token.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]

BASE_WORDS = """
a chat between curious user human and an artificial intelligence assistant the gives helpful detailed
polite answers to user's human's questions USER ASSISTANT what is this of in on at left right top
bottom color colour shape how many are there any yes no red green blue yellow white black orange purple
circle square triangle star small large big object objects image picture video describe answer question
using single word or phrase with option's letter from given choices directly one two three four five
six seven eight nine zero 0 1 2 3 4 5 6 7 8 9 which side does it have do you see can be near far above
below next for that these those
""".split()

PUNCT = list(".,:;?!'\"()-/")

# appended at the very end of the vocabulary (after ``extra_words``) only with ``chatml=True``
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>", "<|endoftext|>"]
CHATML_WORDS = ["system"]  # "<|im_start|>system\n..." (the other words of Qwen's system prompt are in BASE_WORDS)
# InternVL's image tokens, appended after the ChatML ones only with ``internvl=True``
INTERNVL_SPECIALS = ["<img>", "</img>", "<IMG_CONTEXT>"]
# Qwen3.5's think markers (its generation prompt holds an empty think block), appended last only with ``think=True``
THINK_SPECIALS = ["<think>", "</think>"]


def build_tiny_tokenizer(extra_words: list[str] | None = None, chatml: bool = False,
                         internvl: bool = False, think: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for w in SPECIALS + ["\n"] + PUNCT + [w.lower() for w in BASE_WORDS + list(extra_words or [])]:
        vocab.setdefault(w, len(vocab))
    if chatml:
        for w in CHATML_WORDS + CHATML_SPECIALS + (INTERNVL_SPECIALS if internvl else []) + (THINK_SPECIALS if think else []):
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # tokens: special tags, newline, words (incl. apostrophes), single punctuation
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"<image>|<video>|</s>|<s>|\n|[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]"),
                             behavior="isolated"),
    ])
    if not chatml:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    if chatml:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", unk_token="<unk>",
                                       pad_token="<pad>", padding_side="left")
        fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"] + CHATML_SPECIALS
                                 + (INTERNVL_SPECIALS if internvl else []) + (THINK_SPECIALS if think else [])})
        return fast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return fast
