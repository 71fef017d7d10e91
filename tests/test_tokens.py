import pytest

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.models import clip_tokenizer
from diffumask_datasets.tokens import class_token_indices, find_class_tokens


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def pieces(tok, prompt, positions):
    ids = tok(prompt).input_ids
    return [tok.convert_ids_to_tokens(ids[p]) for p in positions]


def test_real_clip_vocabulary(tok):
    assert len(tok.get_vocab()) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_single_word(tok):
    prompt = "a photo of a sparrow bird"
    assert pieces(tok, prompt, find_class_tokens(tok, prompt, "bird")) == ["bird</w>"]


def test_sub_word_pieces(tok):
    prompt = "photo of an aeroplane in the sky"
    assert pieces(tok, prompt, find_class_tokens(tok, prompt, "aeroplane")) == ["aerop", "lane</w>"]


def test_synonym_multi_word_and_plural(tok):
    prompt = "two potted plants next to an airplane and a tv monitor"
    found = class_token_indices(
        tok,
        prompt,
        ["pottedplant", "aeroplane", "tvmonitor"],
        {"pottedplant": ["potted plant"], "aeroplane": ["airplane"], "tvmonitor": ["tv monitor"]},
    )
    assert pieces(tok, prompt, found["pottedplant"]) == ["potted</w>", "plants</w>"]
    assert pieces(tok, prompt, found["aeroplane"]) == ["airplane</w>"]
    assert pieces(tok, prompt, found["tvmonitor"]) == ["tv</w>", "monitor</w>"]


def test_every_occurrence_is_kept(tok):
    prompt = "a dog chasing another dog"
    assert len(find_class_tokens(tok, prompt, "dog")) == 2


def test_absent_class_names_prompt_and_class(tok):
    with pytest.raises(DiffuMaskError, match=r"'cat'.*'a photo of a dog'"):
        find_class_tokens(tok, "a photo of a dog", "cat")


def test_cut_off_class_is_an_error(tok):
    prompt = "a photo " + "of a very long story " * 20 + "with a cat"
    with pytest.raises(DiffuMaskError, match=r"'cat' is cut off by the 77-token limit"):
        find_class_tokens(tok, prompt, "cat")
