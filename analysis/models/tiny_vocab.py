"""Words the tiny test tokenizers know: prompt templates plus a small general vocabulary."""

from __future__ import annotations

TEMPLATE_WORDS = (
    "A chat between a curious human and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the human ' s questions . USER : ASSISTANT : system user assistant "
    "You are helpful"
).split()

GENERAL_WORDS = (
    "what is the colour color of shape how many are there in this image picture ? yes no left right above "
    "below answer question using single word or phrase red green blue yellow purple orange black white "
    "circle square triangle star cross one two three four five six zero 0 1 2 3 4 5 6 7 8 9 a b c d "
    "compare first second which object it on side near"
).split()


def tiny_words() -> list[str]:
    """The de-duplicated vocabulary of tiny test tokenizers, in a stable order."""
    return list(dict.fromkeys([*TEMPLATE_WORDS, *GENERAL_WORDS]))
