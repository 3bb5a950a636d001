"""The web UI (Gradio) and the HTTP API of `app.py`, built on the same `Tagger` and `TagRules` as the CLI.

`WebTagger` holds the loaded model and everything a request needs: a lock around the model (one forward
at a time, as the original), a small cache of recent images (their probabilities per sequence length, so
moving a control only re-filters), the tag rules, and the CAM. `build_ui` lays out the Gradio app and
`api_routes` adds `POST /api/tag` and `GET /api/health` next to Gradio's own API.

Where it differs from the original WebUI (spec §9), on purpose: the threshold slider spans the whole
symmetric scale (-1..1, default 0.30 as the original); calibrations compare each tag's probability with
its own threshold (the original compared the symmetric score, a bug) and tags missing from the
calibration never pass (as the CLI); implications, category exclusion and the sequence length can be
changed; captions use the .txt caption spelling of the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import traceback
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import time

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import APIRouter, Request  # noqa: E402  (FastAPI and Starlette come with Gradio)
from fastapi.responses import JSONResponse  # noqa: E402
from PIL import Image  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from .bulk import SKIP_SUFFIXES, CsvSink, image_extensions  # noqa: E402
from .cam import block_outputs, class_activation_map, display_image, draw_overlay  # noqa: E402
from .common import log  # noqa: E402
from .fetch import FetchError, fetch_url  # noqa: E402
from .image import MAX_SEQLEN, MIN_SEQLEN, open_image  # noqa: E402
from .implications import MODES  # noqa: E402
from .loader import describe_error  # noqa: E402
from .tagger import Tagger  # noqa: E402
from .tags import (  # noqa: E402
    CATEGORIES,
    CATEGORY_NAMES,
    DataFileError,
    TagRules,
    TagSettings,
    category_vector,
    format_caption,
    from_symmetric,
    load_calibration,
    threshold_vector,
    to_symmetric,
)

# What the UI and the API accept; every request is validated against these.
THRESHOLD_MIN, THRESHOLD_MAX, THRESHOLD_STEP = -1.0, 1.0, 0.01  # symmetric scale s = 2p - 1
DEFAULT_THRESHOLD = 0.30     # the original WebUI's default (s >= 0.30, i.e. p >= 0.65)
TOP_K = 250                  # tags in the scored list (the original's num_top_classes)
SEQLEN_STEP = 16
CACHE_IMAGES = 16            # recent images kept for re-filtering (bytes + display image + probabilities)
BATCH_SIZE = 4               # images per model call in the batch tab
SOURCE_SLIDER = "Threshold slider"
SOURCE_DEFAULT = "calibration.csv"
SOURCE_UPLOAD = "Uploaded calibration"
NO_CAM = "(none)"
IMPLICATIONS_INFO = ("As inference.py -i. inherit: a tag gets the best probability of the tags implying it; "
                     "constrain: the lowest of the tags it implies; remove: only the most specific tags.")
TITLE = "RedRocket JTP-3 Hydra"


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


@dataclass
class _Entry:
    """One image the UI has seen: its bytes, how it is shown, and its probabilities per seqlen."""

    data: bytes
    name: str
    display: Image.Image
    samples: dict[int, dict] = field(default_factory=dict)
    probs: dict[int, np.ndarray] = field(default_factory=dict)


class WebTagger:
    """The model plus what the UI and API need around it; safe to call from many threads.

    Args:
        tagger: the loaded tagger (as returned by `inference.load`).
        settings: the CLI's tag settings; its threshold is the calibration from calibration.csv (a dict)
            when that file was loaded at start-up.
        limits: request limits.
    """

    def __init__(self, tagger: Tagger, settings: TagSettings, limits: Limits):
        self.tagger, self.settings, self.limits = tagger, settings, limits
        self.labels = settings.labels  # rewritten, model order
        self.names = [t.replace("_", " ") for t in self.labels]  # the original UI's display spelling
        self.position = {t: i for i, t in enumerate(self.labels)}
        self.by_name = {**{n: i for i, n in reversed(list(enumerate(self.names)))}, **self.position}
        self.category = category_vector(self.labels, settings.metadata)
        self.default_calibration = settings.threshold if isinstance(settings.threshold, dict) else None
        self.lock = threading.Lock()  # the model: one forward (or CAM) at a time
        self._cache_lock = threading.Lock()
        self._images: OrderedDict[str, _Entry] = OrderedDict()
        self._cam_layers: tuple[tuple[str, int], list] | None = None
        self.model_calls = 0
        self.tmpdir = tempfile.mkdtemp(prefix="jtp3-webui-")

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)

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

    def decode(self, data: bytes) -> Image.Image:
        try:
            return open_image(data, self.limits.max_pixels)
        except Exception as e:  # any decoder failure is the file's fault, never the server's
            raise UserError(f"Not a usable image: {describe_error(e)}.") from None

    def add_image(self, data: bytes, name: str) -> str:
        """Decode, remember and return the cache key of an image (sha256 of its bytes)."""
        key = hashlib.sha256(data).hexdigest()
        with self._cache_lock:
            if key in self._images:
                self._images.move_to_end(key)
                self._images[key].name = name  # the caption download is named after the latest upload
                return key
        img = self.decode(data)
        entry = _Entry(data, name, display_image(img))
        entry.samples[self.tagger.seqlen] = self._preprocess(img, self.tagger.seqlen)
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

    # -- the model ---------------------------------------------------------------------------------

    def _preprocess(self, img: Image.Image, seqlen: int) -> dict:
        # Tagger.preprocess is built for one seqlen, and setting Tagger.seqlen from concurrent requests
        # would race: use a copy of the very same preprocessing object with this request's seqlen.
        pre = self.tagger.preprocess
        if seqlen != self.tagger.seqlen:
            pre = dataclasses.replace(pre, seqlen=seqlen)
        try:
            return pre(img)
        except (ValueError, OSError) as e:  # e.g. an extreme aspect ratio that fits no sequence length
            raise UserError(f"Cannot prepare this image: {describe_error(e)}") from None

    def predict(self, sample: dict) -> np.ndarray:
        """(T,) probabilities of one preprocessed image, with the CLI's own `predict_samples`."""
        with self.lock:
            self.model_calls += 1
            return self.tagger.predict_samples([sample])[0]

    def sample(self, key: str, seqlen: int) -> dict:
        entry = self.entry(key)
        if seqlen not in entry.samples:
            entry.samples[seqlen] = self._preprocess(self.decode(entry.data), seqlen)
        return entry.samples[seqlen]

    def probabilities(self, key: str, seqlen: int) -> np.ndarray:
        """Cached: the model runs once per (image, seqlen)."""
        entry = self.entry(key)
        if seqlen not in entry.probs:
            entry.probs[seqlen] = self.predict(self.sample(key, seqlen))
        return entry.probs[seqlen]

    def cam(self, key: str, seqlen: int, tag: str, depth: int) -> Image.Image:
        """The display image with the CAM of `tag` over it (or without one for NO_CAM / no tag)."""
        entry = self.entry(key)
        if not tag or tag == NO_CAM:
            return entry.display
        if tag not in self.by_name:
            raise UserError(f"Unknown tag {tag!r} for the CAM.")
        depth = _clamp_int(depth, 1, self.tagger.model.depth, "The CAM depth")
        sample = self.sample(key, seqlen)
        with self.lock:
            cached = self._cam_layers
            if cached is None or cached[0] != (key, seqlen) or len(cached[1]) < depth:
                # keep the block outputs of the last image: trying other tags then skips the backbone
                cached = ((key, seqlen), block_outputs(self.tagger.model, sample, depth))
                self._cam_layers = cached
            cam = class_activation_map(self.tagger.model, sample, self.by_name[tag], depth, cached[1])
        return draw_overlay(entry.display, cam)

    # -- tag rules ---------------------------------------------------------------------------------

    def rules(self, threshold: float | str | None = DEFAULT_THRESHOLD, source: str = SOURCE_SLIDER,
              calibration: dict[str, float] | None = None, mode: str | None = None,
              exclude: list[str] | None = None) -> TagRules:
        """Validated request settings -> TagRules (the CLI's own classification)."""
        if source == SOURCE_DEFAULT:
            if self.default_calibration is None:
                raise UserError("There was no usable calibration.csv in the current folder at start-up.")
            thresholds = self.default_calibration
        elif source == SOURCE_UPLOAD:
            if not calibration:
                raise UserError("Upload a calibration CSV first.")
            thresholds = calibration
        elif source == SOURCE_SLIDER:
            thresholds = from_symmetric(parse_symmetric(threshold))
        else:
            raise UserError(f"Unknown threshold source {source!r}.")
        mode = mode or self.settings.mode
        if mode not in MODES:
            raise UserError(f"Unknown implications mode {mode!r}; choose from {', '.join(MODES)}.")
        if mode != "off" and self.settings.metadata is None:
            raise UserError("Implications need tag metadata, which is not loaded (use mode 'off').")
        bad = [c for c in exclude or [] if c not in CATEGORIES]
        if bad:
            raise UserError(f"Unknown category {bad[0]!r}; choose from {', '.join(CATEGORIES)}.")
        if exclude and self.settings.metadata is None:
            raise UserError("Category exclusion needs tag metadata, which is not loaded.")
        excluded = np.isin(self.category, [CATEGORIES[c] for c in exclude]) if exclude else None
        return TagRules(self.labels, threshold_vector(self.labels, thresholds), self.settings.graph, mode, excluded)

    def load_calibration(self, path: str, shown_name: str | None = None) -> dict[str, float]:
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
        return CATEGORY_NAMES.get(int(self.category[self.position[tag]]))

    # -- batch -------------------------------------------------------------------------------------

    def batch(self, paths: list[str], rules: TagRules, seqlen: int,
              progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[str, str, str]:
        """Tag many uploaded images and zips; returns (captions zip, probabilities CSV, summary)."""
        items = list(self._batch_items(paths or []))
        if not items:
            raise UserError("No images in the upload (zips are searched for image files).")
        out = tempfile.mkdtemp(dir=self.tmpdir)
        zip_path, csv_path = os.path.join(out, "captions.zip"), os.path.join(out, "probabilities.csv")
        sink, failures, tagged, taken = CsvSink(csv_path, self.labels), [], 0, set()
        try:
            with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
                for start in range(0, len(items), BATCH_SIZE):
                    names, samples = [], []
                    for name, read in items[start:start + BATCH_SIZE]:
                        try:
                            samples.append(self._preprocess(self.decode(read()), seqlen))
                            names.append(name)
                        except Exception as e:  # one bad file (or zip member) never stops the batch
                            failures.append((name, str(e) if isinstance(e, UserError) else describe_error(e)))
                    if samples:
                        with self.lock:
                            self.model_calls += 1
                            probs = self.tagger.predict_samples(samples)
                        for name, row in zip(names, probs):
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

    # -- API ---------------------------------------------------------------------------------------

    def tag_for_api(self, data: bytes, rules: TagRules) -> dict:
        sample = self._preprocess(self.decode(data), self.tagger.seqlen)
        tags = self.classify(self.predict(sample), rules)
        return {"tags": [{"tag": t, "probability": p, "category": self.category_name(t)} for t, p in tags],
                "caption": format_caption(dict(tags))}

    def health(self) -> dict:
        model = self.tagger.model
        return {"status": "ok", "model": os.path.basename(model.path), "title": model.metadata.get("modelspec.title"),
                "tags": len(self.labels), "extensions": [e.label for e in model.extensions],
                "device": str(self.tagger.device), "seqlen": self.tagger.seqlen,
                "calibration": self.default_calibration is not None, "model_calls": self.model_calls}


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


# -- the Gradio UI -------------------------------------------------------------------------------------

# System fonts only: the page must not fetch anything from the internet (Gradio's themes can pull fonts).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
CSS = """
#tag-list .confidence-set { cursor: pointer; }
#tag-list meter { width: 0; }  /* negative scores give an invalid inline width: show no bar, not a default one */
#tag-groups h4 { margin: 0.6em 0 0.1em 0; }
"""


def image_input(**kwargs) -> gr.Image:
    """A `gr.Image` that hands the handler the uploaded file's path untouched.

    Gradio's own preprocessing opens the upload with Pillow before the handler runs, so a corrupt file
    would fail with Gradio's generic error; here the handler decodes it and explains what is wrong.
    (The instance's method is replaced rather than subclassing: Gradio writes a `.pyi` stub beside any
    module that subclasses one of its components.)
    """
    component = gr.Image(**kwargs)
    component.preprocess = lambda payload: None if payload is None else payload.path
    return component


def _ui(fn: Callable) -> Callable:
    """Turn errors into a message in the UI: the user's mistakes as they are, our bugs in one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise gr.Error(html.escape(str(e)), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:
            log(f"web UI: unexpected error in {fn.__name__}:")
            traceback.print_exc()
            raise gr.Error(html.escape(f"Unexpected error: {describe_error(e)}"), print_exception=False) from None

    return wrapper


def build_ui(web: WebTagger) -> gr.Blocks:
    """The Gradio app: an image tab (tags, caption, CAM), a batch tab, and the shared tag settings."""
    depth_max = web.tagger.model.depth
    has_meta = web.settings.metadata is not None
    sources = [SOURCE_SLIDER, *([SOURCE_DEFAULT] if web.default_calibration else []), SOURCE_UPLOAD]
    empty = ("", None, "", None, "")

    def render(key, threshold, source, calibration, mode, exclude, seqlen):
        if not key:
            return empty
        rules = web.rules(threshold, source, calibration, mode, exclude)
        seqlen = _clamp_seqlen(seqlen)
        start = time.perf_counter()
        tags = web.classify(web.probabilities(key, seqlen), rules)
        caption = format_caption(dict(tags))
        shown = {web.names[web.position[t]]: to_symmetric(p) for t, p in tags[:TOP_K]}
        entry = web.entry(key)
        status = (f"{len(tags)} of {len(web.labels)} tags pass (thresholds from {source.lower()}); "
                  f"seqlen {seqlen}, {time.perf_counter() - start:.2f} s.")
        download = _caption_file(web, entry.name, caption)
        return caption, shown, _groups_html(web, tags), download, status

    def show(data, name, controls, cam_tag, depth):
        key = web.add_image(data, name)
        return (key, web.cam(key, _clamp_seqlen(controls[-1]), cam_tag, depth), *render(key, *controls))

    @_ui
    def on_upload(path, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth):
        if not path:
            return (None, None, *empty)
        controls = (threshold, source, calibration, mode, exclude, seqlen)
        return show(web.read_file(path), os.path.basename(path), controls, cam_tag, depth)

    @_ui
    def on_url(url, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth):
        data = web.fetch(url)
        name = posixpath.basename(url.split("?")[0].split("#")[0].rstrip("/")) or "image"
        return show(data, name, (threshold, source, calibration, mode, exclude, seqlen), cam_tag, depth)

    @_ui
    def on_threshold(key, threshold, source, calibration, mode, exclude, seqlen):
        # as the original: moving the slider drops the calibration
        return (SOURCE_SLIDER, *render(key, threshold, SOURCE_SLIDER, calibration, mode, exclude, seqlen))

    @_ui
    def on_calibration(path, key, threshold, source, calibration, mode, exclude, seqlen):
        if not path:
            raise UserError("No calibration file was uploaded.")
        calibration = web.load_calibration(path)
        gr.Info(f"Loaded {len(calibration)} thresholds from {os.path.basename(path)}.")
        return (calibration, SOURCE_UPLOAD, *render(key, threshold, SOURCE_UPLOAD, calibration, mode, exclude, seqlen))

    @_ui
    def on_cam(key, seqlen, cam_tag, depth):
        return web.cam(key, _clamp_seqlen(seqlen), cam_tag, depth) if key else gr.skip()

    def on_select(evt: gr.SelectData):
        return evt.value if evt.value in web.by_name else gr.skip()

    @_ui
    def on_batch(files, threshold, source, calibration, mode, exclude, seqlen, progress=gr.Progress()):  # noqa: B008
        rules = web.rules(threshold, source, calibration, mode, exclude)
        progress(0, desc="Reading")
        return web.batch(files or [], rules, _clamp_seqlen(seqlen),
                         lambda done, total: progress((done, total), desc="Tagging", unit="images"))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\nUpload, drop or paste an image, or give its URL. Click a tag to see where the "
                    "model found it (class-activation map). HTTP API: `POST /api/tag`, `GET /api/health`.")
        key = gr.State(None)
        calibration = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                threshold = gr.Slider(THRESHOLD_MIN, THRESHOLD_MAX, value=DEFAULT_THRESHOLD, step=THRESHOLD_STEP,
                                      label="Tag threshold", elem_id="threshold",
                                      info="-1 to 1 (= 2p - 1, so 0.30 means p >= 0.65). Moving it turns off "
                                           "calibration.")
                source = gr.Radio(sources, value=SOURCE_DEFAULT if web.default_calibration else SOURCE_SLIDER,
                                  label="Thresholds from", elem_id="source")
                cal_file = gr.UploadButton("Upload a calibration CSV", file_types=[".csv"], type="filepath",
                                           size="sm")
                mode = gr.Dropdown(list(MODES), value=web.settings.mode, label="Implications", interactive=has_meta,
                                   info=IMPLICATIONS_INFO if has_meta else "Needs tag metadata (-m).")
                exclude = gr.CheckboxGroup(list(CATEGORIES), value=[], label="Exclude categories",
                                           interactive=has_meta)
                seqlen = gr.Slider(MIN_SEQLEN, MAX_SEQLEN, value=web.tagger.seqlen, step=SEQLEN_STEP,
                                   label="Sequence length", info="Patches per image (1024 as trained).")
                with gr.Accordion("Model and extensions", open=False):
                    gr.Markdown(_model_info(web))
            with gr.Column(scale=3):
                with gr.Tab("Image"):
                    with gr.Row():
                        with gr.Column():
                            image = image_input(label="Image", sources=["upload", "clipboard"], type="filepath",
                                               image_mode=None, format="png", height=560, elem_id="image")
                            with gr.Row():
                                url = gr.Textbox(label="Image URL", placeholder="https://...", scale=4)
                                fetch = gr.Button("Fetch", scale=1, min_width=80)
                            cam_tag = gr.Dropdown([NO_CAM, *sorted(web.names)], value=NO_CAM, label="CAM tag",
                                                  info="Pick a tag, or click one in the tag list.", elem_id="cam-tag")
                            depth = gr.Slider(1, depth_max, value=1, step=1, label="CAM depth",
                                              info=f"1 = fastest, most precise; {depth_max} = slowest, most general")
                        with gr.Column():
                            caption = gr.Textbox(label="Caption", lines=4, max_lines=12, buttons=["copy"],
                                                 interactive=False, elem_id="caption")
                            download = gr.DownloadButton("Download caption (.txt)", value=None, size="sm")
                            status = gr.Markdown(elem_id="status")
                            tag_list = gr.Label(label=f"Tags (top {TOP_K}, -100% to 100%)", num_top_classes=TOP_K,
                                                show_heading=False, elem_id="tag-list")
                            groups = gr.HTML(elem_id="tag-groups")
                with gr.Tab("Batch"):
                    files = gr.File(label="Images, or .zip files of images", file_count="multiple",
                                    file_types=["image", ".zip"], type="filepath")
                    run = gr.Button("Tag all", variant="primary")
                    batch_status = gr.Markdown()
                    with gr.Row():
                        zip_out = gr.File(label="Captions (.zip)")
                        csv_out = gr.File(label="Probabilities (.csv)")

        controls = [threshold, source, calibration, mode, exclude, seqlen]
        outputs = [caption, tag_list, groups, download, status]
        refilter = _ui(render)
        image.upload(on_upload, [image, *controls, cam_tag, depth], [key, image, *outputs], api_name="tag_image")
        image.clear(lambda: (None, *empty), None, [key, *outputs], api_visibility="private")
        fetch.click(on_url, [url, *controls, cam_tag, depth], [key, image, *outputs], api_name="tag_url")
        url.submit(on_url, [url, *controls, cam_tag, depth], [key, image, *outputs], api_visibility="private")
        source.input(refilter, [key, *controls], outputs, api_name="refilter")
        mode.input(refilter, [key, *controls], outputs, api_visibility="private")
        exclude.input(refilter, [key, *controls], outputs, api_visibility="private")
        threshold.input(on_threshold, [key, *controls], [source, *outputs], trigger_mode="always_last",
                        show_progress="hidden", api_visibility="private")
        seqlen.release(refilter, [key, *controls], outputs, api_visibility="private").then(
            on_cam, [key, seqlen, cam_tag, depth], image, api_visibility="private")
        cal_file.upload(on_calibration, [cal_file, key, *controls], [calibration, source, *outputs],
                        api_name="calibration")
        cam_tag.change(on_cam, [key, seqlen, cam_tag, depth], image, api_name="cam", show_progress="minimal")
        depth.release(on_cam, [key, seqlen, cam_tag, depth], image, api_visibility="private")
        tag_list.select(on_select, None, cam_tag, api_visibility="private")
        run.click(on_batch, [files, *controls], [zip_out, csv_out, batch_status], api_name="batch",
                  concurrency_limit=1, concurrency_id="batch")
    return demo


def _clamp_int(value, low: int, high: int, what: str) -> int:
    """A slider value as an int clamped to [low, high] (sliders can only overshoot through the API)."""
    try:
        return int(np.clip(round(float(value)), low, high))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{what} must be a number from {low} to {high}.") from None


def _clamp_seqlen(value) -> int:
    return _clamp_int(value, MIN_SEQLEN, MAX_SEQLEN, "The sequence length")


def _groups_html(web: WebTagger, tags: list[tuple[str, float]]) -> str:
    groups: dict[str, list[str]] = {}
    for t, _ in tags:
        groups.setdefault(web.category_name(t) or "other", []).append(web.names[web.position[t]])
    order = [*CATEGORIES, "other"]
    return "".join(f"<h4>{name} ({len(groups[name])})</h4><p>{html.escape(', '.join(groups[name]))}</p>"
                   for name in order if name in groups)


def _caption_file(web: WebTagger, name: str, caption: str) -> str:
    """The caption as a .txt download named after the image (one folder per distinct caption)."""
    folder = os.path.join(web.tmpdir, hashlib.sha1(caption.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, (os.path.splitext(name)[0] or "image") + ".txt")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(caption)
    return path


def _model_info(web: WebTagger) -> str:
    model = web.tagger.model
    lines = [f"- Model: `{model.path}` ({model.metadata.get('modelspec.title', 'untitled')}), "
             f"{len(web.labels)} tags, {web.tagger.describe()}",
             f"- Tag metadata: {'loaded' if web.settings.metadata is not None else 'not loaded'}",
             f"- calibration.csv: {'loaded' if web.default_calibration else 'not found'}"]
    exts = model.extensions
    lines.append(f"- Extensions: {len(exts)}" + ("" if exts else " (none loaded)"))
    lines += [f"  - `{e.label}` ({e.category}) from `{e.path}`" for e in exts]
    return "\n".join(lines)


# -- the HTTP API --------------------------------------------------------------------------------------

def api_routes(web: WebTagger) -> list:
    """`POST /api/tag` and `GET /api/health`, as FastAPI routes to put in front of Gradio's."""
    router = APIRouter()

    @router.get("/api/health")
    def health() -> dict:
        return web.health()

    @router.post("/api/tag")
    async def tag(request: Request):
        try:
            fields, data = await _read_tag_request(request, web.limits)
            return JSONResponse(await run_in_threadpool(_api_tag, web, fields, data))
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # never a traceback to the client; the server log has it
            log("HTTP API: unexpected error:")
            traceback.print_exc()
            return JSONResponse({"error": f"internal error: {describe_error(e)}"}, status_code=500)

    return router.routes


def _api_tag(web: WebTagger, fields: dict, data: bytes | None) -> dict:
    if data is None:
        url = fields.get("url")
        if not isinstance(url, str) or not url.strip():
            raise UserError("Send an 'image' file (multipart/form-data) or a 'url' (JSON or form field).")
        data = web.fetch(url)
    if not data:
        raise UserError("The image is empty.")
    threshold = fields.get("threshold")
    source = SOURCE_DEFAULT if threshold in (None, "") and web.default_calibration else SOURCE_SLIDER
    exclude = fields.get("exclude") or []
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        raise UserError("'exclude' must be a category name or a list of them.")
    exclude = [c for x in exclude for c in x.replace(",", " ").split()]
    mode = fields.get("implications") or None
    if mode is not None and not isinstance(mode, str):
        raise UserError("'implications' must be a string.")
    return web.tag_for_api(data, web.rules(threshold, source, None, mode, exclude))


async def _read_tag_request(request: Request, limits: Limits) -> tuple[dict, bytes | None]:
    """Parse a multipart or JSON request body, never reading more than the upload limit allows."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    cap = limits.max_upload_bytes + (1 << 20)  # room for the form fields around the image
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise UserError(f"The request is over the {limits.max_upload_bytes / 2**20:.0f} MiB limit.", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise UserError(f"The request is over the {limits.max_upload_bytes / 2**20:.0f} MiB limit.", 413)
        chunks.append(chunk)
    body = b"".join(chunks)

    if ctype == "application/json":
        try:
            fields = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise UserError("The body is not valid JSON.") from None
        if not isinstance(fields, dict):
            raise UserError("The JSON body must be an object such as {\"url\": \"https://...\"}.")
        return fields, None
    if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UserError("Send multipart/form-data with an 'image' file, or JSON with a 'url'.", 415)

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=32)
    except Exception as e:  # starlette's MultiPartException and friends: a malformed body
        raise UserError(f"Malformed form data ({describe_error(e)}).") from None
    try:
        fields = {k: (v[0] if len(v) == 1 else v) for k in form.keys()
                  if (v := [x for x in form.getlist(k) if isinstance(x, str)])}
        upload = form.get("image")
        data = None
        if upload is not None and not isinstance(upload, str):
            data = await upload.read()
            if len(data) > limits.max_upload_bytes:
                raise UserError(f"The image is over the {limits.max_upload_bytes / 2**20:.0f} MiB limit.", 413)
        elif isinstance(upload, str) and upload:
            raise UserError("'image' must be a file upload (curl: -F image=@picture.png).")
    finally:
        await form.close()
    return fields, data


def launch(web: WebTagger, host: str, port: int, share: bool = False) -> None:
    """Serve the UI and the API until interrupted (Ctrl-C)."""
    demo = build_ui(web)
    demo.queue(default_concurrency_limit=4, max_size=64)
    demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS, quiet=True,
                prevent_thread_lock=True,
                max_file_size=max(web.limits.max_upload_bytes, web.limits.batch_max_bytes),  # batch zips
                allowed_paths=[web.tmpdir], app_kwargs={"routes": api_routes(web)},
                footer_links=["api", "settings"], ssr_mode=False, mcp_server=False, show_error=False)
    url = demo.local_url.rstrip("/")
    log(f"Serving the web UI on {url} (HTTP API: POST {url}/api/tag, GET {url}/api/health).")
    if demo.share_url:
        log(f"Public link (anyone who has it can use this tagger): {demo.share_url}")
    log("Press Ctrl-C to stop.")
    demo.block_thread()
