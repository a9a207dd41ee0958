"""The recaption quality gate: whether a generated caption is stored, or the alt
text stays (see `stages/recaption.py` for the checks and their order), and the
record a generation turns into. Plain Python, no Beam."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from schemas import RecaptionStatus, SampleRecord
from schemas.scoring import RecaptionConfig

_MAX_LOOP_NGRAM = 8
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")


def caption_words(text: str) -> list[str]:
    """Lower-cased words (runs of letters/digits, apostrophes inside) of `text`."""
    return [w.lower() for w in _WORD.findall(text)]


def echoes_prompt(words: Sequence[str], prompt_words: Sequence[str], max_overlap: float) -> bool:
    """True when `words` contain the whole prompt as a contiguous run, or when at
    least `max_overlap` (a fraction, 0-1] of them are words of the prompt."""
    if not words or not prompt_words:
        return False
    n = len(prompt_words)
    prompt_run = list(prompt_words)
    if any(list(words[i : i + n]) == prompt_run for i in range(len(words) - n + 1)):
        return True
    vocabulary = set(prompt_words)
    return sum(w in vocabulary for w in words) / len(words) >= max_overlap


def is_looping(text: str, words: Sequence[str], max_repeats: int) -> bool:
    """True when a word n-gram (n <= 8) occurs `max_repeats` times back to back
    ("on a mat on a mat on a mat"), or a run of 3 to 40 characters does
    ("hahahaha...", "..........."), the usual failure of greedy decoding."""
    if max_repeats < 2:
        raise ValueError(f"max_repeats must be >= 2 to detect a repeat, got {max_repeats}")
    words = list(words)
    for n in range(1, _MAX_LOOP_NGRAM + 1):
        span = n * max_repeats
        for start in range(len(words) - span + 1):
            gram = words[start : start + n]
            if all(words[start + k * n : start + (k + 1) * n] == gram for k in range(1, max_repeats)):
                return True
    return re.search(r"(.{3,40}?)\1{%d,}" % (max_repeats - 1), text, flags=re.DOTALL) is not None


def gate_caption(text: str, *, prompt: str, truncated: bool, config: RecaptionConfig) -> RecaptionStatus:
    """The quality gate for one generated caption (see the module docstring).

    Args:
        text: the decoded caption, special tokens removed.
        prompt: the user prompt (`config.prompt`, without the chat template).
        truncated: generation stopped at `max_new_tokens` without end-of-sequence.
    Returns:
        `RecaptionStatus.OK` or the first failed check.
    """
    words = caption_words(text)
    if not words:
        return RecaptionStatus.EMPTY
    if config.max_prompt_overlap is not None and echoes_prompt(
        words, caption_words(prompt), config.max_prompt_overlap
    ):
        return RecaptionStatus.PROMPT_ECHO
    if config.min_words and len(words) < config.min_words:
        return RecaptionStatus.TOO_SHORT
    if config.max_repeats and is_looping(text, words, config.max_repeats):
        return RecaptionStatus.LOOPING
    if config.reject_truncated and truncated:
        return RecaptionStatus.TRUNCATED
    return RecaptionStatus.OK


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated caption. `num_tokens` counts generated tokens up to and
    including end-of-sequence; `finished` is False when `max_new_tokens` ran out."""

    text: str
    num_tokens: int
    finished: bool


def apply_generation(record: SampleRecord, generation: Generation, config: RecaptionConfig) -> SampleRecord:
    """The record with `recaption_status` set, and `caption_synthetic` set only
    when the gate passes (None otherwise: the alt text stays the caption)."""
    text = generation.text.strip()
    status = gate_caption(text, prompt=config.prompt, truncated=not generation.finished, config=config)
    return record.model_copy(
        update={
            "caption_synthetic": text if status is RecaptionStatus.OK else None,
            "recaption_status": status,
        }
    )
