import pytest

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.models import clip_tokenizer
from diffumask_datasets.tokens import class_token_indices, find_class_tokens


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


CLIP_TOKENS = 77  # SD3's CLIP tokens (and the tiny built-in's), before T5's


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


# -- T5 (SD3, FLUX.1): sentencepiece pieces found through offsets -------------------------


@pytest.fixture(scope="module")
def t5():
    from diffumask_datasets.models import t5_tokenizer

    return t5_tokenizer()


def t5_pieces(t5, prompt, positions):
    ids = t5(prompt).input_ids
    return [t5.convert_ids_to_tokens(ids[p]) for p in positions]


def test_t5_sub_word_pieces_through_offsets(t5):
    from diffumask_datasets.tokens import find_t5_class_tokens

    prompt = "a photo of an aeroplane in the sky"
    found = find_t5_class_tokens(t5, prompt, "aeroplane")
    assert t5_pieces(t5, prompt, found) == ["\u2581aero", "plane"]
    # the word inside another word is not the class
    prompt = "a catamaran and a cat"
    assert t5_pieces(t5, prompt, find_t5_class_tokens(t5, prompt, "cat")) == ["\u2581cat"]


def test_t5_every_occurrence_case_plural_and_phrase(t5):
    from diffumask_datasets.tokens import find_t5_class_tokens

    prompt = "Two Dogs and a dog next to a potted plant."
    assert t5_pieces(t5, prompt, find_t5_class_tokens(t5, prompt, "dog")) == [
        "\u2581D",
        "o",
        "gs",
        "\u2581dog",
    ]
    found = find_t5_class_tokens(t5, prompt, "pottedplant", ["potted plant"])
    assert "".join(t5_pieces(t5, prompt, found)) == "\u2581pot" + "ted" + "\u2581plant"


def test_t5_absent_class_and_too_long_prompt_are_errors(t5):
    from diffumask_datasets.tokens import find_t5_class_tokens

    with pytest.raises(DiffuMaskError, match=r"'cat' does not appear in prompt 'a photo of a dog'"):
        find_t5_class_tokens(t5, "a photo of a dog", "cat")
    prompt = "a cat " + "in a very long story " * 30
    with pytest.raises(
        DiffuMaskError, match=r"is 153 T5 tokens, more than max_sequence_length=128; shorten"
    ):
        find_t5_class_tokens(t5, prompt, "cat", max_length=128)


def test_sd3_positions_are_clip_then_t5_in_the_joint_text():
    from diffumask_datasets.families import family_of
    from diffumask_datasets.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-random-sd3")
    family = family_of(pipe)
    prompt = "a photo of an aeroplane"
    positions = family.token_positions(prompt, ["aeroplane"], None)["aeroplane"]
    assert positions == [5, 6, CLIP_TOKENS + 4, CLIP_TOKENS + 5]  # T5's after CLIP's 77
    # past CLIP's 77 tokens the class is still read from T5
    long = "a photo " + "of a very long story " * 20 + "with a cat"
    positions = family.token_positions(long, ["cat"], None)["cat"]
    assert len(positions) == 1 and positions[0] > CLIP_TOKENS


def test_flux_positions_are_t5_positions():
    from diffumask_datasets.families import family_of
    from diffumask_datasets.models import load_pipeline

    family = family_of(load_pipeline("builtin:tiny-random-flux"))
    assert family.token_positions("a sparrow bird", ["bird"], None) == {"bird": [3]}
    with pytest.raises(DiffuMaskError, match=r"'dog' does not appear"):
        family.token_positions("a sparrow bird", ["dog"], None)
