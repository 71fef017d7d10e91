"""What differs between pipeline families for the engine: default size, the size step,
the noise, the pipeline call's arguments, where class words sit in the text sequence the
denoiser attends to, and whether capture reads a conditional half.

UNet (SD 1.x, 2.x, SDXL): one CLIP sequence of 77 tokens; guidance batch [uncond, cond].
SD3 / SD3.5: text = 77 CLIP tokens, then T5 (256); guidance batch [negative, positive].
FLUX.1: text = T5 (512); guidance-distilled, no unconditional half; with
`true_cfg_scale > 1` and a negative prompt the negative runs as a separate call, which
capture ignores (see capture.mmdit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .errors import DiffuMaskError
from .tokens import class_token_indices, find_class_tokens, find_t5_class_tokens


def _noise(seeds: Sequence[int], shape: tuple[int, ...]):
    import torch

    # Drawn on the CPU one sample at a time: a sample's noise depends on its seed
    # alone, not on its batch or the device.
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


class UNetFamily:
    """The engine's adapter for UNet pipelines (SD 1.x, 2.x, SDXL): default size, size step,
    noise shape, call arguments and where the class words sit in the text. The MMDiT
    families override what differs."""

    name = "unet"
    # The refinement method where none is named (the API's, a definition's or the CLI's
    # left out): the best measured on the shapes models (BENCHMARKS.md).
    default_method = "adaptive"

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = pipe.unet

    @property
    def latent_scale(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this."""
        return self.latent_scale

    def default_size(self) -> int:
        return int(self.model.config.sample_size) * self.latent_scale

    def conditional_half(self, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def latents(self, seeds: Sequence[int], height: int, width: int):
        shape = (
            self.model.config.in_channels,
            height // self.latent_scale,
            width // self.latent_scale,
        )
        return _noise(seeds, shape).to(device=self.model.device, dtype=self.model.dtype)

    def check(self, settings: Mapping[str, Any]) -> None:
        """Refuses settings this family cannot run, before anything is generated."""
        if settings.get("true_cfg_scale", 1.0) != 1.0:
            raise DiffuMaskError(
                f"true_cfg_scale={settings['true_cfg_scale']} is for FLUX.1 pipelines; this "
                "model takes classifier-free guidance from guidance_scale"
            )
        if settings.get("map_kind", "cross") != "cross":
            raise DiffuMaskError(
                f"map_kind={settings['map_kind']!r} is for MMDiT pipelines (SD3, SD3.5, FLUX.1: "
                "ConceptAttention on their joint blocks); use map_kind='cross'"
            )

    def concepts(self, token_indices, tokens):
        return None  # cross-attention maps only

    def call_arguments(self, prompts: Sequence[str], latents, settings: Mapping[str, Any]):
        """The pipeline call's keyword arguments for one batch."""
        negative = settings["negative_prompt"]
        return {
            "prompt": list(prompts),
            "negative_prompt": [negative] * len(prompts) if negative else None,
            "num_inference_steps": settings["num_inference_steps"],
            "guidance_scale": settings["guidance_scale"],
            "height": settings["height"],
            "width": settings["width"],
            "latents": latents,
            "output_type": "pil",
        }

    def image_call_arguments(self, prompts, images, generators, settings):
        """The image-to-image pipeline call's keyword arguments for one batch of given
        images (all of one size); its output stays latent (labelling needs no image)."""
        negative = settings["negative_prompt"]
        return {
            "prompt": list(prompts),
            "negative_prompt": [negative] * len(prompts) if negative else None,
            "image": list(images),
            "strength": settings["strength"],
            "num_inference_steps": settings["num_inference_steps"],
            "guidance_scale": settings["guidance_scale"],
            "generator": list(generators),
            "output_type": "latent",
        }

    def inversion_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """An image-to-image call's arguments for the inverse pass: the prompt alone (no
        guidance: inversion with guidance drifts off the image)."""
        return {**arguments, "guidance_scale": 1.0, "negative_prompt": None}

    def unpacked(self, latents, height: int, width: int):
        """Latents as the scheduler's noising sees them (FLUX.1 packs them after)."""
        return latents

    def token_positions(
        self, prompt: str, classes: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None
    ) -> dict[str, list[int]]:
        """{class: positions in the text sequence the denoiser attends to}."""
        return class_token_indices(self.pipe.tokenizer, prompt, classes, dict(synonyms or {}))


class SD3Family(UNetFamily):
    """The adapter for SD3 and SD3.5: sizes in whole 2x2 patches, class words found in T5's
    sequence (and in the CLIP tokens where they reach), the negative half of the guidance
    batch left unread, ConceptAttention's concepts (`map_kind="concept"`) from T5."""

    name = "sd3"
    # Also FLUX.1's: on builtin:shapes-mmdit "adaptive" cut half the mIoU of "separate"
    # (BENCHMARKS.md, "Shapes quality, MMDiT model").
    default_method = "separate"
    default_sequence_length = 256  # the pipeline's default
    t5_tokenizer = "tokenizer_3"
    t5_encoder = "text_encoder_3"

    def __init__(self, pipe):
        self.pipe = pipe
        self.model = pipe.transformer

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens the pipeline is asked for: its default, or fewer where the model's T5
        tokenizer holds fewer (builtin:shapes-mmdit's 24: the length it was trained with)."""
        tokenizer = getattr(self.pipe, self.t5_tokenizer, None)
        limit = getattr(tokenizer, "model_max_length", None) or self.default_sequence_length
        return min(self.default_sequence_length, int(limit))

    @property
    def size_step(self) -> int:
        return self.latent_scale * int(self.model.config.patch_size)

    def default_size(self) -> int:
        return int(self.pipe.default_sample_size) * self.latent_scale

    def call_arguments(self, prompts, latents, settings):
        return {
            **super().call_arguments(prompts, latents, settings),
            "max_sequence_length": self.max_sequence_length,
        }

    def image_call_arguments(self, prompts, images, generators, settings):
        height, width = settings["denoised_size"]
        return {
            **super().image_call_arguments(prompts, images, generators, settings),
            "height": height,
            "width": width,
            "max_sequence_length": self.max_sequence_length,
        }

    def check(self, settings: Mapping[str, Any]) -> None:
        """As UNet models', less map_kind: SD3 gives concept maps too."""
        super().check({k: v for k, v in settings.items() if k != "map_kind"})

    def concept_embedding(self, name: str):
        """A concept's T5 embedding: the mean over its word pieces (special tokens left
        out), encoded alone (so it does not depend on the other concepts of the batch)."""
        import torch

        tokenizer = getattr(self.pipe, self.t5_tokenizer)
        encoder = getattr(self.pipe, self.t5_encoder)
        if encoder is None:
            raise DiffuMaskError(
                "map_kind='concept' embeds the concepts with the pipeline's T5 encoder, which "
                "this one was loaded without; load it with its T5 or use map_kind='cross'"
            )
        ids = tokenizer(name, return_tensors="pt").input_ids.to(encoder.device)
        with torch.no_grad():
            hidden = encoder(ids)[0][0].float()
        # the word's pieces: T5 adds only an end token; a tokenizer may add a start too
        special = torch.tensor(tokenizer.all_special_ids, device=ids.device)
        pieces = ~torch.isin(ids[0], special)
        if not pieces.any():
            raise DiffuMaskError(
                f"concept {name!r} is only special or unknown tokens to the T5 tokenizer; "
                "name the class with words T5 knows (a definition's `prompt`) or use "
                "map_kind='cross'"
            )
        return hidden[pieces].mean(dim=0)

    def concepts(self, token_indices: Sequence[Mapping[str, Sequence[int]]], tokens):
        """ConceptAttention's concepts of a batch: per prompt its classes, then background;
        tokens: per prompt the kept token positions, each read from its class's concept."""
        import torch

        from .capture.mmdit import BACKGROUND, Concepts

        names = [[*classes, BACKGROUND] for classes in token_indices]
        width = max(len(n) for n in names)
        embedded = {n: self.concept_embedding(n) for n in sorted({n for ns in names for n in ns})}
        some = next(iter(embedded.values()))
        embeddings = torch.zeros(len(names), width, some.shape[-1])
        valid = torch.zeros(len(names), width, dtype=torch.bool)
        of_column = torch.zeros(len(names), max(len(t) for t in tokens), dtype=torch.long)
        for p, (prompt_names, positions) in enumerate(zip(names, token_indices, strict=True)):
            for c, name in enumerate(prompt_names):
                embeddings[p, c] = embedded[name]
                valid[p, c] = True
            for column, token in enumerate(tokens[p]):
                of_column[p, column] = next(
                    c for c, n in enumerate(positions) if token in positions[n]
                )
        return Concepts(embeddings, valid, of_column)

    def _class_positions(self, prompt: str, name: str, synonyms: Sequence[str]) -> list[int]:
        positions = []
        if self.pipe.text_encoder_3 is not None:
            t5 = find_t5_class_tokens(
                self.pipe.tokenizer_3, prompt, name, synonyms, self.max_sequence_length
            )
            # T5's tokens follow the CLIP ones (77, or the model's CLIP tokenizer's length)
            positions = [self.pipe.tokenizer_max_length + p for p in t5]
        try:
            clip = find_class_tokens(self.pipe.tokenizer, prompt, name, synonyms)
        except DiffuMaskError:
            if not positions:  # without T5 the CLIP part is all there is
                raise
            clip = []  # cut off by CLIP's 77 tokens: T5 still sees it
        return sorted(clip) + positions

    def token_positions(self, prompt, classes, synonyms):
        synonyms = synonyms or {}
        return {
            name: self._class_positions(prompt, name, synonyms.get(name, ())) for name in classes
        }


class FluxFamily(SD3Family):
    """The adapter for FLUX.1: latents packed 2x2 into tokens, guidance distilled (no negative
    half; `true_cfg_scale` runs the negative prompt as a second pass)."""

    name = "flux"
    default_sequence_length = 512  # the pipeline's default
    t5_tokenizer = "tokenizer_2"
    t5_encoder = "text_encoder_2"

    @property
    def size_step(self) -> int:
        return self.latent_scale * 2  # latents are packed 2x2 into tokens

    def conditional_half(self, guidance_scale: float) -> bool:
        return False  # guidance-distilled: the positive prompt runs alone

    def check(self, settings):
        pass  # true_cfg_scale is FLUX.1's own

    def latents(self, seeds, height, width):
        channels = self.model.config.in_channels // 4
        h, w = 2 * (height // self.size_step), 2 * (width // self.size_step)
        # Unpacked noise per sample, as the pipeline draws it, then packed 2x2.
        noise = self.pipe._pack_latents(_noise(seeds, (channels, h, w)), len(seeds), channels, h, w)
        return noise.to(device=self.model.device, dtype=self.model.dtype)

    def call_arguments(self, prompts, latents, settings):
        negative = settings["negative_prompt"]
        return {
            "prompt": list(prompts),
            "negative_prompt": [negative] * len(prompts) if negative else None,
            "true_cfg_scale": settings.get("true_cfg_scale", 1.0),
            "num_inference_steps": settings["num_inference_steps"],
            "guidance_scale": settings["guidance_scale"],
            "height": settings["height"],
            "width": settings["width"],
            "latents": latents,
            "max_sequence_length": self.max_sequence_length,
            "output_type": "pil",
        }

    def image_call_arguments(self, prompts, images, generators, settings):
        return {
            **super().image_call_arguments(prompts, images, generators, settings),
            "true_cfg_scale": settings.get("true_cfg_scale", 1.0),
        }

    def inversion_arguments(self, arguments):
        # guidance is distilled into the model (an input, not a second pass): kept
        return {**arguments, "true_cfg_scale": 1.0, "negative_prompt": None}

    def unpacked(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def _class_positions(self, prompt, name, synonyms):
        return find_t5_class_tokens(
            self.pipe.tokenizer_2, prompt, name, synonyms, self.max_sequence_length
        )


def family_of(pipe) -> UNetFamily:
    """The family of a pipeline, by its denoiser; one the engine cannot run is refused."""
    from .capture import _family, denoiser

    model = denoiser(pipe)
    if model is pipe:
        raise DiffuMaskError(
            f"pipeline {type(pipe).__name__} has neither a unet nor a transformer; use a "
            "text-to-image pipeline (SD 1.x, 2.x, SDXL, SD3, SD3.5, FLUX.1)"
        )
    _family(model)  # refuses an architecture capture cannot read
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, FluxTransformer2DModel):
        return FluxFamily(pipe)
    if isinstance(model, SD3Transformer2DModel):
        return SD3Family(pipe)
    return UNetFamily(pipe)


FAMILIES = (UNetFamily, SD3Family, FluxFamily)


def refinement_by_family(value: Any) -> dict[str, Any]:
    """The refinement parameters `value` resolves to, for a fingerprint made before the model
    is loaded: one dict where `value` names its method, else {family: its parameters}, so
    a changed family default changes the hash."""
    from .refine import Refinement  # torch: only when a run starts

    resolved = {f.name: Refinement.from_any(value, f.default_method).to_dict() for f in FAMILIES}
    first = resolved[UNetFamily.name]
    return first if all(r == first for r in resolved.values()) else resolved
