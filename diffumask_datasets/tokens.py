"""Which text-token positions of a prompt belong to a class.

A class word is found by tokenizing it alone and looking for that run of token ids in
the tokenized prompt. With CLIP's BPE a word splits into the same pieces on its own as
inside a sentence, so "aeroplane" -> 'aerop' + 'lane' and "potted plant" -> 'potted' +
'plant' are found as runs of pieces; every matched piece is kept and the maps averaged.
"""

from __future__ import annotations

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
