"""One served model of the web UI and HTTP API: its tag settings, what it offers, and request validation.

`WebModel` holds a loaded `Tagger` with the tag settings the CLI gives it (`hydra.cli.load_run`) and reads
everything else from the model's family: the size control (JTP-3's sequence length, the DINOv3 tagger's
long-edge cap), the default selection (a calibration when the family has one, else the slider, or the top k
for uncalibrated families), whether categories, implications and the CAM are available. Every request setting
is validated here; a bad one is a `UserError` whose text is shown to the user.

Where it differs from the original WebUI, on purpose: the threshold slider spans the whole symmetric scale
(-1..1, default 0.30 as the original); calibrations compare each tag's probability with its own threshold
(the original compared the symmetric score, a bug) and tags missing from the calibration never pass (as the
CLI); implications, category exclusion, the image size and a top-k selection can be changed; captions use the
.txt caption spelling of the CLI.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from hydra.bulk.loader import describe_error
from hydra.models.family import DEFAULT_TOPK
from hydra.tagger import Tagger
from hydra.tags.rules import (
    CATEGORIES,
    SUBCATEGORIES,
    CaptionFormat,
    DataFileError,
    TagRules,
    TagSettings,
    category_names,
    category_vector,
    from_symmetric,
    load_calibration,
    ranked,
)

# What the UI and the API accept; every request is validated against these.
THRESHOLD_MIN, THRESHOLD_MAX = -1.0, 1.0  # symmetric scale s = 2p - 1
DEFAULT_THRESHOLD = 0.30     # the original WebUI's default (s >= 0.30, i.e. p >= 0.65)
SOURCE_SLIDER = "Threshold slider"
SOURCE_DEFAULT = "calibration.csv"
SOURCE_UPLOAD = "Uploaded calibration"
SOURCE_MODEL = "Model calibration"  # thresholds from the validation counts the model file carries (Hydra 3.5)
SOURCE_TOPK = "Top k"


class UserError(ValueError):
    """A bad request; str(e) is shown to the user (UI) or returned as {"error": ...} (API)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class WebModel:
    """One served model: the tagger, the CLI's tag settings for it, and validation of request settings.

    Args:
        name: what the UI's model selector shows and the API's `model` field takes.
        path: the model file.
        tagger: the loaded tagger.
        settings: its tag settings; `settings.threshold` is the calibration from calibration.csv (a dict) when
            that file was loaded at start-up (families calibrated by a CSV, as in the CLI).
    """

    def __init__(self, name: str, path: str, tagger: Tagger, settings: TagSettings):
        self.name, self.path, self.tagger, self.settings = name, path, tagger, settings
        self.family = tagger.family
        self.labels = settings.labels  # rewritten, model order
        self.names = [t.replace("_", " ") for t in self.labels]  # the original UI's display spelling
        self.position = {t: i for i, t in enumerate(self.labels)}
        self.by_name = {**{n: i for i, n in reversed(list(enumerate(self.names)))}, **self.position}
        self.category = category_vector(self.labels, settings.metadata)
        self.category_names = category_names(self.labels, settings.metadata)  # a model's own categories too
        self.has_categories = settings.metadata is not None  # a tags CSV, or categories the model carries
        self.has_implications = self.has_categories and any(settings.metadata.implies.values())
        self.default_mode = settings.mode if self.has_implications else "off"
        self.embedded = self.family.calibration == "embedded"
        csv = isinstance(settings.threshold, dict) and not self.embedded
        self.default_calibration = settings.threshold if csv else None  # calibration.csv at start-up
        self._metric_thresholds: dict[str, dict[str, float]] = {}  # embedded calibrations by metric
        self.default_topk = settings.topk or DEFAULT_TOPK
        self.cam_depth: int | None = tagger.model.cam_depth
        self.calls = 0  # forwards run, for /api/health (and the tests' "re-filtered without the model")
        self.cam_layers: tuple[tuple[str, int], list] | None = None  # ((image key, size), block outputs)

    @property
    def size_control(self):
        return self.family.size

    @property
    def default_size(self) -> int:
        """The size the model was loaded with (-S or --max-size, as its family uses)."""
        return self.tagger.size

    @property
    def default_source(self) -> str:
        """How tags are selected until the user says otherwise: as `inference.py` without `-t`."""
        if self.default_calibration:
            return SOURCE_DEFAULT
        if self.embedded and isinstance(self.settings.threshold, dict):
            return SOURCE_MODEL
        return SOURCE_TOPK if self.settings.topk else SOURCE_SLIDER

    @property
    def sources(self) -> list[str]:
        return [SOURCE_SLIDER, *([SOURCE_DEFAULT] if self.default_calibration else []),
                *([SOURCE_MODEL] if self.embedded else []), SOURCE_UPLOAD, SOURCE_TOPK]

    def model_thresholds(self, metric: str | None) -> dict[str, float]:
        """The thresholds a metric chooses from the model's own validation counts (cached per metric)."""
        from hydra.calibration.embedded import DEFAULT_METRIC, parse_metric
        from hydra.cli import embedded_calibration

        try:
            parsed = parse_metric(metric or DEFAULT_METRIC)
        except ValueError as e:
            raise UserError(str(e)) from None
        key = str(parsed)
        if key not in self._metric_thresholds:
            self._metric_thresholds[key] = embedded_calibration(self.labels, self.tagger.model.validation, parsed)
        return self._metric_thresholds[key]

    def size(self, value: float | str | None) -> int:
        """A size control's value validated for this model (None = the start-up size)."""
        if value is None or value == "":
            return self.default_size
        control = self.family.size
        return clamp_int(value, control.minimum, control.maximum, f"The {control.label.lower()}")

    def preprocess(self, data: bytes, size: int) -> dict[str, np.ndarray]:
        """The image file's sample at `size`, as the model's own preprocessing makes it (from the bytes, so
        each family decodes as it does in the CLI: EXIF, colour management, its own library)."""
        # Changing the Tagger's size from concurrent requests would race: use a preprocessor of this size.
        pre = self.tagger.preprocess if size == self.default_size else self.tagger.preprocessor(size)
        try:
            return pre(data)
        except Exception as e:  # any decoder failure is the file's fault (or an extreme aspect ratio)
            raise UserError(f"Not a usable image: {describe_error(e)}.") from None

    # -- tag rules ---------------------------------------------------------------------------------

    def rules(self, threshold: float | str | None = DEFAULT_THRESHOLD, source: str = SOURCE_SLIDER,
              calibration: dict[str, float] | None = None, mode: str | None = None,
              exclude: list[str] | None = None, topk: float | str | None = None,
              metric: str | None = None, **changes) -> TagRules:
        """Validated request settings -> TagRules (the CLI's own classification).

        Args:
            threshold: symmetric threshold (-1..1), used with SOURCE_SLIDER.
            source: SOURCE_SLIDER, SOURCE_DEFAULT (the start-up calibration), SOURCE_MODEL (thresholds from the
                model's validation counts with `metric`), SOURCE_UPLOAD (`calibration`) or SOURCE_TOPK (the `topk`
                most probable tags; None = this model's default).
            mode: implications mode (None = the model's default); exclude: category names.
            changes: more `TagSettings` fields, already validated (the batch tab's `exclude_tags`,
                `category_thresholds`, `max_tags`).
        """
        k = None
        if source == SOURCE_TOPK:
            k, thresholds = parse_topk(self.default_topk if topk in (None, "") else topk), 0.0
        elif source == SOURCE_DEFAULT:
            if self.default_calibration is None:
                raise UserError("There was no usable calibration.csv in the current folder at start-up."
                                if self.family.calibration == "csv" else
                                f"calibration.csv is not used for {self.family.title} models (as in inference.py); "
                                "upload a calibration made for this model instead.")
            thresholds = self.default_calibration
        elif source == SOURCE_MODEL:
            if not self.embedded:
                raise UserError(f"'{self.name}' carries no validation counts to calibrate from; use a threshold, "
                                "a calibration CSV or top k.")
            thresholds = self.model_thresholds(metric)
        elif source == SOURCE_UPLOAD:
            if not calibration:
                raise UserError("Upload a calibration CSV first (for this model).")
            thresholds = calibration
        elif source == SOURCE_SLIDER:
            thresholds = from_symmetric(parse_symmetric(threshold))
        else:
            raise UserError(f"Unknown threshold source {source!r}; choose from {', '.join(self.sources)}.")
        mode = mode or self.default_mode
        if mode not in self.family.implication_modes:
            raise UserError(f"Unknown implications mode {mode!r}; choose from "
                            f"{', '.join(self.family.implication_modes)}.")
        if mode != "off" and not self.has_implications:
            raise UserError(f"Implications need implication data, which '{self.name}' does not have "
                            "(use mode 'off').")
        choices = [*CATEGORIES, *SUBCATEGORIES]
        bad = [c for c in exclude or [] if c not in choices]
        if bad:
            raise UserError(f"Unknown category {bad[0]!r}; choose from {', '.join(choices)}.")
        if exclude and not self.has_categories:
            raise UserError(f"Category exclusion needs tag categories, which '{self.name}' does not have.")
        return self.settings.rules(threshold=thresholds, mode=mode, exclude=list(exclude or []), topk=k, **changes)

    def load_calibration(self, path: str, shown_name: str | None = None) -> dict[str, float]:
        """A calibration CSV for this model (its tag spelling), with errors the user can act on."""
        shown = shown_name or os.path.basename(path)
        try:
            thresholds = load_calibration(path, self.settings.rewrite)
        except DataFileError as e:
            raise UserError(f"Wrong calibration file: {str(e).replace(path, shown)}") from None
        except (UnicodeDecodeError, ValueError, OSError) as e:
            raise UserError(f"Wrong calibration file {shown!r}: not a UTF-8 CSV ({type(e).__name__}).") from None
        if not thresholds:
            raise UserError(f"Wrong calibration file {shown!r}: it sets no thresholds.")
        return thresholds

    def classify(self, probs: np.ndarray, rules: TagRules) -> list[tuple[str, float]]:
        """Passing tags with their (implication-adjusted) probabilities, most probable first."""
        return ranked(rules.classify(probs))

    def caption(self, tags: list[tuple[str, float]], captions: CaptionFormat | None = None, prefix: str = "") -> str:
        """The .txt caption of classified tags, as the CLI writes it for this model (its family's order and
        spelling), in `captions` (None: the model's format) after the `-p` items of `prefix`."""
        return (captions or self.settings.captions).caption(
            dict(sorted(tags, key=lambda tp: self.position[tp[0]])), prefix)

    def category_name(self, tag: str) -> str | None:
        """Category name: e621's, or one the model names (Hydra 3.5); "unassigned" for -1 or an unknown id; None
        when the model has no categories."""
        if not self.has_categories:
            return None
        return self.category_names[self.position[tag]]

    def describe(self) -> dict[str, Any]:
        """This model's entry in /api/health."""
        model = self.tagger.model
        return {"model": self.name, "family": self.family.name, "title": model.title, "tags": len(self.labels),
                "extensions": [e.label for e in model.extensions], "device": str(self.tagger.device),
                self.family.size.name: self.default_size, "calibration": self.default_source in (SOURCE_DEFAULT, SOURCE_MODEL),
                "categories": self.has_categories, "implications": self.has_implications,
                "cam": self.cam_depth is not None, "model_calls": self.calls}


def parse_symmetric(value: float | str | None) -> float:
    """A threshold on the symmetric scale, validated (UserError names the valid range)."""
    try:
        s = float(DEFAULT_THRESHOLD if value is None or value == "" else value)
    except (TypeError, ValueError):
        s = float("nan")
    if not THRESHOLD_MIN <= s <= THRESHOLD_MAX:  # also false for NaN
        raise UserError(f"The threshold must be a number between {THRESHOLD_MIN:g} and {THRESHOLD_MAX:g}, "
                        f"got {value!r}.")
    return s


def whole_number(value, minimum: int) -> int:
    """A form or JSON value (number or text) as an int, if it is a whole number of at least `minimum`.

    Raises:
        ValueError: not a number, a bool, NaN, infinite, fractional or below `minimum`.
    """
    try:
        n = float(value)
    except (TypeError, ValueError):
        n = float("nan")
    if isinstance(value, bool) or not (math.isfinite(n) and n >= minimum and n == int(n)):
        raise ValueError(value)
    return int(n)


def parse_topk(value: float | str) -> int:
    """A top-k count: a whole number of at least 1 (more than the model's tags simply keeps them all)."""
    try:
        return whole_number(value, 1)
    except ValueError:
        raise UserError(f"Top k must be a whole number of at least 1, got {value!r}.") from None


def clamp_int(value, low: int, high: int, what: str) -> int:
    """A slider value as an int clamped to [low, high] (sliders can only overshoot through the API)."""
    try:
        number = float(value)
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError(value)
        return int(np.clip(round(number), low, high))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number from {low} to {high}.") from None
