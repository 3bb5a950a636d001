"""What `app.py` does with a request, for the web UI and the HTTP API alike; no Gradio, no web framework.

`WebModel` is one served model with the tag settings the CLI gives it (`inference.load`): its labels and
categories, whether it has implication data, its default selection (JTP-3: calibration.csv when present,
else the threshold; DINOv3: the top 30, as its CLI) and the size control it understands (JTP-3: the NaFlex
sequence length; DINOv3: the long-edge cap). Every request setting is validated here, and a bad one is a
`UserError` whose text is shown to the user.

`WebService` holds the models in the order they were configured (the first is the default), one lock so
that a single forward (or CAM) runs at a time whichever the model, and a small cache of recent images
whose samples and probabilities are kept per (model, size): moving a control, or switching back to a
model, only re-filters. `hydra/webui.py` puts the Gradio page and the `/api/*` routes on top of it.

Where it differs from the original WebUI (spec §9), on purpose: the threshold slider spans the whole
symmetric scale (-1..1, default 0.30 as the original); calibrations compare each tag's probability with
its own threshold (the original compared the symmetric score, a bug) and tags missing from the
calibration never pass (as the CLI); implications, category exclusion, the image size and a top-k
selection can be changed; captions use the .txt caption spelling of the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hydra.bulk.loader import describe_error
from hydra.bulk.run import SKIP_SUFFIXES, CsvSink, image_extensions
from hydra.fetch import FetchError, fetch_url
from hydra.images.naflex import MAX_SEQLEN, MIN_SEQLEN, open_image
from hydra.models.vocab import E621_CATEGORY_NAMES, UNASSIGNED
from hydra.tagger import DINOV3, JTP3, Tagger
from hydra.tags.implications import MODES
from hydra.tags.rules import (
    CATEGORIES,
    DataFileError,
    TagRules,
    TagSettings,
    category_vector,
    format_caption,
    from_symmetric,
    load_calibration,
    threshold_vector,
)
from hydra.web.cam import block_outputs, class_activation_map, display_image, draw_overlay

# What the UI and the API accept; every request is validated against these.
THRESHOLD_MIN, THRESHOLD_MAX = -1.0, 1.0  # symmetric scale s = 2p - 1
DEFAULT_THRESHOLD = 0.30     # the original WebUI's default (s >= 0.30, i.e. p >= 0.65)
DEFAULT_TOPK = 30            # inference.py's default for the DINOv3 tagger, whose probabilities are uncalibrated
MAX_SIZE_MIN, MAX_SIZE_MAX = 64, 4096  # DINOv3 long-edge cap: the published UI's "Max px" range
CACHE_IMAGES = 16            # recent images kept for re-filtering (bytes + display image + probabilities)
BATCH_SIZE = 4               # images per model call in a batch
SOURCE_SLIDER = "Threshold slider"
SOURCE_DEFAULT = "calibration.csv"
SOURCE_UPLOAD = "Uploaded calibration"
SOURCE_TOPK = "Top k"
NO_CAM = "(none)"
FAMILY_TITLES = {JTP3: "JTP-3 Hydra", DINOV3: "DINOv3 tagger"}
CATEGORY_ORDER = [*sorted(k for k in E621_CATEGORY_NAMES if k != UNASSIGNED), UNASSIGNED]  # e621 ids, -1 last


@dataclass(frozen=True)
class Limits:
    """What this server accepts from a client (set by app.py's flags)."""

    max_upload_bytes: int    # one image (upload, URL body or zip member)
    max_pixels: int          # refuse larger images before decoding them
    url_timeout: float       # seconds for a whole URL fetch
    batch_max_files: int     # images in one batch request (zip members included)
    batch_max_bytes: int     # total bytes of one batch request, uncompressed


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
        tagger: the loaded tagger (as returned by `inference.load`).
        settings: its tag settings; `settings.threshold` is the calibration from calibration.csv (a dict) when
            that file was loaded at start-up (JTP-3 models only, as in the CLI).
        vocab_path: the DINOv3 vocabulary file, shown in the UI.
    """

    def __init__(self, name: str, path: str, tagger: Tagger, settings: TagSettings, vocab_path: str | None = None):
        self.name, self.path, self.tagger, self.settings, self.vocab_path = name, path, tagger, settings, vocab_path
        self.family = tagger.family
        self.labels = settings.labels  # rewritten, model order
        self.names = [t.replace("_", " ") for t in self.labels]  # the original UI's display spelling
        self.position = {t: i for i, t in enumerate(self.labels)}
        self.by_name = {**{n: i for i, n in reversed(list(enumerate(self.names)))}, **self.position}
        self.category = category_vector(self.labels, settings.metadata)
        self.has_categories = settings.metadata is not None  # JTP-3 tag CSV, or a DINOv3 vocab with categories
        self.has_implications = self.has_categories and any(settings.metadata.implies.values())
        self.default_mode = settings.mode if self.has_implications else "off"
        self.default_calibration = settings.threshold if isinstance(settings.threshold, dict) else None
        self.default_topk = settings.topk or DEFAULT_TOPK
        self.calls = 0  # forwards run, for /api/health (and the tests' "re-filtered without the model")
        self.cam_layers: tuple[tuple[str, int], list] | None = None  # ((image key, seqlen), block outputs)

    @property
    def jtp3(self) -> bool:
        return self.family == JTP3

    @property
    def default_source(self) -> str:
        """How tags are selected until the user says otherwise: as `inference.py` without `-t`."""
        if self.default_calibration:
            return SOURCE_DEFAULT
        return SOURCE_TOPK if self.settings.topk else SOURCE_SLIDER

    @property
    def sources(self) -> list[str]:
        return [SOURCE_SLIDER, *([SOURCE_DEFAULT] if self.default_calibration else []), SOURCE_UPLOAD, SOURCE_TOPK]

    @property
    def default_size(self) -> int:
        """The size the model was loaded with: JTP-3 sequence length (-S) or DINOv3 long-edge cap (--max-size)."""
        return self.tagger.seqlen if self.jtp3 else self.tagger.max_size

    @property
    def exif(self) -> bool:
        """Whether the model sees images EXIF-rotated (JTP-3 does; the DINOv3 script does not, unless --exif)."""
        return self.jtp3 or self.tagger.preprocess.exif

    def size(self, value: float | str | None) -> int:
        """A size control's value validated for this model (None = the start-up size)."""
        if value is None or value == "":
            return self.default_size
        if self.jtp3:
            return clamp_int(value, MIN_SEQLEN, MAX_SEQLEN, "The sequence length")
        return clamp_int(value, MAX_SIZE_MIN, MAX_SIZE_MAX, "The max size")

    def preprocess(self, img: Image.Image, size: int) -> dict:
        # Tagger.preprocess is built for one size, and changing the Tagger's size from concurrent requests
        # would race: use a copy of the very same preprocessing object with this request's size.
        pre = self.tagger.preprocess
        if size != self.default_size:
            pre = dataclasses.replace(pre, **{"seqlen" if self.jtp3 else "max_size": size})
        try:
            return pre(img)
        except (ValueError, OSError) as e:  # e.g. an extreme aspect ratio that fits no sequence length
            raise UserError(f"Cannot prepare this image: {describe_error(e)}") from None

    # -- tag rules ---------------------------------------------------------------------------------

    def rules(self, threshold: float | str | None = DEFAULT_THRESHOLD, source: str = SOURCE_SLIDER,
              calibration: dict[str, float] | None = None, mode: str | None = None,
              exclude: list[str] | None = None, topk: float | str | None = None) -> TagRules:
        """Validated request settings -> TagRules (the CLI's own classification).

        Args:
            threshold: symmetric threshold (-1..1), used with SOURCE_SLIDER.
            source: SOURCE_SLIDER, SOURCE_DEFAULT (calibration.csv), SOURCE_UPLOAD (`calibration`) or
                SOURCE_TOPK (the `topk` most probable tags; None = this model's default).
            mode: implications mode (None = the model's default); exclude: category names.
        """
        k = None
        if source == SOURCE_TOPK:
            k, thresholds = parse_topk(self.default_topk if topk in (None, "") else topk), 0.0
        elif source == SOURCE_DEFAULT:
            if self.default_calibration is None:
                raise UserError("There was no usable calibration.csv in the current folder at start-up."
                                if self.jtp3 else "calibration.csv is for JTP-3 models (as in inference.py); "
                                "upload a calibration made for this model instead.")
            thresholds = self.default_calibration
        elif source == SOURCE_UPLOAD:
            if not calibration:
                raise UserError("Upload a calibration CSV first (for this model).")
            thresholds = calibration
        elif source == SOURCE_SLIDER:
            thresholds = from_symmetric(parse_symmetric(threshold))
        else:
            raise UserError(f"Unknown threshold source {source!r}; choose from {', '.join(self.sources)}.")
        mode = mode or self.default_mode
        if mode not in MODES:
            raise UserError(f"Unknown implications mode {mode!r}; choose from {', '.join(MODES)}.")
        if mode != "off" and not self.has_implications:
            raise UserError(f"Implications need implication data, which '{self.name}' does not have "
                            "(use mode 'off').")
        bad = [c for c in exclude or [] if c not in CATEGORIES]
        if bad:
            raise UserError(f"Unknown category {bad[0]!r}; choose from {', '.join(CATEGORIES)}.")
        if exclude and not self.has_categories:
            raise UserError(f"Category exclusion needs tag categories, which '{self.name}' does not have.")
        excluded = np.isin(self.category, [CATEGORIES[c] for c in exclude]) if exclude else None
        graph = self.settings.graph if self.has_implications else None
        return TagRules(self.labels, threshold_vector(self.labels, thresholds), graph, mode, excluded, k)

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
        tags = rules.classify(probs)
        return sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))

    def category_name(self, tag: str) -> str | None:
        """e621 category name ("unassigned" for -1 or an unknown id); None when the model has no categories."""
        if not self.has_categories:
            return None
        return E621_CATEGORY_NAMES.get(int(self.category[self.position[tag]]), E621_CATEGORY_NAMES[UNASSIGNED])

    def describe(self) -> dict:
        """This model's entry in /api/health."""
        jtp3 = self.jtp3
        return {"model": self.name, "family": self.family,
                "title": self.tagger.model.metadata.get("modelspec.title") if jtp3 else None,
                "tags": len(self.labels), "extensions": [e.label for e in self.tagger.model.extensions] if jtp3 else [],
                "device": str(self.tagger.device), ("seqlen" if jtp3 else "max_size"): self.default_size,
                "calibration": self.default_calibration is not None, "categories": self.has_categories,
                "implications": self.has_implications, "cam": jtp3, "model_calls": self.calls}


@dataclass
class _Entry:
    """One image the UI has seen: its bytes, how it is shown, and its JTP-3 samples and probabilities per
    (model name, size)."""

    data: bytes
    name: str
    display: Image.Image
    samples: dict[tuple[str, int], dict] = field(default_factory=dict)
    probs: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)


class WebService:
    """The served models plus what the UI and API need around them; safe to call from many threads.

    Args:
        models: the models in the order they were configured; the first is the default. Names must differ.
        limits: request limits.
    """

    def __init__(self, models: Sequence[WebModel], limits: Limits):
        names = [m.name for m in models]
        assert names and len(set(names)) == len(names), names
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.limits = limits
        self.lock = threading.Lock()  # one forward (or CAM) at a time, whichever the model: they share a device
        self._cache_lock = threading.Lock()
        self._images: OrderedDict[str, _Entry] = OrderedDict()
        self.tmpdir = tempfile.mkdtemp(prefix="hydra-webui-")

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def model(self, name: str | None = None) -> WebModel:
        """The model called `name` (None or "" = the default one)."""
        if name is None or name == "":
            return self.default
        if not isinstance(name, str) or name not in self.models:
            raise UserError(f"Unknown model {name!r}; choose from {', '.join(map(repr, self.models))}.")
        return self.models[name]

    @property
    def model_calls(self) -> int:
        return sum(m.calls for m in self.models.values())

    # -- inputs ------------------------------------------------------------------------------------

    def read_file(self, path: str | None) -> bytes:
        if not path:
            raise UserError("No image: upload, drop or paste one, or give a URL.")
        size = os.path.getsize(path)
        if size > self.limits.max_upload_bytes:
            raise UserError(f"The file is {size / 2**20:.1f} MiB, over the {self.limits.max_upload_bytes / 2**20:.0f}"
                            " MiB limit.", 413)
        with open(path, "rb") as f:
            return f.read()

    def fetch(self, url: str) -> bytes:
        try:
            return fetch_url(url, timeout=self.limits.url_timeout, max_bytes=self.limits.max_upload_bytes)
        except FetchError as e:
            raise UserError(f"Could not fetch the URL: {e}.") from None

    def decode(self, data: bytes, exif: bool = True) -> Image.Image:
        try:
            return open_image(data, self.limits.max_pixels, exif=exif)
        except Exception as e:  # any decoder failure is the file's fault, never the server's
            raise UserError(f"Not a usable image: {describe_error(e)}.") from None

    def add_image(self, data: bytes, name: str, model: WebModel | None = None, size: int | None = None) -> str:
        """Decode, remember and return the cache key of an image (sha256 of its bytes); with a JTP-3 `model`,
        also prepare its sample at `size` while the image is decoded."""
        key = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            if key in self._images:
                self._images.move_to_end(key)
                self._images[key].name = name  # the caption download is named after the latest upload
                return key
        img = self.decode(data)
        entry = _Entry(data, name, display_image(img))
        if model is not None and model.jtp3:
            size = model.default_size if size is None else size
            entry.samples[model.name, size] = model.preprocess(img, size)
        with self._cache_lock:
            self._images[key] = entry
            while len(self._images) > CACHE_IMAGES:
                self._images.popitem(last=False)
        return key

    def entry(self, key: str | None) -> _Entry:
        with self._cache_lock:
            entry = self._images.get(key or "")
        if entry is None:
            raise UserError("No image yet (or it has left the server's cache): upload it again.")
        return entry

    # -- the models ---------------------------------------------------------------------------------

    def predict(self, model: WebModel, samples: list[dict]) -> np.ndarray:
        """(B, T) probabilities of preprocessed images, with the CLI's own `predict_samples`."""
        with self.lock:
            model.calls += 1
            return model.tagger.predict_samples(samples)

    def sample(self, model: WebModel, key: str, size: int) -> dict:
        """The image preprocessed for `model`: kept for JTP-3 models, whose CAM needs it again (a DINOv3 sample
        is used once, and is 9 MB of float32 pixels at 1024 px)."""
        entry = self.entry(key)
        sample = entry.samples.get((model.name, size))
        if sample is None:
            sample = model.preprocess(self.decode(entry.data, model.exif), size)  # DINOv3: no EXIF unless --exif
            if model.jtp3:
                entry.samples[model.name, size] = sample
        return sample

    def probabilities(self, model: WebModel, key: str, size: int) -> np.ndarray:
        """(T,) probabilities, cached: each model runs once per (image, size)."""
        entry = self.entry(key)
        if (model.name, size) not in entry.probs:
            entry.probs[model.name, size] = self.predict(model, [self.sample(model, key, size)])[0]
        return entry.probs[model.name, size]

    def cam(self, model: WebModel, key: str, size: int, tag: str, depth: float) -> Image.Image:
        """The display image with the CAM of `tag` over it (or without one for NO_CAM / no tag)."""
        entry = self.entry(key)
        if not tag or tag == NO_CAM:
            return entry.display
        if not model.jtp3:
            raise UserError(f"CAM is available for JTP-3 models; '{model.name}' is a {FAMILY_TITLES[model.family]}.")
        if tag not in model.by_name:
            raise UserError(f"Unknown tag {tag!r} for the CAM.")
        depth = clamp_int(depth, 1, model.tagger.model.depth, "The CAM depth")
        sample = self.sample(model, key, size)
        with self.lock:
            cached = model.cam_layers
            if cached is None or cached[0] != (key, size) or len(cached[1]) < depth:
                # keep the block outputs of the last image: trying other tags then skips the backbone
                cached = ((key, size), block_outputs(model.tagger.model, sample, depth))
                model.cam_layers = cached
            cam = class_activation_map(model.tagger.model, sample, model.by_name[tag], depth, cached[1])
        return draw_overlay(entry.display, cam)

    # -- batch -------------------------------------------------------------------------------------

    def batch(self, model: WebModel, paths: list[str], rules: TagRules, size: int,
              progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[str, str, str]:
        """Tag many uploaded images and zips; returns (captions zip, probabilities CSV, summary)."""
        items = list(self._batch_items(paths or []))
        if not items:
            raise UserError("No images in the upload (zips are searched for image files).")
        out = tempfile.mkdtemp(dir=self.tmpdir)
        zip_path, csv_path = os.path.join(out, "captions.zip"), os.path.join(out, "probabilities.csv")
        sink, failures, tagged, taken = CsvSink(csv_path, model.labels), [], 0, set()
        try:
            with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
                for start in range(0, len(items), BATCH_SIZE):
                    names, samples = [], []
                    for name, read in items[start:start + BATCH_SIZE]:
                        try:
                            samples.append(model.preprocess(self.decode(read(), model.exif), size))
                            names.append(name)
                        except Exception as e:  # one bad file (or zip member) never stops the batch
                            failures.append((name, str(e) if isinstance(e, UserError) else describe_error(e)))
                    if samples:
                        for name, row in zip(names, self.predict(model, samples)):
                            zf.writestr(_unique(os.path.splitext(name)[0] + ".txt", taken),
                                        format_caption(rules.classify(row)))
                            sink.write(name, row)
                            tagged += 1
                    progress(min(start + BATCH_SIZE, len(items)), len(items))
        finally:
            sink.close(True)
        lines = [f"Tagged {tagged} image{'s' * (tagged != 1)}, {len(failures)} failed."]
        lines += [f"- `{name}`: {reason}" for name, reason in failures[:50]]
        return zip_path, csv_path, "\n".join(lines)

    def _batch_items(self, paths: list[str]) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """(name, read) for every uploaded file, and for every image inside uploaded zips."""
        count, total, cap = 0, 0, self.limits.max_upload_bytes
        exts = image_extensions()
        for path in paths:
            if zipfile.is_zipfile(path):
                members = _zip_members(path, exts, cap)
            else:
                members = [(os.path.basename(path), os.path.getsize(path), functools.partial(_read, path, cap))]
            for name, size, read in members:
                count, total = count + 1, total + size
                if count > self.limits.batch_max_files:
                    raise UserError(f"Too many images: at most {self.limits.batch_max_files} per batch.", 413)
                if total > self.limits.batch_max_bytes:
                    raise UserError(f"The batch is over {self.limits.batch_max_bytes / 2**20:.0f} MiB "
                                    "(uncompressed).", 413)
                yield name, read

    # -- HTTP API ----------------------------------------------------------------------------------

    def tag_request(self, fields: dict, data: bytes | None) -> dict:
        """`POST /api/tag` once the body is parsed: the image bytes (or `url`) and the optional fields
        `model`, `threshold` or `topk`, `implications`, `exclude`."""
        model = self.model(_optional_str(fields, "model"))
        if data is None:
            url = fields.get("url")
            if not isinstance(url, str) or not url.strip():
                raise UserError("Send an 'image' file (multipart/form-data) or a 'url' (JSON or form field).")
            data = self.fetch(url)
        if not data:
            raise UserError("The image is empty.")
        threshold, topk = fields.get("threshold"), fields.get("topk")
        if threshold not in (None, "") and topk not in (None, ""):
            raise UserError("Give either 'threshold' or 'topk', not both.")
        source = (SOURCE_TOPK if topk not in (None, "") else SOURCE_SLIDER if threshold not in (None, "")
                  else model.default_source)
        exclude = fields.get("exclude") or []
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise UserError("'exclude' must be a category name or a list of them.")
        exclude = [c for x in exclude for c in x.replace(",", " ").split()]
        rules = model.rules(threshold, source, None, _optional_str(fields, "implications"), exclude, topk)
        sample = model.preprocess(self.decode(data, model.exif), model.default_size)
        tags = model.classify(self.predict(model, [sample])[0], rules)
        return {"model": model.name,
                "tags": [{"tag": t, "probability": p, "category": model.category_name(t)} for t, p in tags],
                "caption": format_caption(dict(tags))}

    def health(self) -> dict:
        """`GET /api/health`: the default model's description at the top level, every model under "models"."""
        models = [m.describe() for m in self.models.values()]
        return {"status": "ok", **models[0], "models": models, "model_calls": self.model_calls}


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


def parse_topk(value: float | str) -> int:
    """A top-k count: a whole number of at least 1 (more than the model's tags simply keeps them all)."""
    try:
        k = float(value)
    except (TypeError, ValueError):
        k = float("nan")
    if isinstance(value, bool) or not (k >= 1 and k == int(k)):  # also false for NaN and inf
        raise UserError(f"Top k must be a whole number of at least 1, got {value!r}.")
    return int(k)


def clamp_int(value, low: int, high: int, what: str) -> int:
    """A slider value as an int clamped to [low, high] (sliders can only overshoot through the API)."""
    try:
        return int(np.clip(round(float(value)), low, high))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number from {low} to {high}.") from None


def _optional_str(fields: dict, name: str) -> str | None:
    value = fields.get(name) or None
    if value is not None and not isinstance(value, str):
        raise UserError(f"'{name}' must be a string.")
    return value


def _read(path: str, cap: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"over the {cap / 2**20:.0f} MiB limit per image", 413)
    return data


def _zip_members(path: str, exts: frozenset[str], cap: int) -> list[tuple[str, int, Callable[[], bytes]]]:
    """Image members of a zip with safe relative names; sizes are the declared uncompressed sizes."""
    def read(info: zipfile.ZipInfo) -> bytes:
        with zipfile.ZipFile(path) as zf, zf.open(info) as f:
            data = f.read(cap + 1)  # the declared size may lie: read at most one byte over the cap
        if len(data) > cap:
            raise UserError(f"over the {cap / 2**20:.0f} MiB limit per image", 413)
        return data

    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            parts = [p for p in posixpath.normpath(info.filename.replace("\\", "/")).split("/")
                     if p not in ("", ".", "..")]
            name = "/".join(parts)
            if info.is_dir() or not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in exts and suffix not in SKIP_SUFFIXES:
                out.append((name, info.file_size, functools.partial(read, info)))
    return out


def _unique(name: str, taken: set[str]) -> str:
    stem, ext = os.path.splitext(name)
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{stem}-{n}{ext}"
    taken.add(candidate)
    return candidate
