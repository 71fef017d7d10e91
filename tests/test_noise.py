"""Noise learning's parts: the corruptions the noise benchmark injects, combining scores,
the run clock, and what clean refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_quality import FAST, make_store

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.quality import TrainSettings
from diffumask_datasets.quality import corruptions as cr
from diffumask_datasets.quality.clean import clean_store, combine_scores


def two_objects() -> np.ndarray:
    """A 12x12 mask: a 4x4 class 1 at the top left, a 3x3 class 3 at the bottom right,
    one ignored pixel."""
    mask = np.zeros((12, 12), np.uint8)
    mask[1:5, 1:5] = 1
    mask[7:10, 7:10] = 3
    mask[0, 11] = 255
    return mask


def test_object_ids_leave_out_background_and_ignore():
    assert cr.object_ids(two_objects()) == [1, 3]
    assert cr.object_ids(np.zeros((3, 3), np.uint8)) == []


def test_from_other_takes_the_other_layout_in_its_own_classes():
    mine = np.zeros((12, 12), np.uint8)
    mine[0:2, 0:2] = 2
    other = two_objects()
    out = cr.from_other(mine, other)
    # other's class 1 and class 3 both become mine's only class, 2; where mine was is now 0
    assert set(np.unique(out)) == {0, 2, 255}
    assert np.array_equal(out == 2, (other == 1) | (other == 3))
    assert out[0, 11] == 255
    assert out[0, 0] == 0


def test_partial_keeps_about_the_share_on_one_side_of_a_cut():
    mask = two_objects()
    out = cr.partial(mask, angle=0.0, share=0.5)  # keep the right half of each object
    assert (out == 1).sum() == 8 and (out == 3).sum() in (3, 6)
    assert np.all(out[1:5, 3:5] == 1) and np.all(out[1:5, 1:3] == 0)
    assert np.all((out != 0) <= (mask != 0))  # only ever shrinks
    assert out[0, 11] == 255
    with pytest.raises(DiffuMaskError, match="partial share 0"):
        cr.partial(mask, 0.0, 0.0)


def test_bleed_grows_each_object_to_at_least_the_factor_into_background_only():
    mask = two_objects()
    out = cr.bleed(mask, growth=2.0)
    assert (out == 1).sum() >= 32 and (out == 3).sum() >= 18
    assert np.all(out[mask == 1] == 1) and np.all(out[mask == 3] == 3)  # nothing lost
    assert out[0, 11] == 255  # ignore stays
    # an object that fills every background pixel stops growing
    full = np.ones((4, 4), np.uint8)
    assert np.array_equal(cr.bleed(full, 3.0), full)
    with pytest.raises(DiffuMaskError, match="below 1"):
        cr.bleed(mask, 0.5)


def test_drop_class_and_swap_classes():
    mask = two_objects()
    dropped = cr.drop_class(mask, 3)
    assert cr.object_ids(dropped) == [1] and (dropped == 0).sum() == (mask == 0).sum() + 9
    swapped = cr.swap_classes(mask, 1, 3)
    assert np.array_equal(swapped == 3, mask == 1) and np.array_equal(swapped == 1, mask == 3)
    assert np.array_equal(cr.swap_classes(swapped, 1, 3), mask)


def test_corrupt_changes_exactly_the_share_it_reports_and_is_seeded():
    single = np.zeros((12, 12), np.uint8)
    single[2:6, 2:6] = 2
    masks = [two_objects() if i % 2 else single.copy() for i in range(20)]
    for kind in cr.KINDS:
        out, picked = cr.corrupt(masks, kind, 0.25, seed=1)
        assert len(picked) == 5
        changed = [i for i in range(20) if not np.array_equal(out[i], masks[i])]
        if kind != "other":  # another image's mask may equal this one
            assert changed == picked, kind
        else:
            assert set(changed) <= set(picked)
        if kind in cr.MULTI_CLASS_KINDS:
            assert all(i % 2 for i in picked)  # only masks with two classes
        assert cr.corrupt(masks, kind, 0.25, seed=1)[1] == picked
    with pytest.raises(DiffuMaskError, match=r"11 masks to corrupt with 'swap' but only 10"):
        cr.corrupt(masks, "swap", 0.55)
    with pytest.raises(DiffuMaskError, match="unknown corruption 'blur'"):
        cr.corrupt(masks, "blur", 0.1)


def test_combine_scores_averages_ranks_not_values():
    a = np.array([0.9, 0.1, 0.5, 0.2])
    b = np.array([100.0, 300.0, 200.0, 0.0])  # another scale: only its order counts
    combined = combine_scores([a, b])
    assert np.allclose(combined, [(1 + 1 / 3) / 2, (0 + 1) / 2, (2 / 3 + 2 / 3) / 2, (1 / 3) / 2])
    assert np.allclose(combine_scores([a]), [1, 0, 2 / 3, 1 / 3])
    # a NaN score ranks worst
    assert combine_scores([np.array([np.nan, 0.5])])[0] == 0.0


def test_clean_refuses_a_store_without_masks(tmp_path):
    from diffumask_datasets.store import open_store, write_store

    store = make_store(tmp_path / "s", 4)
    blank = []
    for record in store.records():
        record.mask = np.where(record.mask == 255, 255, 0).astype(np.uint8)
        blank.append(record)
    write_store(tmp_path / "blank", blank, store.manifest)
    with pytest.raises(DiffuMaskError, match="has no masks to clean: every mask is background"):
        clean_store(open_store(tmp_path / "blank"), tmp_path / "C", 2, 0.5, FAST, progress=False)
    assert not (tmp_path / "C").exists()


def test_clean_prints_an_estimate_of_the_whole_run(tmp_path, capsys):
    store = make_store(tmp_path / "s", 6)
    fcn = TrainSettings(steps=3, batch_size=4, size=32, segmenter="builtin:fcn")
    clean_store(store, tmp_path / "C", 2, 0.5, fcn, progress=True)
    err = capsys.readouterr().err
    # the estimate comes once, after the first steps, and names what runs where
    assert err.count("noise learning: 2 trainings of builtin:fcn at 32 px, 3 steps") == 1
    assert "on cpu: about" in err


def test_clean_stores_both_scores_and_ranks_by_the_one_asked_for(tmp_path):
    from diffumask_datasets.store import open_store, write_store

    store = make_store(tmp_path / "s", 8)
    varied = []
    for record in store.records():
        record.quality = [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4][record.index]
        varied.append(record)
    write_store(tmp_path / "q", varied, store.manifest)
    fcn = TrainSettings(steps=2, batch_size=4, size=32, segmenter="builtin:fcn")
    runs = {}
    for rank_by in ("consistency", "combined"):
        cleaned, summary = clean_store(
            open_store(tmp_path / "q"), tmp_path / rank_by, 2, 0.5, fcn, False, False, rank_by
        )
        runs[rank_by] = summary
        order = [summary["consistency" if rank_by == "consistency" else "combined_score"]]
        best = sorted(order[0], key=lambda k: (-order[0][k], int(k)))[:4]
        assert sorted(r.index for r in cleaned.records()) == sorted(int(k) for k in best)
        for record in cleaned.records():
            assert record.meta["consistency"] == summary["consistency"][str(record.index)]
            assert record.meta["combined_score"] == summary["combined_score"][str(record.index)]
    first = runs["consistency"]
    consistency = np.array([first["consistency"][str(i)] for i in range(8)])
    quality = np.array([r.quality for r in varied])
    expected = combine_scores([consistency, quality])
    assert [first["combined_score"][str(i)] for i in range(8)] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(DiffuMaskError, match="--rank-by 'area' is not a score"):
        clean_store(store, tmp_path / "x", 2, 0.5, fcn, progress=False, rank_by="area")


# -- the command line ------------------------------------------------------------------------


def test_clean_on_the_command_line_trains_the_clean_defaults_unless_told(tmp_path):
    import json

    from test_cli import invoke

    store = make_store(tmp_path / "s", 6)
    result = invoke(
        "clean", str(store.path), "--folds", "2", "--train-steps", "3", "--to", str(tmp_path / "C")
    )
    assert result.exit_code == 0, result.output
    assert "kept 5 of 6 samples" in result.stdout
    used = json.loads((tmp_path / "C" / "manifest.json").read_text())["clean"]
    assert used["segmenter"]["segmenter"] == "builtin:fcn" and used["segmenter"]["size"] == 64
    assert used["segmenter"]["steps"] == 3 and used["rank_by"] == "consistency"
    result = invoke(
        "clean", str(store.path), "--folds", "2", "--train-steps", "3", "--size", "16",
        "--rank-by", "combined", "--to", str(tmp_path / "D"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "D" / "manifest.json").read_text())["clean"]
    assert used["segmenter"]["size"] == 16 and used["rank_by"] == "combined"


def test_clean_on_the_command_line_refuses_bad_input_in_one_line(tmp_path):
    from test_cli import assert_one_line_error, invoke

    from diffumask_datasets.store import write_store

    store = make_store(tmp_path / "s", 4)
    result = invoke("clean", str(store.path), "--rank-by", "area", "--to", str(tmp_path / "C"))
    assert_one_line_error(result, "--rank-by 'area'", "consistency", "combined")
    blank = []
    for record in store.records():
        record.mask = np.zeros_like(record.mask)
        blank.append(record)
    write_store(tmp_path / "blank", blank, store.manifest)
    result = invoke("clean", str(tmp_path / "blank"), "--folds", "2", "--to", str(tmp_path / "C"))
    assert_one_line_error(result, "has no masks to clean", "background or ignore")
    assert not (tmp_path / "C").exists()


def test_the_run_estimate_leaves_out_the_slow_first_steps(monkeypatch, capsys):
    import time

    from diffumask_datasets.quality.clean import RunClock

    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = RunClock(100, "run")
    for step in range(100):
        now[0] += 10.0 if step < 5 else 1.0  # building the model: slow; then 1 s a step
        clock()
    clock.close()
    # 50 s + 20 s timed, then 75 steps of 1 s: 145 s; timing every step from the start
    # would have said 70 / 25 * 100 = 280 s
    assert "run: about 2 min" in capsys.readouterr().err


def test_ten_training_steps_train(tmp_path):
    # torch's OneCycleLR divided by zero when a tenth of the steps was exactly one step
    from diffumask_datasets.quality import train_segmenter

    records = list(make_store(tmp_path / "s", 4).records())
    settings = TrainSettings(steps=10, batch_size=2, size=16, segmenter="builtin:fcn")
    segmenter = train_segmenter([r.image for r in records], [r.mask for r in records], 5, settings)
    assert segmenter.predict([records[0].image])[0].shape == records[0].mask.shape


# -- agreement with a re-labelling ---------------------------------------------------------


def test_agreement_is_the_masks_iou_with_the_relabelling_over_its_classes():
    from diffumask_datasets.quality.agreement import agreement_of

    relabel = np.zeros((4, 4), np.uint8)
    relabel[:2, :2] = 1
    same, grown, other = relabel.copy(), relabel.copy(), np.zeros_like(relabel)
    grown[:3, :3] = 1
    other[2:, 2:] = 1
    scores = agreement_of([same, grown, other], [relabel] * 3, [[1]] * 3)
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx((4 / 9 + 7 / 12) / 2)  # class 1, then background
    assert scores[2] < scores[1]
    # pixels the re-labelling is unsure of (255) are left out of the score
    unsure = relabel.copy()
    unsure[2, :] = 255
    unsure[:3, 2] = 255
    assert agreement_of([grown], [unsure], [[1]])[0] > scores[1]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A store the shapes model generated: its samples name the model that made them."""
    from test_cli import invoke

    out = tmp_path_factory.mktemp("gen") / "store"
    result = invoke("generate", "shapes", "--per-class", "2", "--steps", "6", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_clean_relabels_with_the_generating_model_and_ranks_by_both_by_default(generated, tmp_path):
    from diffumask_datasets.store import open_store

    fcn = TrainSettings(steps=2, batch_size=4, size=32, segmenter="builtin:fcn")
    cleaned, summary = clean_store(generated, tmp_path / "C", 2, 0.5, fcn, progress=False)
    assert summary["relabel_model"] == "builtin:shapes" and summary["rank_by"] == "combined"
    order = sorted(summary["agreement"], key=int)
    consistency = np.array([summary["consistency"][k] for k in order])
    agreement = np.array([summary["agreement"][k] for k in order])
    assert 0.0 <= agreement.min() and agreement.max() <= 1.0 and np.ptp(agreement) > 0
    expected = combine_scores([consistency, agreement])
    assert [summary["combined_score"][k] for k in order] == pytest.approx(expected, abs=1e-3)
    best = sorted(order, key=lambda k: (-summary["combined_score"][k], int(k)))[:4]
    assert sorted(r.index for r in cleaned.records()) == sorted(int(k) for k in best)
    for record in cleaned.records():
        assert record.meta["agreement"] == summary["agreement"][str(record.index)]
    # the same store without the re-labelling ranks by consistency, as before
    _, alone = clean_store(
        open_store(generated), tmp_path / "D", 2, 0.5, fcn, progress=False, relabel=False
    )
    assert alone["rank_by"] == "consistency" and "agreement" not in alone


def test_a_store_that_names_no_model_is_relabelled_only_with_one_given(tmp_path, capsys):
    store = make_store(tmp_path / "s", 6)
    fcn = TrainSettings(steps=2, batch_size=4, size=32, segmenter="builtin:fcn")
    _, summary = clean_store(store, tmp_path / "A", 2, 0.5, fcn, progress=True)
    assert "agreement" not in summary and summary["rank_by"] == "consistency"
    assert "name no generating model" in capsys.readouterr().err
    _, summary = clean_store(
        store, tmp_path / "B", 2, 0.5, fcn, progress=False, relabel_model="builtin:shapes"
    )
    assert summary["relabel_model"] == "builtin:shapes" and len(summary["agreement"]) == 6
    with pytest.raises(DiffuMaskError, match="--relabel-model builtin:shapes"):
        clean_store(store, tmp_path / "C", 2, 0.5, fcn, progress=False, relabel=True)
    with pytest.raises(DiffuMaskError, match="--rank-by agreement needs the re-labelling"):
        clean_store(store, tmp_path / "D", 2, 0.5, fcn, progress=False, rank_by="agreement")
    assert not any((tmp_path / d).exists() for d in "CD")


def test_clean_on_the_command_line_relabels_unless_told(generated, tmp_path):
    import json

    from test_cli import invoke

    flags = ["--folds", "2", "--train-steps", "2", "--size", "32"]
    result = invoke("clean", str(generated), *flags, "--to", str(tmp_path / "C"))
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "C" / "manifest.json").read_text())["clean"]
    assert used["rank_by"] == "combined" and used["relabel_model"] == "builtin:shapes"
    result = invoke("clean", str(generated), *flags, "--no-relabel", "--to", str(tmp_path / "D"))
    assert result.exit_code == 0, result.output
    used = json.loads((tmp_path / "D" / "manifest.json").read_text())["clean"]
    assert used["rank_by"] == "consistency" and "agreement" not in used
