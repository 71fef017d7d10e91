"""Capture of MMDiT transformers (SD3, SD3.5, FLUX.1) on the tiny built-ins."""

import numpy as np
import pytest
import torch
from tiny import tiny_settings

from diffumask_datasets import DiffuMask
from diffumask_datasets.capture import CaptureOptions, trace
from diffumask_datasets.capture import mmdit as capture_mmdit
from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.families import SD3Family, family_of
from diffumask_datasets.models import load_pipeline
from diffumask_datasets.store import open_store

FAMILIES = ["builtin:tiny-random-sd3", "builtin:tiny-random-flux"]
PROMPTS = ["a photo of an aeroplane", "a dog on the grass"]
CLASSES = ["aeroplane", "dog"]


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    pipe = load_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tokens(pipe, prompts=PROMPTS, classes=CLASSES):
    family = family_of(pipe)
    return [family.token_positions(p, [c], None)[c] for p, c in zip(prompts, classes, strict=True)]


def run(pipe, prompts=PROMPTS, seeds=(1, 2), **kwargs):
    latents = family_of(pipe).latents(list(seeds), 64, 64)
    kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np", **kwargs}
    return pipe(prompt=list(prompts), latents=latents, guidance_scale=4.0, **kwargs).images


def options(pipe, **kwargs):
    return CaptureOptions(conditional_half=family_of(pipe).conditional_half(4.0), **kwargs)


@pytest.mark.parametrize("kernel", ["cpu-log-sum-exp", "generic"])
def test_capture_does_not_change_the_image(pipe, kernel, monkeypatch):
    if kernel == "generic":  # the path of GPUs, masks and other attention backends
        monkeypatch.setattr("diffumask_datasets.capture.sums._CPU_FLASH", None)
    plain = run(pipe)
    with trace(pipe, tokens(pipe), options(pipe, affinity_factor=1)) as cap:
        captured = run(pipe)
    assert np.abs(plain - captured).max() == 0
    result = cap.result()
    assert result.steps == 2
    layers = 2 if isinstance(pipe.transformer, capture_mmdit.SD3Transformer2DModel) else 4
    assert result.layers == {(4, 4): layers}  # every layer that attends to the text
    maps = result.cross[(4, 4)]
    assert maps.shape == (2, 4, 4, 4) or maps.shape == (2, 2, 4, 4)
    # per-token spatial normalisation: each kept token's map is a distribution over the image
    np.testing.assert_allclose(maps.sum(axis=(-1, -2)), 1.0, rtol=1e-5)
    assert result.affinity.shape == (2, 16, 16) and result.affinity_size == (4, 4)
    np.testing.assert_allclose(result.affinity.sum(axis=-1), 1.0, rtol=1e-5)


def reference_joint(attn, hidden, context, rotary, image_first: bool):
    """softmax(QK^T / sqrt(d)) of the whole joint sequence, from the module's projections
    (with RoPE for FLUX.1): [batch, heads, sequence, sequence], and the image slice."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    q, k = heads(attn.to_q(hidden)), heads(attn.to_k(hidden))
    if attn.norm_q is not None:
        q, k = attn.norm_q(q), attn.norm_k(k)
    if context is not None:
        cq, ck = heads(attn.add_q_proj(context)), heads(attn.add_k_proj(context))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q = torch.cat([q, cq] if image_first else [cq, q], dim=1)
        k = torch.cat([k, ck] if image_first else [ck, k], dim=1)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    return torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1)


@pytest.mark.parametrize("kernel", ["cpu-log-sum-exp", "generic"])
@pytest.mark.parametrize(
    "name, block",
    [(FAMILIES[0], "joint"), (FAMILIES[1], "joint"), (FAMILIES[1], "single")],
)
def test_probabilities_equal_a_reference_softmax_over_the_joint_row(
    name, block, kernel, monkeypatch
):
    """The kept probabilities are those of the whole joint row (text and image keys, RoPE
    on FLUX.1), in the joint (double-stream) and FLUX.1's single-stream blocks."""
    if kernel == "generic":
        monkeypatch.setattr("diffumask_datasets.capture.sums._CPU_FLASH", None)
    model = load_pipeline(name).transformer
    flux = isinstance(model, capture_mmdit.FluxTransformer2DModel)
    kept = []
    real = capture_mmdit.attend_keeping_columns
    monkeypatch.setattr(
        capture_mmdit,
        "attend_keeping_columns",
        lambda *a, **k: kept.append(real(*a, **k)) or kept[-1],
    )
    torch.manual_seed(0)
    prompts, images, text = 2, 16, 12
    columns = [[1, 3], [7]]
    sums = capture_mmdit._Sums(columns, CaptureOptions(conditional_half=not flux), "test")
    sums.begin_call(torch.tensor([500.0]), (4, 4), text)
    rows = prompts if flux else 2 * prompts
    rotary = None
    if flux:
        ids = torch.cat([torch.zeros(text, 3), torch.rand(images, 3) * 4])
        rotary = model.pos_embed(ids)
    if block == "joint":
        attn = model.transformer_blocks[0].attn
        hidden = torch.randn(rows, images, attn.query_dim)
        context = torch.randn(rows, text, attn.added_kv_proj_dim)
        processor = (
            capture_mmdit.FluxCaptureProcessor(
                sums, model.attn_processors["transformer_blocks.0.attn.processor"], False
            )
            if flux
            else capture_mmdit.JointCaptureProcessor(sums, False)
        )
        with torch.no_grad():
            processor(attn, hidden, context, image_rotary_emb=rotary) if flux else processor(
                attn, hidden, context
            )
            probs = reference_joint(attn, hidden, context, rotary, image_first=not flux)
    else:
        attn = model.single_transformer_blocks[0].attn
        hidden = torch.randn(rows, text + images, attn.query_dim)
        processor = capture_mmdit.FluxCaptureProcessor(
            sums, model.attn_processors["single_transformer_blocks.0.attn.processor"], False
        )
        with torch.no_grad():
            processor(attn, hidden, image_rotary_emb=rotary)
            probs = reference_joint(attn, hidden, None, rotary, image_first=False)
    ((_, got),) = kept  # [P, heads, image queries, kept columns]
    image = slice(0, images) if not flux else slice(text, None)
    offset = images if not flux else 0
    conditional = probs[rows - prompts :]
    for p, cols in enumerate(columns):
        for c, token in enumerate(cols):
            expected = conditional[p, :, image, offset + token]
            torch.testing.assert_close(got[p, :, :, c], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model", ["builtin:tiny-random-sd3", "builtin:tiny-random-flux"])
def test_affinity_steps_take_the_affinity_from_those_steps_alone(model):
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, tokens(pipe), options(pipe, affinity_factor=1, affinity_steps=(1, 2))) as late:
        run(pipe)
    with trace(pipe, tokens(pipe), options(pipe, affinity_factor=1, steps=(1, 2))) as only:
        run(pipe)
    with trace(pipe, tokens(pipe), options(pipe, affinity_factor=1)) as every:
        run(pipe)
    late, only, every = late.result(), only.result(), every.result()
    np.testing.assert_array_equal(late.affinity, only.affinity)
    assert np.abs(late.affinity - every.affinity).max() > 1e-6
    np.testing.assert_array_equal(late.cross[(4, 4)], every.cross[(4, 4)])


def test_flux_negative_pass_is_not_read():
    """With true_cfg_scale > 1 FLUX.1 runs the negative prompt as a second call per step;
    the maps of the first step are those of the positive pass alone."""
    pipe = load_pipeline("builtin:tiny-random-flux")
    pipe.set_progress_bar_config(disable=True)
    first_step = CaptureOptions(conditional_half=False, steps=(0, 1))
    with trace(pipe, tokens(pipe), first_step) as alone:
        run(pipe)
    with trace(pipe, tokens(pipe), CaptureOptions(conditional_half=False)) as both:
        run(pipe, negative_prompt=["a cat", "a cat"], true_cfg_scale=3.0)
    with trace(pipe, tokens(pipe), first_step) as both_first:
        run(pipe, negative_prompt=["a cat", "a cat"], true_cfg_scale=3.0)
    assert both.result().steps == 2 and both.result().layers == {(4, 4): 4}
    np.testing.assert_array_equal(both_first.result().cross[(4, 4)], alone.result().cross[(4, 4)])


def test_sd35_dual_attention_and_qk_norm():
    """SD3.5: image-only `attn2` layers keep their processor; RMS-normed q and k."""
    from diffusers import SD3Transformer2DModel

    tiny = load_pipeline("builtin:tiny-random-sd3")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        **{**tiny.transformer.config, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
    ).eval()
    pipe = type(tiny)(**{**tiny.components, "transformer": model})
    pipe.set_progress_bar_config(disable=True)
    assert "transformer_blocks.0.attn2.processor" in model.attn_processors
    plain = run(pipe)
    with trace(pipe, tokens(pipe), options(pipe, affinity_factor=1)) as cap:
        captured = run(pipe)
        assert type(model.attn_processors["transformer_blocks.0.attn2.processor"]).__name__ == (
            "JointAttnProcessor2_0"
        )
    assert np.abs(plain - captured).max() == 0
    assert cap.result().layers == {(4, 4): 2}


def test_unreadable_processor_and_options_are_refused(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = pipe.transformer
    name = "transformer_blocks.0.attn.processor"
    originals = dict(model.attn_processors)
    model.set_attn_processor({**originals, name: AttnProcessor2_0()})
    try:
        with pytest.raises(DiffuMaskError, match=rf"{name}.*AttnProcessor2_0.*cannot reproduce"):
            with trace(pipe, tokens(pipe)):
                pass
    finally:
        model.set_attn_processor(dict(originals))
    with pytest.raises(DiffuMaskError, match=r"cross_factors=\[2\].*one resolution"):
        with trace(pipe, tokens(pipe), CaptureOptions(cross_factors=(2,))):
            pass
    with pytest.raises(DiffuMaskError, match=r"affinity_blocks=\[9\].*blocks 0\.\.1"):
        with trace(pipe, tokens(pipe), CaptureOptions(affinity_factor=1, affinity_blocks=(9,))):
            pass
    assert dict(model.attn_processors) == originals and not model._forward_pre_hooks


def test_cross_blocks_keep_the_maps_of_those_blocks_alone(pipe):
    """The class maps of chosen blocks: the mean of two halves' maps is every block's, the
    image stays the same, and affinity blocks outside them still give the affinity."""
    blocks = sorted(set(capture_mmdit.text_layers(pipe.transformer).values()))
    half = len(blocks) // 2
    plain = run(pipe)
    results = []
    for chosen in (blocks[:half], blocks[half:], None):
        wanted = options(pipe, cross_blocks=chosen, affinity_factor=1, affinity_blocks=(1,))
        with trace(pipe, tokens(pipe), wanted) as cap:
            assert np.abs(run(pipe) - plain).max() == 0
        results.append(cap.result())
    first, second, every = results
    assert first.layers == {(4, 4): half} and every.layers == {(4, 4): len(blocks)}
    mean = (first.cross[(4, 4)] + second.cross[(4, 4)]) / 2
    np.testing.assert_allclose(mean, every.cross[(4, 4)], rtol=1e-5, atol=1e-7)
    assert np.abs(first.cross[(4, 4)] - second.cross[(4, 4)]).max() > 1e-4
    np.testing.assert_array_equal(first.affinity, every.affinity)
    with pytest.raises(DiffuMaskError, match=rf"cross_blocks=\[9\].*blocks 0\.\.{len(blocks) - 1}"):
        with trace(pipe, tokens(pipe), CaptureOptions(cross_blocks=(9,))):
            pass


def test_blocks_through_diffumask_are_recorded_and_refused_where_they_mean_nothing():
    dm = DiffuMask("builtin:tiny-random-sd3")
    chosen = {"method": "adaptive", "cross_blocks": [1], "affinity_blocks": [0]}
    sample = dm(PROMPTS[:1], classes=[["aeroplane"]], num_inference_steps=2, refinement=chosen)[0]
    assert sample.meta["refinement"]["params"]["cross_blocks"] == [1]
    assert sample.meta["refinement"]["params"]["affinity_blocks"] == [0]
    (maps,) = dm.captures(PROMPTS[:1], classes=[["aeroplane"]], num_inference_steps=2)
    with pytest.raises(DiffuMaskError, match="cross_blocks"):
        dm.refine_captured(maps, chosen)  # captured from every block
    with pytest.raises(DiffuMaskError, match=r"cross_blocks=\[\].*non-empty list"):
        dm(PROMPTS[:1], classes=[["aeroplane"]], refinement={"cross_blocks": []})
    unet = DiffuMask("builtin:tiny-random")
    with pytest.raises(DiffuMaskError, match=r"cross_blocks=\[1\] chooses blocks of an MMDiT"):
        unet(PROMPTS[:1], classes=[["aeroplane"]], num_inference_steps=2, refinement=chosen)


def test_unknown_denoiser_is_refused_by_name():
    from diffusers import UNet2DModel

    with pytest.raises(DiffuMaskError, match=r"cannot read a UNet2DModel: it reads UNet2D"):
        with trace(
            UNet2DModel(
                block_out_channels=(32,),
                down_block_types=("DownBlock2D",),
                up_block_types=("UpBlock2D",),
            ),
            [[1]],
        ):
            pass


@pytest.mark.parametrize("model", FAMILIES)
def test_diffumask_end_to_end_and_independent_of_the_batch(model):
    dm = DiffuMask(model)
    small = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 5}
    classes = [["aeroplane"], ["dog"]]
    together = dm(PROMPTS, classes=classes, batch_size=2, **small)
    one_by_one = dm(PROMPTS, classes=classes, batch_size=1, **small)
    for a, b in zip(together, one_by_one, strict=True):
        # batched kernels round differently: as for the UNet models, within one level
        assert np.abs(np.asarray(a.image, int) - np.asarray(b.image, int)).max() <= 1
        assert (a.mask == b.mask).mean() >= 0.99
        assert a.mask.shape == (64, 64) and a.mask.dtype == np.uint8
        assert 0 <= a.quality <= 1 and a.meta["model"] == model
        (name,) = a.attention
        # the colour step reads the pixels, which may differ by 1 between batch sizes:
        # "separate"'s scores then move by up to 1.4e-3 (FLUX.1's second prompt)
        np.testing.assert_allclose(a.attention[name], b.attention[name], atol=2e-3)
    assert dm.default_size() == 128
    with pytest.raises(DiffuMaskError, match=r"height=72 is not a multiple of 16"):
        dm(PROMPTS[:1], classes=[["aeroplane"]], height=72, width=64)
    with pytest.raises(DiffuMaskError, match=r"'cat' does not appear in prompt"):
        dm(PROMPTS[:1], classes=[["cat"]], **small)


@pytest.mark.parametrize("model", FAMILIES)
def test_the_familys_method_cuts_where_no_method_is_named(model):
    dm = DiffuMask(model)
    small = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 5}
    by_default, named, tuned = (
        dm(PROMPTS[:1], classes=[["aeroplane"]], refinement=r, **small)[0].meta["refinement"]
        for r in (None, "adaptive", {"band": 0.2})
    )
    assert by_default["method"] == tuned["method"] == "separate"
    assert named["method"] == "adaptive" and tuned["params"]["band"] == 0.2


def test_true_cfg_scale_is_flux_only():
    dm = DiffuMask("builtin:tiny-random-sd3")
    with pytest.raises(DiffuMaskError, match=r"true_cfg_scale=3.0 is for FLUX.1"):
        dm(PROMPTS[:1], classes=[["aeroplane"]], true_cfg_scale=3.0, num_inference_steps=1)
    flux = DiffuMask("builtin:tiny-random-flux")
    s = flux(
        PROMPTS[:1],
        classes=[["aeroplane"]],
        negative_prompt="a cat",
        true_cfg_scale=3.0,
        num_inference_steps=2,
        height=64,
        width=64,
    )[0]
    assert s.meta["true_cfg_scale"] == 3.0 and s.mask.shape == (64, 64)


# -- every surface: CLI, exports and FiftyOne (SD3); load_dataset (FLUX.1) ---------------


def test_sd3_through_the_cli_exports_and_fiftyone(tmp_path):
    from click.testing import CliRunner

    from diffumask_datasets.cli import main
    from diffumask_datasets.fiftyone import to_fiftyone

    out = tmp_path / "ds"
    args = ["generate", "voc", "--model", "builtin:tiny-random-sd3", "--classes", "bird,dog"]
    args += ["--per-class", "1", "--steps", "2", "--size", "64", "--seed", "0", "--out", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main, ["export", str(out), "--format", "coco", "--to", str(tmp_path / "coco")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "coco" / "annotations").is_dir()
    bad = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "bad"), "--size", "72"])
    assert bad.exit_code != 0 and "height=72 is not a multiple of 16" in bad.output
    # voc names no method: the masks are cut with the SD3 family's
    methods = {r.meta["refinement"]["method"] for r in open_store(out).records()}
    assert methods == {SD3Family.default_method} == {"separate"}
    ds = to_fiftyone(out, media_dir=tmp_path / "media", progress=False)
    try:
        assert len(ds) == 2 and {s.model for s in ds} == {"builtin:tiny-random-sd3"}
    finally:
        ds.delete()


def test_flux_through_load_dataset(tmp_path, monkeypatch):
    from datasets import load_dataset

    import diffumask_datasets.datasets_builder  # noqa: F401  (registers the names)

    monkeypatch.chdir(tmp_path)
    settings = tiny_settings(
        model="builtin:tiny-random-flux", images_per_class=1, num_inference_steps=2
    )
    ds = load_dataset("diffumask-voc", split="train", cache_dir=str(tmp_path / "cache"), **settings)
    assert len(ds) == 2 and ds[0]["mask"].size == (64, 64)
    assert all("tiny-random-flux" in str(row["meta"]) for row in ds)


# -- map kind "concept": ConceptAttention on FLUX.1 ---------------------------------------


def test_concept_maps_leave_the_image_and_are_a_softmax_over_the_concepts(pipe):
    family = family_of(pipe)
    prompts = ["a photo of an aeroplane", "a dog and a cat"]
    found = [
        family.token_positions(prompts[0], ["aeroplane"], None),
        family.token_positions(prompts[1], ["dog", "cat"], None),
    ]
    kept = [sorted({p for positions in f.values() for p in positions}) for f in found]
    concepts = family.concepts(found, kept)
    assert concepts.valid.tolist() == [[True, True, False], [True, True, True]]
    plain = run(pipe, prompts)
    concept = options(pipe, map_kind="concept", affinity_factor=1)
    with trace(pipe, kept, concept, concepts) as cap:
        captured = run(pipe, prompts)
    assert np.abs(plain - captured).max() == 0  # image tokens never attend to concepts
    result = cap.result()
    # the second half of the joint blocks (SD3's last, text-pre-only one among them)
    halves = len(capture_mmdit.default_concept_blocks(pipe.transformer))
    assert halves >= 1 and result.layers == {(4, 4): halves}
    maps = result.cross[(4, 4)]  # [prompts, kept columns, 4, 4]
    dog, cat = (result.token_maps(1, found[1][name])[(4, 4)] for name in ("dog", "cat"))
    # a softmax over dog, cat and background: the classes leave the background some share
    assert (maps > 0).all() and ((dog + cat) < 1).all()
    assert not np.allclose(dog, cat)


@pytest.mark.parametrize("model", FAMILIES)
def test_concept_maps_through_diffumask_are_recorded_and_batch_independent(model):
    dm = DiffuMask(model)
    small = {"num_inference_steps": 2, "height": 64, "width": 64, "map_kind": "concept"}
    classes = [["aeroplane"], ["dog"]]
    together = dm(PROMPTS, classes=classes, batch_size=2, **small)
    alone = dm(PROMPTS, classes=classes, batch_size=1, **small)
    for a, b in zip(together, alone, strict=True):
        assert a.meta["map_kind"] == "concept"
        (name,) = a.attention
        # a random model's maps are near flat: "separate" moves them by 1.5e-4 of ~0.03
        np.testing.assert_allclose(a.attention[name], b.attention[name], atol=3e-4)
    with pytest.raises(DiffuMaskError, match=r"map_kind='attention' is unknown"):
        dm(PROMPTS[:1], classes=[["aeroplane"]], **{**small, "map_kind": "attention"})


def test_concept_maps_are_refused_where_they_cannot_be_made():
    small = {"num_inference_steps": 2, "height": 64, "width": 64, "map_kind": "concept"}
    with pytest.raises(DiffuMaskError, match=r"map_kind='concept' is for MMDiT pipelines"):
        DiffuMask("builtin:tiny-random")(PROMPTS[:1], classes=[["aeroplane"]], **small)
    with pytest.raises(DiffuMaskError, match=r"map_kind='concept' needs an MMDiT transformer"):
        with trace(load_pipeline("builtin:tiny-random"), [[5]], CaptureOptions(map_kind="concept")):
            pass
    sd3 = load_pipeline("builtin:tiny-random-sd3")  # shared: built once per process
    # as SD3 pipelines loaded with text_encoder_3=None
    without_t5 = type(sd3)(**{**sd3.components, "text_encoder_3": None, "tokenizer_3": None})
    with pytest.raises(DiffuMaskError, match=r"with the pipeline's T5 encoder, which this one"):
        DiffuMask(without_t5)(PROMPTS[:1], classes=[["aeroplane"]], **small)
    with pytest.raises(DiffuMaskError, match=r"concept '' is only special or unknown tokens"):
        family_of(sd3).concept_embedding("")


def test_concept_blocks_choose_the_maps_and_are_refused_where_they_mean_nothing():
    dm = DiffuMask("builtin:tiny-random-sd3")
    small = {"num_inference_steps": 2, "height": 64, "width": 64}
    one = {"prompts": PROMPTS[:1], "classes": [["aeroplane"]], **small}
    first = {"method": "separate", "concept_blocks": [0]}  # the default: the second half
    (chosen,) = dm(**one, map_kind="concept", refinement=first)
    (default,) = dm(**one, map_kind="concept", refinement="separate")
    assert chosen.meta["refinement"]["params"]["concept_blocks"] == [0]
    assert default.meta["refinement"]["params"]["concept_blocks"] is None
    assert not np.allclose(chosen.attention["aeroplane"], default.attention["aeroplane"])
    (maps,) = dm.captures(**one, map_kind="concept", refinement="separate")
    with pytest.raises(DiffuMaskError, match="concept_blocks"):
        dm.refine_captured(maps, first)  # captured from the default blocks
    with pytest.raises(DiffuMaskError, match=r"concept_blocks=\[0\] chooses map_kind 'concept'"):
        dm(**one, refinement=first)
    with pytest.raises(DiffuMaskError, match=r"concept_blocks=\[0\] chooses blocks of an MMDiT"):
        DiffuMask("builtin:tiny-random")(**one, refinement=first)
