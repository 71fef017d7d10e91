"""Dataset definitions: which classes a dataset has and how to prompt for them.

A definition is data, not code: one YAML file, `builders/<name>/definition.yaml` for the
built-in ones (voc, cityscapes, shapes) or any file a user writes. The format:

```yaml
name: voc                          # required: lower-case letters, digits, '-' and '_'
title: PASCAL VOC 2012 classes     # optional, shown in the dataset card
description: >                     # optional, shown in the dataset card
  The 20 PASCAL VOC object classes ...
background: background             # optional: the name of mask value 0 (default "background")
defaults:                          # optional: generation settings when the caller gives none
  model: CompVis/stable-diffusion-v1-4     # hub id, local folder or builtin:<alias>
  images_per_class: 100
  num_inference_steps: 50
  guidance_scale: 7.5
  resolution: 512                  # square images, pixels
  refinement: adaptive             # threshold | adaptive | affinity | separate, or parameters;
                                   # left out: the model family's (UNet adaptive, MMDiT separate)
  shard_size: 64                   # samples per stored shard
  two_classes: 0.0                 # fraction of images that show a second class
prompts:
  templates:                       # {class} is the class's prompt words, {sub_class} one of
    - "a photo of a {sub_class} {class}"   # its sub-classes (empty when it has none)
  pair_templates:                  # for two-class images; {other} is the second class
    - "a photo of a {sub_class} {class} and a {other}"
  negative: "blurry, low quality"  # negative prompt
classes:                           # required, at least one; ids are mask values 1..254
  - id: 3                          # required, unique
    name: bird                     # required, unique: the label name
    prompt: bird                   # required: the words that name the class in a prompt
    synonyms: [birds]              # optional: other words that name it (attention is read
                                   #   from the prompt words and the synonyms)
    sub_classes: [sparrow, robin]  # optional: "Photo of a {sub-class} {class}" diversity
    templates: [...]               # optional: this class's own templates
    color: [128, 128, 0]           # optional: RGB for visualisations
    prior: {area: [0.05, 0.5]}     # optional: what a plausible mask of the class looks like;
                                   #   `diffumask clean` drops masks outside it (area: the
                                   #   share of the image the class covers, [min, max])
```

Every rendered prompt must contain the class's prompt words or one of its synonyms; a
definition breaking this is refused when it is loaded. Unknown keys, duplicate ids or names
and missing required keys are refused with an error naming the key and the class.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffumask_datasets.errors import DiffuMaskError
from diffumask_datasets.resources import builders_dir

DEFINITION_FILE = "definition.yaml"

TOP_LEVEL_KEYS = ("name", "title", "description", "background", "defaults", "prompts", "classes")
PROMPT_KEYS = ("templates", "pair_templates", "negative")
CLASS_KEYS = (
    "id", "name", "prompt", "synonyms", "sub_classes", "templates", "color", "prior"
)  # fmt: skip
PRIOR_KEYS = ("area",)
REQUIRED_CLASS_KEYS = ("id", "name", "prompt")
# Generation settings a definition may set (a subset of config.GenerationConfig's fields).
DEFAULT_KEYS = (
    "model",
    "images_per_class",
    "num_inference_steps",
    "guidance_scale",
    "resolution",
    "refinement",
    "shard_size",
    "two_classes",
    "batch_size",
    "seed",
    "attention_size",
)

DEFAULT_TEMPLATES = ("a photo of a {sub_class} {class}",)
DEFAULT_PAIR_TEMPLATES = ("a photo of a {sub_class} {class} and a {other}",)
_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
PATH_CHARACTERS = ("/", "\\", "\0", ":")
_PLACEHOLDERS = ("class", "sub_class", "other")


@dataclass(frozen=True)
class ClassDef:
    """One class of a definition: its mask id, its label, the words that name it in a
    prompt (`prompt`, `synonyms`), its sub-classes and templates for prompt diversity, a
    display colour, and an optional area prior that `diffumask clean` applies."""

    id: int
    name: str
    prompt: str
    synonyms: tuple[str, ...] = ()
    sub_classes: tuple[str, ...] = ()
    templates: tuple[str, ...] | None = None
    color: tuple[int, int, int] | None = None
    # e.g. {"area": (0.05, 0.5)}: read by `clean`, not by generation (not fingerprinted)
    prior: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)

    @property
    def words(self) -> tuple[str, ...]:
        """Every phrase that names this class in a prompt: its prompt words, then synonyms."""
        return (self.prompt, *self.synonyms)


@dataclass(frozen=True)
class Definition:
    """A dataset definition, as read from its YAML file: the classes, the prompt templates,
    the negative prompt and the generation defaults. Build one with `load_definition`."""

    name: str
    classes: tuple[ClassDef, ...]
    title: str = ""
    description: str = ""
    background: str = "background"
    defaults: Mapping[str, Any] = field(default_factory=dict)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    pair_templates: tuple[str, ...] = DEFAULT_PAIR_TEMPLATES
    negative_prompt: str | None = None
    source: str | None = None  # the file it was read from, for messages only

    # -- lookups -------------------------------------------------------------------------
    @property
    def class_names(self) -> dict[int, str]:
        """{id: name}, background (0) included."""
        return {0: self.background, **{c.id: c.name for c in self.classes}}

    @property
    def class_ids(self) -> dict[str, int]:
        """{name: id} of the object classes (background not included)."""
        return {c.name: c.id for c in self.classes}

    def get(self, name: str) -> ClassDef:
        for c in self.classes:
            if c.name == name:
                return c
        raise DiffuMaskError(self._unknown_class_message(name))

    def select(self, names: Iterable[str] | str | None) -> tuple[ClassDef, ...]:
        """The classes named, in definition (id) order; all of them for None.

        A comma-separated string is accepted too (the form a command line gives).
        """
        if names is None:
            return self.classes
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        wanted = list(names)
        if not wanted:
            raise DiffuMaskError(f"no classes chosen from definition {self.name!r}")
        unknown = [n for n in wanted if n not in self.class_ids]
        if unknown:
            raise DiffuMaskError(self._unknown_class_message(unknown[0]))
        chosen = set(wanted)
        return tuple(c for c in self.classes if c.name in chosen)

    def _unknown_class_message(self, name: str) -> str:
        names = [c.name for c in self.classes]
        close = difflib.get_close_matches(str(name), names, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return (
            f"unknown class {name!r} in definition {self.name!r}.{hint} "
            f"Its classes are: {', '.join(names)}."
        )

    def templates_for(self, cls: ClassDef) -> tuple[str, ...]:
        return cls.templates if cls.templates else self.templates

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The definition as plain data (what the manifest stores); from_dict inverts it."""
        classes = []
        for c in self.classes:
            entry: dict[str, Any] = {"id": c.id, "name": c.name, "prompt": c.prompt}
            if c.synonyms:
                entry["synonyms"] = list(c.synonyms)
            if c.sub_classes:
                entry["sub_classes"] = list(c.sub_classes)
            if c.templates:
                entry["templates"] = list(c.templates)
            if c.color:
                entry["color"] = list(c.color)
            if c.prior:
                entry["prior"] = {k: list(v) for k, v in c.prior.items()}
            classes.append(entry)
        prompts: dict[str, Any] = {
            "templates": list(self.templates),
            "pair_templates": list(self.pair_templates),
        }
        if self.negative_prompt is not None:
            prompts["negative"] = self.negative_prompt
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "background": self.background,
            "defaults": dict(self.defaults),
            "prompts": prompts,
            "classes": classes,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Definition:
        return _parse(data, source or "<definition>")

    def fingerprint(self) -> str:
        """A hash of everything that changes what is generated (not title or description)."""
        data = self.to_dict()
        data.pop("title")
        data.pop("description")
        for entry in data["classes"]:
            entry.pop("prior", None)  # priors judge masks after the fact
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def priors(self) -> dict[str, dict[str, tuple[float, float]]]:
        """{class name: prior} of the classes that have one."""
        return {c.name: dict(c.prior) for c in self.classes if c.prior}

    def palette(self) -> dict[int, tuple[int, int, int]]:
        """{id: RGB} for every class and background: the definition's colours, else VOC's
        bit-interleaved colour map (which gives VOC its familiar colours)."""
        colors = {0: (0, 0, 0)}
        for c in self.classes:
            colors[c.id] = c.color or voc_color(c.id)
        return colors


def voc_color(index: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour of label `index` (bits of the index spread over R, G, B)."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((index >> 0) & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


# -- loading ---------------------------------------------------------------------------


def builtin_definitions() -> list[str]:
    """Names of the definitions shipped in builders/."""
    root = builders_dir()
    return sorted(p.name for p in root.iterdir() if (p / DEFINITION_FILE).is_file())


def definition_path(name_or_path: str | Path) -> Path:
    """The YAML file meant by a built-in name ("voc", "diffumask-voc") or a path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    builtins = builtin_definitions()
    # A built-in name wins over a same-named folder in the working directory (a "voc"
    # export lying there must not shadow the definition).
    looks_like_path = (
        candidate.suffix in (".yaml", ".yml")
        or "/" in text
        or "\\" in text
        or (text.removeprefix("diffumask-") not in builtins and candidate.exists())
    )
    if looks_like_path:
        if candidate.is_dir():
            candidate = candidate / DEFINITION_FILE
        if not candidate.is_file():
            raise DiffuMaskError(
                f"definition file {str(candidate)!r} does not exist; give a built-in name "
                f"({', '.join(builtin_definitions())}) or the path of a .yaml definition"
            )
        return candidate
    name = text.removeprefix("diffumask-")
    if name not in builtins:
        close = difflib.get_close_matches(name, builtins, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise DiffuMaskError(
            f"unknown dataset definition {text!r}.{hint} Built-in definitions: "
            f"{', '.join(builtins)}; or give the path of your own .yaml definition "
            "(docs/guide/definitions.md)."
        )
    return builders_dir() / name / DEFINITION_FILE


def load_definition(name_or_path: str | Path | Definition) -> Definition:
    """Read and validate a definition: a built-in name, a .yaml path, or a Definition."""
    if isinstance(name_or_path, Definition):
        return name_or_path
    import yaml

    path = definition_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DiffuMaskError(f"definition file {str(path)!r} is not valid YAML: {exc}") from None
    return _parse(data, str(path))


# -- validation ------------------------------------------------------------------------


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DiffuMaskError(
                f"{where}: unknown key {key!r}.{hint} Allowed keys: {', '.join(allowed)}."
            )


def _string(value: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DiffuMaskError(f"{where} must be a non-empty string, got {value!r}")
    return value.strip()


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise DiffuMaskError(f"{where} must be a list of strings, got {value!r}")
    items = tuple(_string(v, f"{where}[{i}]") for i, v in enumerate(value))
    duplicates = sorted({v for v in items if items.count(v) > 1})
    if duplicates:
        raise DiffuMaskError(f"{where} lists {duplicates[0]!r} more than once")
    return items


def _templates(value: Any, where: str, needed: Sequence[str]) -> tuple[str, ...]:
    items = _strings(value, where)
    for i, template in enumerate(items):
        fields = set(re.findall(r"{([^{}]*)}", template))
        unknown = fields - set(_PLACEHOLDERS)
        if unknown:
            raise DiffuMaskError(
                f"{where}[{i}] {template!r} uses an unknown placeholder {{{sorted(unknown)[0]}}};"
                f" the placeholders are {{class}}, {{sub_class}} and {{other}}"
            )
        for placeholder in needed:
            if placeholder not in fields:
                raise DiffuMaskError(f"{where}[{i}] {template!r} lacks {{{placeholder}}}")
    return items


def mentions(prompt: str, phrase: str) -> bool:
    """True when `phrase` (or its plural in -s/-es, as the engine also accepts) appears in
    `prompt` as whole words, ignoring case."""
    pattern = rf"(?<![\w]){re.escape(phrase.lower())}(?:e?s)?(?![\w])"
    return re.search(pattern, prompt.lower()) is not None


def render(template: str, cls: ClassDef, sub_class: str = "", other: ClassDef | None = None) -> str:
    """Fill a template; an empty sub-class leaves no double space, and "a" before a vowel
    becomes "an" ("a photo of a aeroplane" reads badly and is rarer in the model's data)."""
    text = template.replace("{class}", cls.prompt).replace("{sub_class}", sub_class)
    if other is not None:
        text = text.replace("{other}", other.prompt)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])(?!(?i:eu|uni|use|one|once|ur))", r"\1n ", text)


def _prior(value: Any, where: str) -> dict[str, tuple[float, float]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DiffuMaskError(f"{where}: prior must be a mapping such as {{area: [0.05, 0.5]}}")
    _check_keys(value, PRIOR_KEYS, f"{where}: prior")
    prior = {}
    for key, bounds in value.items():
        ok = (
            isinstance(bounds, Sequence)
            and not isinstance(bounds, str)
            and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and 0 <= bounds[0] <= bounds[1] <= 1
        )
        if not ok:
            raise DiffuMaskError(
                f"{where}: prior {key} must be [min, max] with 0 <= min <= max <= 1 (shares "
                f"of the image), got {bounds!r}; e.g. {key}: [0.05, 0.5]"
            )
        prior[key] = (float(bounds[0]), float(bounds[1]))
    return prior


def _parse(data: Any, source: str) -> Definition:
    if not isinstance(data, Mapping):
        raise DiffuMaskError(f"{source}: a definition must be a YAML mapping with a 'classes' list")
    _check_keys(data, TOP_LEVEL_KEYS, source)
    if "name" not in data:
        raise DiffuMaskError(f"{source}: missing required key 'name'")
    name = _string(data["name"], f"{source}: name")
    if not _NAME_PATTERN.match(name):
        raise DiffuMaskError(
            f"{source}: name {name!r} must use lower-case letters, digits, '-' and '_'"
        )

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise DiffuMaskError(f"{source}: defaults must be a mapping, got {defaults!r}")
    _check_keys(defaults, DEFAULT_KEYS, f"{source}: defaults")

    prompts = data.get("prompts") or {}
    if not isinstance(prompts, Mapping):
        raise DiffuMaskError(f"{source}: prompts must be a mapping, got {prompts!r}")
    _check_keys(prompts, PROMPT_KEYS, f"{source}: prompts")
    templates = (
        _templates(prompts["templates"], f"{source}: prompts.templates", ["class"])
        if prompts.get("templates")
        else DEFAULT_TEMPLATES
    )
    pair_templates = (
        _templates(
            prompts["pair_templates"], f"{source}: prompts.pair_templates", ["class", "other"]
        )
        if prompts.get("pair_templates")
        else DEFAULT_PAIR_TEMPLATES
    )
    negative = prompts.get("negative")
    if negative is not None:
        negative = _string(negative, f"{source}: prompts.negative", allow_empty=True)

    raw_classes = data.get("classes")
    if not isinstance(raw_classes, Sequence) or isinstance(raw_classes, str) or not raw_classes:
        raise DiffuMaskError(f"{source}: 'classes' must be a non-empty list of classes")
    background = _string(data.get("background", "background"), f"{source}: background")

    classes: list[ClassDef] = []
    seen_ids: dict[int, str] = {}
    seen_names: dict[str, str] = {background: "background"}
    for i, raw in enumerate(raw_classes):
        label = f"{source}: classes[{i}]"
        if not isinstance(raw, Mapping):
            raise DiffuMaskError(f"{label} must be a mapping with id, name and prompt")
        if isinstance(raw.get("name"), str):
            label += f" ({raw['name']})"
        _check_keys(raw, CLASS_KEYS, label)
        for key in REQUIRED_CLASS_KEYS:
            if key not in raw:
                raise DiffuMaskError(f"{label}: missing required key {key!r}")
        class_id = raw["id"]
        if isinstance(class_id, bool) or not isinstance(class_id, int) or not 1 <= class_id <= 254:
            raise DiffuMaskError(
                f"{label}: id must be an integer in 1..254 (0 is background, 255 ignore), "
                f"got {class_id!r}"
            )
        if class_id in seen_ids:
            raise DiffuMaskError(
                f"{label}: duplicate id {class_id}, already used by {seen_ids[class_id]}"
            )
        seen_ids[class_id] = label
        class_name = _string(raw["name"], f"{label}: name")
        # Class names become file and folder names in exports and FiftyOne media.
        bad = [c for c in PATH_CHARACTERS if c in class_name]
        if bad or class_name in (".", ".."):
            raise DiffuMaskError(
                f"{label}: name {class_name!r} contains the path character "
                f"{(bad or [class_name])[0]!r}; rename the class, e.g. "
                f"{class_name.replace('/', '_').replace(chr(92), '_').strip('.') or 'thing'!r}"
            )
        if class_name in seen_names:
            raise DiffuMaskError(
                f"{label}: duplicate name {class_name!r}, already used by {seen_names[class_name]}"
            )
        seen_names[class_name] = label
        color = raw.get("color")
        if color is not None:
            valid = (
                isinstance(color, Sequence)
                and len(color) == 3
                and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
            )
            if not valid:
                raise DiffuMaskError(f"{label}: color must be [r, g, b] in 0..255, got {color!r}")
            color = tuple(color)
        own_templates = (
            _templates(raw["templates"], f"{label}: templates", ["class"])
            if raw.get("templates")
            else None
        )
        cls = ClassDef(
            id=class_id,
            name=class_name,
            prompt=_string(raw["prompt"], f"{label}: prompt"),
            synonyms=_strings(raw.get("synonyms"), f"{label}: synonyms"),
            sub_classes=_strings(raw.get("sub_classes"), f"{label}: sub_classes"),
            templates=own_templates,
            color=color,
            prior=_prior(raw.get("prior"), label),
        )
        classes.append(cls)

    classes.sort(key=lambda c: c.id)
    definition = Definition(
        name=name,
        classes=tuple(classes),
        title=str(data.get("title") or ""),
        description=str(data.get("description") or "").strip(),
        background=background,
        defaults=dict(defaults),
        templates=templates,
        pair_templates=pair_templates,
        negative_prompt=negative,
        source=source,
    )
    _check_prompts_name_their_class(definition)
    return definition


def _check_prompts_name_their_class(definition: Definition) -> None:
    # The masks come from the attention on the class words: a prompt that never names its
    # class gives an empty mask, so refuse such a definition when it is loaded.
    for cls in definition.classes:
        for template in definition.templates_for(cls):
            for sub_class in cls.sub_classes or ("",):
                prompt = render(template, cls, sub_class)
                if not any(mentions(prompt, word) for word in cls.words):
                    raise DiffuMaskError(
                        f"{definition.source}: class {cls.name!r}: prompt {prompt!r} (template "
                        f"{template!r}) names the class by none of {list(cls.words)}; add the "
                        "word to the class's synonyms or change the template"
                    )
