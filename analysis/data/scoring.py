"""Answer normalisation and per-sample correctness for open, yes/no and multiple-choice questions."""

from __future__ import annotations

import re

from analysis.data.samples import Sample
from analysis.errors import DataError

_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# A period is punctuation unless it sits between digits ("1.5" keeps its decimal point).
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_OTHER_PUNCTUATION = re.compile(r"[^\w\s.]|_")

# Where a free-form answer's first phrase ends: clause punctuation, a line break, or a sentence-final
# period (a period followed by a digit is a decimal point, not a boundary).
_PHRASE_BOUNDARY = re.compile(r"[,;:!?\n]|\.(?!\d)")

# "B", "B.", "(B)", "B) text", "B: text"; the lookahead rejects words that merely start with a capital.
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])\)?(?=$|[\s.,:;)\]])")
# "The answer is B" / "Answer: (B)"; only the word "answer" is case-insensitive, so "is a cat" names no option.
_STATED_LETTER = re.compile(r"\b(?i:answer)(?:\s+is)?\s*[:\s]\s*\(?([A-Z])\)?(?=$|[\s.,:;)\]])")

_YES_NO = frozenset({"yes", "no"})


def normalize_answer(text: str) -> str:
    """Lowercase and strip punctuation, articles and extra whitespace; spell-out numbers become digits."""
    text = text.lower().replace("\u2019", "'")
    text = _THOUSANDS_COMMA.sub("", text)
    # Dropping apostrophes (rather than splitting on them) keeps "don't" one token, as the VQA evaluation does.
    text = text.replace("'", "")
    text = _NON_DECIMAL_PERIOD.sub(" ", text)
    text = _OTHER_PUNCTUATION.sub(" ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def is_correct(prediction: str, sample: Sample) -> bool:
    """Whether a model's free-form reply answers ``sample`` correctly under its answer type."""
    if sample.answer is None:
        raise DataError(f"sample {sample.sample_id!r} has no reference answer; score only splits that publish answers")
    if sample.answer_type == "open":
        return _open_correct(prediction, sample.answer)
    if sample.answer_type == "yes_no":
        return _yes_no_correct(prediction, sample.answer)
    if sample.answer_type == "multiple_choice":
        return _choice_correct(prediction, sample)
    raise DataError(
        f"sample {sample.sample_id!r} has answer_type {sample.answer_type!r}; "
        "use one of 'open', 'yes_no', 'multiple_choice'"
    )


def _open_correct(prediction: str, answer: str) -> bool:
    """Exact match after normalisation, of the whole reply, its first phrase or its first word."""
    target = normalize_answer(answer)
    if not target:
        return False
    reply = prediction.strip()
    first_phrase = _PHRASE_BOUNDARY.split(reply, maxsplit=1)[0]
    first_word = reply.split(maxsplit=1)[0] if reply else ""
    return any(normalize_answer(candidate) == target for candidate in (reply, first_phrase, first_word))


def _yes_no_correct(prediction: str, answer: str) -> bool:
    """Compare the first "yes" or "no" word of the reply with the reference."""
    for word in normalize_answer(prediction).split():
        if word in _YES_NO:
            return word == normalize_answer(answer)
    return False


def _choice_correct(prediction: str, sample: Sample) -> bool:
    """Compare the option the reply picks (by option text or letter) with the reference letter."""
    chosen = _chosen_letter(prediction, sample.choices)
    return chosen is not None and chosen == (sample.answer or "").strip().upper()


def _chosen_letter(prediction: str, choices: list[str]) -> str | None:
    """The option letter a reply selects, or None when it names no option."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    reply = prediction.strip()
    # A reply that is exactly an option's text wins over reading its first word as a letter ("A cat").
    whole = normalize_answer(reply)
    for letter, choice in zip(letters, choices, strict=False):
        if whole and normalize_answer(choice) == whole:
            return letter
    for pattern in (_LEADING_LETTER, _STATED_LETTER):
        match = pattern.search(prediction)
        if match:
            letter = match.group(1)
            # Without choices (never the case for benchmark samples) any letter is taken at face value.
            if not letters or letter in letters:
                return letter
    first_phrase = normalize_answer(_PHRASE_BOUNDARY.split(reply, maxsplit=1)[0])
    for letter, choice in zip(letters, choices, strict=False):
        if first_phrase and normalize_answer(choice) == first_phrase:
            return letter
    return None
