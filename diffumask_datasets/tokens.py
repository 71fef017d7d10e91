"""Which text-token positions of a prompt belong to a class.

CLIP: a class word is found by tokenizing it alone and looking for that run of token ids
in the tokenized prompt. With CLIP's BPE a word splits into the same pieces on its own as
inside a sentence, so "aeroplane" -> 'aerop' + 'lane' and "potted plant" -> 'potted' +
'plant' are found as runs of pieces; every matched piece is kept and the maps averaged.

T5 (SD3, FLUX.1): sentencepiece pieces of a word depend on what precedes it (a word
starts with "▁"), so a class word is found as characters in the prompt and its pieces
through the tokenizer's offsets: every piece overlapping an occurrence is kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .errors import DiffuMaskError


def _phrase_ids(tokenizer, phrase: str) -> list[int]:
    return list(tokenizer(phrase, add_special_tokens=False).input_ids)


def _find_runs(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    """Start positions of every occurrence of `needle` in `haystack`."""
    n = len(needle)
    if n == 0:
        return []
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i : i + n]) == list(needle)]


def candidate_phrases(class_name: str, synonyms: Iterable[str] = ()) -> list[str]:
    """The words that may name a class in a prompt: its name, synonyms, simple plurals."""
    phrases = []
    for phrase in [class_name, *synonyms]:
        phrase = phrase.strip()
        for form in (phrase, phrase + "s", phrase + "es"):
            if form and form not in phrases:
                phrases.append(form)
    return phrases


def find_class_tokens(
    tokenizer, prompt: str, class_name: str, synonyms: Iterable[str] = ()
) -> list[int]:
    """Positions (in the padded, BOS-first encoding the text encoder sees) of the tokens
    naming `class_name` in `prompt`.

    Raises DiffuMaskError when the class is absent from the prompt, or present only past
    the tokenizer's length limit (it would be cut off and never reach the model).
    """
    ids = list(tokenizer(prompt, truncation=False).input_ids)
    # The last slot of the model's window holds the end token, so a class word has to
    # end before it.
    limit = int(getattr(tokenizer, "model_max_length", 77) or 77) - 1
    found: set[int] = set()
    cut_off = False
    for phrase in candidate_phrases(class_name, synonyms):
        piece = _phrase_ids(tokenizer, phrase)
        for start in _find_runs(ids, piece):
            positions = range(start, start + len(piece))
            if positions[-1] < limit:
                found.update(positions)
            else:
                cut_off = True
    if found:
        return sorted(found)
    if cut_off:
        raise DiffuMaskError(
            f"class {class_name!r} is cut off by the {limit + 1}-token limit in prompt "
            f"{prompt!r}; shorten the prompt or name the class earlier"
        )
    raise DiffuMaskError(
        f"class {class_name!r} does not appear in prompt {prompt!r}; name it in the prompt "
        "or add the word used as a synonym"
    )


def class_token_indices(
    tokenizer,
    prompt: str,
    classes: Sequence[str],
    synonyms: dict[str, Sequence[str]] | None = None,
) -> dict[str, list[int]]:
    """{class name: token positions} for every class of one prompt."""
    synonyms = synonyms or {}
    return {
        name: find_class_tokens(tokenizer, prompt, name, synonyms.get(name, ())) for name in classes
    }


def _phrase_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans of whole-word, case-insensitive occurrences of `phrase`."""
    words = phrase.split()
    if not words:
        return []
    pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, words)) + r"(?!\w)"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def t5_encoding(tokenizer, prompt: str, max_length: int):
    """The T5 encoding of `prompt` with offsets; a prompt T5 would cut off is an error
    (its end, and any class named there, would never reach the model)."""
    encoding = tokenizer(prompt, return_offsets_mapping=True, truncation=False)
    count = len(encoding.input_ids)
    if count > max_length:
        raise DiffuMaskError(
            f"prompt {prompt!r} is {count} T5 tokens, more than max_sequence_length="
            f"{max_length}; shorten the prompt to at most {max_length} tokens"
        )
    return encoding


def find_t5_class_tokens(
    tokenizer, prompt: str, class_name: str, synonyms: Iterable[str] = (), max_length: int = 512
) -> list[int]:
    """Positions (in T5's sequence: no start token, padded to max_length) of the pieces
    naming `class_name` in `prompt`, every occurrence; DiffuMaskError if it is absent."""
    offsets = t5_encoding(tokenizer, prompt, max_length).offset_mapping
    spans = [
        s
        for phrase in candidate_phrases(class_name, synonyms)
        for s in _phrase_spans(prompt, phrase)
    ]
    found = [
        i
        for i, (start, end) in enumerate(offsets)
        if end > start and any(start < b and end > a for a, b in spans)
    ]
    if not found:
        raise DiffuMaskError(
            f"class {class_name!r} does not appear in prompt {prompt!r}; name it in the prompt "
            "or add the word used as a synonym"
        )
    return found
