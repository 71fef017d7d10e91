"""Definitions (builders/*/definition.yaml, user files) and the prompt plan."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from diffumask_datasets.definitions import (
    Definition,
    builtin_definitions,
    load_definition,
    mentions,
)
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.prompts import make_plan
from diffumask_datasets.resources import builders_dir

VOC_ORDER = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
    "motorbike person pottedplant sheep sofa train tvmonitor"
).split()

GOOD = """
name: fruit
defaults:
  images_per_class: 3
prompts:
  templates: ["a photo of a {sub_class} {class}"]
classes:
  - id: 1
    name: apple
    prompt: apple
    sub_classes: [red, green, Fuji]
  - id: 2
    name: banana
    prompt: banana
    sub_classes: [ripe, green]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(DiffuMaskError) as info:
        load_definition(write(tmp_path, text))
    return str(info.value)


# -- the built-in definitions ----------------------------------------------------------


def test_voc_has_the_twenty_classes_in_voc_order_with_dozens_of_sub_classes():
    voc = load_definition("voc")
    assert [c.name for c in voc.classes] == VOC_ORDER
    assert [c.id for c in voc.classes] == list(range(1, 21))
    assert voc.class_ids["bird"] == 3 and voc.class_ids["dog"] == 12
    assert voc.class_names[0] == "background"
    assert all(len(c.sub_classes) >= 24 for c in voc.classes)


def test_cityscapes_has_the_nineteen_train_id_classes():
    city = load_definition("diffumask-cityscapes")
    names = [c.name for c in city.classes]
    assert len(names) == 19 and names[0] == "road" and names[-1] == "bicycle"
    assert [c.id for c in city.classes] == list(range(1, 20))


def test_every_builtin_definition_loads_and_every_template_names_its_class():
    names = builtin_definitions()
    assert {"voc", "cityscapes"} <= set(names)
    for name in names:
        definition = load_definition(name)
        for item in make_plan(definition, 3, seed=1):
            for class_id in item.class_ids:
                cls = next(c for c in definition.classes if c.id == class_id)
                assert any(mentions(item.prompt, w) for w in cls.words), item


def test_the_generic_example_is_a_valid_definition():
    definition = load_definition(builders_dir() / "diffumask" / "example.yaml")
    assert definition.class_names == {0: "background", 1: "apple", 2: "banana", 3: "orange"}


def test_a_builtin_name_is_not_shadowed_by_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "voc").mkdir()  # e.g. a VOC export in the working directory
    monkeypatch.chdir(tmp_path)
    assert load_definition("voc").name == "voc"


# -- errors a user can cause -----------------------------------------------------------


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    message = error_of(tmp_path, GOOD.replace("sub_classes: [ripe", "sub_clases: [ripe"))
    assert "'sub_clases'" in message and "'sub_classes'" in message and "banana" in message


def test_unknown_top_level_key_is_named(tmp_path):
    message = error_of(tmp_path, GOOD + "clases: []\n")
    assert "'clases'" in message and "'classes'" in message


@pytest.mark.parametrize("name", ["fruit/banana", "..", "c:banana"])
def test_class_name_with_a_path_character_is_refused(tmp_path, name):
    message = error_of(tmp_path, GOOD.replace("name: banana", f"name: '{name}'"))
    assert f"name {name!r} contains the path character" in message


def test_duplicate_id_names_both_classes(tmp_path):
    message = error_of(tmp_path, GOOD.replace("id: 2", "id: 1"))
    assert "duplicate id 1" in message and "banana" in message and "apple" in message


def test_class_without_prompt_names_the_key_and_the_class(tmp_path):
    message = error_of(tmp_path, GOOD.replace("    prompt: banana\n", ""))
    assert "'prompt'" in message and "banana" in message


def test_template_that_never_names_the_class_is_refused(tmp_path):
    bad = GOOD.replace(
        "    sub_classes: [ripe, green]",
        "    sub_classes: [ripe, green]\n    templates: ['a photo of a {sub_class}{class}']",
    )
    message = error_of(tmp_path, bad)
    assert "banana" in message and "synonyms" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("id: 2", "id: 0", "1..254"),
        ("name: banana", "name: apple", "duplicate name"),
        ("{sub_class} {class}", "{sub_class} {klass}", "{klass}"),
        ("name: fruit", "name: My Fruit", "lower-case"),
    ],
)
def test_other_bad_values_are_named(tmp_path, old, new, expected):
    assert expected in error_of(tmp_path, GOOD.replace(old, new, 1))


def test_unknown_dataset_and_class_names_get_close_matches():
    with pytest.raises(DiffuMaskError, match="'voc'"):
        load_definition("vco")
    with pytest.raises(DiffuMaskError, match="'bird'"):
        load_definition("voc").select(["brid"])


def test_definition_round_trips_and_fingerprint_tracks_what_matters(tmp_path):
    definition = load_definition(write(tmp_path, GOOD))
    again = Definition.from_dict(definition.to_dict())
    assert again.to_dict() == definition.to_dict()
    assert again.fingerprint() == definition.fingerprint()
    retitled = Definition.from_dict({**definition.to_dict(), "title": "Other"})
    assert retitled.fingerprint() == definition.fingerprint()
    changed = load_definition(write(tmp_path, GOOD.replace("Fuji", "Gala")))
    assert changed.fingerprint() != definition.fingerprint()


# -- the prompt plan -------------------------------------------------------------------


def test_plan_is_deterministic_and_class_major():
    voc = load_definition("voc")
    plan = make_plan(voc, 5, classes=["dog", "bird"], seed=3)
    assert plan == make_plan(voc, 5, classes=["bird", "dog"], seed=3)  # order-free
    assert [p.index for p in plan] == list(range(10))
    assert [p.class_ids for p in plan] == [(3,)] * 5 + [(12,)] * 5
    assert make_plan(voc, 5, classes=["bird", "dog"], seed=4) != plan


def test_plan_seeds_come_from_sample_seed():
    from diffumask_datasets.generate import sample_seed

    plan = make_plan(load_definition("voc"), 2, classes=["cat"], seed=7)
    assert [p.seed for p in plan] == [sample_seed(7, 0), sample_seed(7, 1)]


def test_sub_classes_are_each_used_once_before_any_repeats():
    voc = load_definition("voc")
    bird = voc.get("bird")
    n = len(bird.sub_classes)
    plan = make_plan(voc, n, classes=["bird"], seed=0)
    used = {s for p in plan for s in bird.sub_classes if f" {s} bird" in p.prompt}
    assert used == set(bird.sub_classes)


def test_adding_a_class_keeps_the_prompts_of_the_others():
    voc = load_definition("voc")
    alone = make_plan(voc, 4, classes=["dog"], seed=0)
    together = make_plan(voc, 4, classes=["bird", "dog"], seed=0)
    assert [p.prompt for p in together[4:]] == [p.prompt for p in alone]


def test_two_classes_per_image():
    voc = load_definition("voc")
    plan = make_plan(voc, 6, classes=["bird", "dog", "cat"], seed=0, two_classes=True)
    assert all(len(p.class_ids) == 2 and p.class_ids[0] != p.class_ids[1] for p in plan)
    for p in plan:
        for name in p.class_names:
            assert any(mentions(p.prompt, w) for w in voc.get(name).words), p
    half = make_plan(voc, 40, classes=["bird", "dog"], seed=0, two_classes=0.5)
    pairs = sum(len(p.class_ids) == 2 for p in half)
    assert 20 < pairs < 60
    with pytest.raises(DiffuMaskError, match="two classes"):
        make_plan(voc, 2, classes=["bird"], two_classes=True)


@pytest.mark.parametrize(
    "kwargs",
    [{"images_per_class": 0}, {"images_per_class": 2, "seed": -1}, {"images_per_class": 2.5}],
)
def test_plan_refuses_bad_numbers(kwargs):
    with pytest.raises(DiffuMaskError):
        make_plan(load_definition("voc"), **kwargs)
