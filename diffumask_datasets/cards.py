"""Dataset cards: a template per definition in cards/, rendered with a store's real numbers."""

from __future__ import annotations

# Licenses of the models a dataset is commonly made with (the images inherit the model's
# terms). Anything else is "other" and the card asks the user to check the model's card.
MODEL_LICENSES = {
    "builtin:tiny-random": "apache-2.0",
    "builtin:tiny-random-xl": "apache-2.0",
    "builtin:shapes": "apache-2.0",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
}


def model_license(model: str | None) -> str:
    """The Hub license id of `model`, "other" when unknown."""
    return MODEL_LICENSES.get(str(model), "other")
