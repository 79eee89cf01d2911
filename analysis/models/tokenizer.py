"""Word-level HF tokenizers built offline, for tiny test models and the bundled model organism."""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast


def build_word_tokenizer(
    words: Iterable[str],
    special_tokens: Iterable[str],
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    add_bos: bool = True,
    chat_template: str | None = None,
    extra_attributes: dict[str, str] | None = None,
    named_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Return a fast word-level tokenizer over ``words`` whose special tokens are never split.

    ``named_tokens`` (name -> special token) become attributes ``name`` and ``name_id`` that survive
    ``save_pretrained`` (Gemma 3's ``boi_token``); ``extra_attributes`` are plain attributes, not saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = [pad_token, unk_token, bos_token, eos_token, *special_tokens]
    vocab: dict[str, int] = {}
    for token in [*specials, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    # Splitting on whitespace and punctuation keeps "red?" -> "red", "?" like a real prompt tokenizer.
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if add_bos:
        bos_id = vocab[bos_token]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        additional_special_tokens=list(special_tokens),
        chat_template=chat_template,
        padding_side="left",
        **({"extra_special_tokens": dict(named_tokens)} if named_tokens else {}),
    )
    for name, value in (extra_attributes or {}).items():
        setattr(tokenizer, name, value)
    return tokenizer
