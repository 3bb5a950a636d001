"""What `app.py` does with a request, for the web UI and the HTTP API alike; no Gradio, no web framework.

`WebService` holds the served models (`hydra/web/model.py`) in the order they were configured (the first is
the default), one lock so that a single forward (or CAM) runs at a time whichever the model, and a small cache
of recent images whose samples and probabilities are kept per (model, size): moving a control, or switching
back to a model, only re-filters. Batch zips are `hydra/web/batch.py`; `hydra/web/page.py` and
`hydra/web/api.py` put the Gradio page and the `/api/*` routes on top.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from hydra.bulk.loader import describe_error
from hydra.common import log
from hydra.fetch import FetchError, fetch_url
from hydra.images.decode import open_image
from hydra.tags.rules import TagRules, from_symmetric
from hydra.web import batch as batches
from hydra.web.cam import block_outputs, class_activation_map, display_image, draw_overlay
from hydra.web.model import (
    SOURCE_MODEL,
    SOURCE_SLIDER,
    SOURCE_TOPK,
    UserError,
    WebModel,
    clamp_int,
    parse_symmetric,
    parse_topk,
)

# Every refused or failed URL fetch shows this one text (the log has the reason): distinct errors would tell a
# remote client which ports are open on the server's network.
FETCH_ERROR = ("Could not fetch the URL (refused, unreachable, no answer in time, an HTTP error, not http(s), "
               "or over the size limit); the server log has the reason.")
CACHE_IMAGES = 16            # recent images kept for re-filtering (bytes + display image + probabilities)
NO_CAM = "(none)"


DECODE_BYTES_PER_PIXEL = 6   # peak memory of decoding one pixel (a 13000 x 13000 PNG took ~0.85 GB: 5 B/px)
DECODE_MEMORY_SHARE = 0.5    # of the memory available at start-up, for concurrent decodes


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable, else free pages), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def decode_slots(max_pixels: int, memory: int | None = None) -> int:
    """How many images may be decoded at once: as many as half the available memory holds at the worst case
    (`max_pixels` x 6 bytes each), at least 1 and at most the CPU count (decoding is CPU-bound); the CPU count
    when the memory is unknown. Requests beyond it wait their turn."""
    cpus = max(1, os.cpu_count() or 1)
    memory = available_memory() if memory is None else memory
    if memory is None:
        return cpus
    return max(1, min(cpus, int(memory * DECODE_MEMORY_SHARE // (max_pixels * DECODE_BYTES_PER_PIXEL))))


@dataclass(frozen=True)
class Limits:
    """What this server accepts from a client (set by app.py's flags)."""

    max_upload_bytes: int    # one image (upload, URL body or zip member)
    max_pixels: int          # refuse larger images before decoding them
    url_timeout: float       # seconds for a whole URL fetch
    batch_max_files: int     # images in one batch request (zip members included)
    batch_max_bytes: int     # total bytes of one batch request, uncompressed
    allow_private_urls: bool = False  # fetch URLs on loopback, private and link-local addresses (trusted LAN)


@dataclass
class _Entry:
    """One image the UI has seen: its bytes, how it is shown, and its samples (for the CAM) and probabilities
    per (model name, size)."""

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

    def __init__(self, models: Sequence[WebModel], limits: Limits, decodes: int | None = None,
                 temp_max_age: float | None = None):
        names = [m.name for m in models]
        assert names and len(set(names)) == len(names), names
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.limits = limits
        self.lock = threading.Lock()  # one forward (or CAM) at a time, whichever the model: they share a device
        # decoding is where memory goes (0.85 GB for one 13000^2 PNG of 160 KB): a bounded number at once
        self.decode_slots = decodes or decode_slots(limits.max_pixels)
        self.decodes = threading.BoundedSemaphore(self.decode_slots)
        self._cache_lock = threading.Lock()
        self._images: OrderedDict[str, _Entry] = OrderedDict()
        # Inside Gradio's temporary folder when app.py set one: Gradio then serves our files without a copy.
        gradio_dir = os.environ.get("GRADIO_TEMP_DIR")
        if gradio_dir:
            os.makedirs(gradio_dir, exist_ok=True)
        self.tmpdir = tempfile.mkdtemp(prefix="hydra-webui-", dir=gradio_dir or None)
        self.in_use: set[str] = set()  # paths a running batch still reads (never swept)
        self._stop = threading.Event()
        if temp_max_age:
            sweep_root = os.path.dirname(gradio_dir) if gradio_dir else self.tmpdir
            threading.Thread(target=self._sweeper, args=(sweep_root, temp_max_age), daemon=True,
                             name="temp-sweeper").start()

    def close(self) -> None:
        self._stop.set()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _sweeper(self, root: str, max_age: float) -> None:
        while not self._stop.wait(min(60.0, max_age / 4)):
            sweep(root, max_age, self.in_use | {self.tmpdir})

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
            return fetch_url(url, timeout=self.limits.url_timeout, max_bytes=self.limits.max_upload_bytes,
                             allow_private=self.limits.allow_private_urls)
        except FetchError as e:
            log(f"URL fetch failed: {e}")
            raise UserError(FETCH_ERROR) from None

    def decode(self, data: bytes) -> Image.Image:
        """The image as the page shows it (EXIF-oriented); the models decode the bytes themselves."""
        try:
            return open_image(data, self.limits.max_pixels)
        except Exception as e:  # any decoder failure is the file's fault, never the server's
            raise UserError(f"Not a usable image: {describe_error(e)}.") from None

    def add_image(self, data: bytes, name: str) -> str:
        """Decode (for display), remember and return the cache key of an image (sha256 of its bytes)."""
        key = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            if key in self._images:
                self._images.move_to_end(key)
                self._images[key].name = name  # the caption download is named after the latest upload
                return key
        with self.decodes:
            entry = _Entry(data, name, display_image(self.decode(data)))
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

    def preprocess(self, model: WebModel, data: bytes, size: int) -> dict:
        """`model.preprocess` within the decode limit (waits for a free slot)."""
        with self.decodes:
            return model.preprocess(data, size)

    def predict(self, model: WebModel, samples: list[dict]) -> np.ndarray:
        """(B, T) probabilities of preprocessed images, with the CLI's own `predict_samples`."""
        with self.lock:
            model.calls += 1
            return model.tagger.predict_samples(samples)

    def sample(self, model: WebModel, key: str, size: int) -> dict:
        """The image preprocessed for `model`: kept for models with a CAM, which needs it again (other samples
        are used once; a DINOv3 sample is 9 MB of float32 pixels at 1024 px)."""
        entry = self.entry(key)
        sample = entry.samples.get((model.name, size))
        if sample is None:
            sample = self.preprocess(model, entry.data, size)
            if model.cam_depth is not None:
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
        if model.cam_depth is None:
            raise UserError(f"CAM is not available for '{model.name}' ({model.family.title} models have none).")
        if tag not in model.by_name:
            raise UserError(f"Unknown tag {tag!r} for the CAM.")
        depth = clamp_int(depth, 1, model.cam_depth, "The CAM depth")
        sample = self.sample(model, key, size)
        with self.lock:
            cached = model.cam_layers
            if cached is None or cached[0] != (key, size) or len(cached[1]) < depth:
                # keep the block outputs of the last image: trying other tags then skips the backbone
                cached = ((key, size), block_outputs(model.tagger.model, sample, depth))
                model.cam_layers = cached
            cam = class_activation_map(model.tagger.model, sample, model.by_name[tag], depth, cached[1])
        return draw_overlay(entry.display, cam)

    # -- HTTP API ----------------------------------------------------------------------------------

    def tag_request(self, fields: dict, data: bytes | None) -> dict:
        """`POST /api/tag` once the body is parsed: the image bytes (or `url`) and the optional fields
        `model`, `threshold` or `topk` or `metric`, `implications`, `exclude`, and the caption options
        (`API_CAPTION_FIELDS`, `underscores`)."""
        model, rules, captions = self.request_settings(fields, data)
        if data is None:
            data = self.fetch(fields["url"])
        if not data:
            raise UserError("The image is empty.")
        sample = self.preprocess(model, data, model.default_size)
        tags = model.classify(self.predict(model, [sample])[0], rules)
        # "scale" and "selection" say what the numbers are: every score is a probability, and only a threshold
        # the client gave is on the symmetric scale of JTP-3's tools (named, with the p it means)
        return {"model": model.name, "scale": "probability", "selection": selection(model, fields),
                "tags": [{"tag": t, "probability": p, "category": model.category_name(t)} for t, p in tags],
                "caption": model.caption(tags, captions.captions, captions.prefix),
                **({"notes": list(captions.notes)} if captions.notes else {})}  # option values the model cannot use

    def request_settings(self, fields: dict, data: bytes | None) -> tuple[WebModel, TagRules, batches.BatchCaptions]:
        """The model, validated tag rules and caption options of an API request (checked before any URL is
        fetched). The caption options are the batch tab's (`API_CAPTION_FIELDS`)."""
        model = self.model(_optional_str(fields, "model"))
        if data is None:
            url = fields.get("url")
            if not isinstance(url, str) or not url.strip():
                raise UserError("Send an 'image' file (multipart/form-data) or a 'url' (JSON or form field).")
        threshold, topk, metric = fields.get("threshold"), fields.get("topk"), _optional_str(fields, "metric")
        source = request_source(model, fields)
        exclude = fields.get("exclude") or []
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise UserError("'exclude' must be a category name or a list of them.")
        exclude = [c for x in exclude for c in x.replace(",", " ").split()]
        args = (threshold, source, None, _optional_str(fields, "implications"), exclude, topk, metric)
        rules = model.rules(*args)
        given = {name: _optional_str(fields, name) for name in API_CAPTION_FIELDS if name != "max_tags"}
        captions = batches.batch_captions(model, rules.topk, max_tags=fields.get("max_tags"),
                                          underscores=_flag(fields, "underscores"),
                                          **{API_CAPTION_FIELDS[k]: v for k, v in given.items()})
        return model, model.rules(*args, **captions.rule_changes), captions

    def health(self) -> dict:
        """`GET /api/health`: the default model's description at the top level, every model under "models"."""
        models = [m.describe() for m in self.models.values()]
        return {"status": "ok", **models[0], "models": models, "model_calls": self.model_calls}

    def batch(self, model: WebModel, paths: list[str], rules: TagRules, size: int,
              progress: Callable[[int, int], None] = lambda done, total: None,
              captions: batches.BatchCaptions | None = None) -> tuple[str, str, str]:
        """Tag many uploaded images and zips; returns (captions zip, probabilities CSV, summary). `captions`: the
        batch tab's caption options (`batch.batch_captions`; None = the model's captions as `.txt`)."""
        return batches.tag_uploads(self, model, paths, rules, size, progress, captions)


def request_source(model: WebModel, fields: dict) -> str:
    """How an API request selects tags: by the one of `threshold`, `topk`, `metric` it gives, else the model's
    default."""
    given = [name for name in ("threshold", "topk", "metric") if fields.get(name) not in (None, "")]
    if len(given) > 1:
        raise UserError(f"Give either 'threshold' or 'topk' or 'metric', not {' and '.join(map(repr, given))}.")
    return {"threshold": SOURCE_SLIDER, "topk": SOURCE_TOPK, "metric": SOURCE_MODEL}.get(
        given[0] if given else "", model.default_source)


def selection(model: WebModel, fields: dict) -> dict:
    """The API response's `selection`: how the tags were chosen, each number named with its scale.

    {"threshold": t, "threshold_scale": "symmetric", "min_probability": p} (t on -1..1, p = (t+1)/2), {"topk": k},
    or {"calibration": "calibration.csv" | "model", "metric": ...} (per-tag thresholds on p).
    """
    from hydra.calibration.embedded import DEFAULT_METRIC, parse_metric

    source = request_source(model, fields)
    if source == SOURCE_SLIDER:
        t = parse_symmetric(fields.get("threshold"))
        return {"threshold": t, "threshold_scale": "symmetric", "min_probability": from_symmetric(t)}
    if source == SOURCE_TOPK:
        return {"topk": parse_topk(fields.get("topk") or model.default_topk)}
    if source == SOURCE_MODEL:
        return {"calibration": "model", "metric": str(parse_metric(_optional_str(fields, "metric") or DEFAULT_METRIC))}
    return {"calibration": "calibration.csv"}


def sweep(root: str, max_age: float, keep: set[str] = frozenset()) -> int:
    """Delete files under `root` last modified more than `max_age` seconds ago (not those in `keep`), then the
    empty folders they leave (not those in `keep`); returns how many files were deleted."""
    import time

    cutoff, deleted = time.time() - max_age, 0
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if path not in keep and os.lstat(path).st_mtime < cutoff:
                    os.unlink(path)
                    deleted += 1
            except OSError:
                pass  # gone already, or in use (Windows)
        if folder != root and folder not in keep:
            try:
                os.rmdir(folder)  # only if empty
            except OSError:
                pass
    return deleted


# The /api/tag fields of the batch tab's caption options (inference.py's flags) -> `batch_captions` parameters;
# plus `underscores` (true/false). The caption extension and folder trigger words have no use for one image.
API_CAPTION_FIELDS = {"prefix": "prefix", "undesired_tags": "undesired", "replace_tags": "replace",
                      "category_thresholds": "category_thresholds", "max_tags": "max_tags", "separator": "separator"}


def _flag(fields: dict, name: str) -> bool:
    value = fields.get(name)
    if value in (None, "", False, True):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"'{name}' must be true or false.")


def _optional_str(fields: dict, name: str) -> str | None:
    value = fields.get(name) or None
    if value is not None and not isinstance(value, str):
        raise UserError(f"'{name}' must be a string.")
    return value
