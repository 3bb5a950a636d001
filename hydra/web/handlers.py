"""The web page's event handlers: each takes the page's control values and returns what the page shows.

`Handlers` holds the `WebService` and turns the shared column of tag settings into a `Settings` once per call
(`resolve`: the model, its size from the size control its family uses, and validated `TagRules`), so every
handler is a few lines over the same two steps, `resolve` and `render`. Errors become Gradio messages
(`ui_errors`): the user's mistakes as they are, our bugs in one line with the traceback in the server log.

Gradio names API parameters after the handler's parameters, so every handler spells them out; the ones a
single-model JTP-3 client never sends (`model`, `max_size`, `topk`, `metric`) come last, with defaults, so
`gradio_client` code written for one JTP-3 model keeps working.
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

import gradio as gr

from hydra.bulk.loader import describe_error
from hydra.common import log
from hydra.models.vocab import E621_CATEGORY_NAMES, UNASSIGNED
from hydra.tags.rules import TagRules, from_symmetric
from hydra.web.batch import batch_captions
from hydra.web.model import (
    SOURCE_MODEL,
    SOURCE_SLIDER,
    SOURCE_TOPK,
    SOURCE_UPLOAD,
    UserError,
    WebModel,
    parse_symmetric,
)
from hydra.web.service import NO_CAM, WebService

TOP_K = 250  # tags in the scored list (the original's num_top_classes), and the top-k slider's end
IMPLICATIONS_INFO = ("As inference.py -i. inherit: a tag gets the best probability of the tags implying it; "
                     "constrain: the lowest of the tags it implies; remove: only the most specific tags.")
CATEGORY_ORDER = [*sorted(k for k in E621_CATEGORY_NAMES if k != UNASSIGNED), UNASSIGNED]  # e621 ids, -1 last
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(10))}
EMPTY = ("", None, "", None, "")  # caption, tag list, groups, download, status


class Settings(NamedTuple):
    """The tag settings every handler receives (the shared column of controls)."""

    threshold: float
    source: str
    calibration: dict | None  # {model name: uploaded thresholds}
    mode: str
    exclude: list[str]
    seqlen: float             # the size slider of families whose size control is the sequence length
    model: str | None
    max_size: float | None    # the size slider of families whose size control is the long-edge cap
    topk: float | None
    metric: str | None = None  # the model-calibration metric (families with validation counts in the file)

    def size_value(self, m: WebModel) -> float | None:
        """The value of the slider `m`'s family uses."""
        return getattr(self, m.family.size.name)


def ui_errors(fn: Callable) -> Callable:
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


class Handlers:
    """What the page's events do (see the module docstring). `several` = more than one model is served."""

    def __init__(self, web: WebService):
        self.web = web
        self.several = len(web.models) > 1

    # -- the two steps every handler shares ---------------------------------------------------------

    def resolve(self, s: Settings, **changes) -> tuple[WebModel, int, TagRules]:
        """The model, its size and validated rules (`changes`: more `TagSettings` fields, as `WebModel.rules`)."""
        m = self.web.model(s.model)
        rules = m.rules(s.threshold, s.source, (s.calibration or {}).get(m.name), s.mode, s.exclude, s.topk,
                        s.metric, **changes)
        return m, m.size(s.size_value(m)), rules

    def render(self, key: str | None, s: Settings) -> tuple:
        """Caption, scored tag list, category groups, caption download and status line for one image."""
        if not key:
            return EMPTY
        m, size, rules = self.resolve(s)
        start = time.perf_counter()
        tags = m.classify(self.web.probabilities(m, key, size), rules)
        caption = m.caption(tags)
        shown = {m.names[m.position[t]]: p for t, p in tags[:TOP_K]}  # p: the list shows it as 0-100%
        how = f"top {rules.topk}" if rules.topk else f"thresholds from {s.source.lower()}"
        if s.source == SOURCE_SLIDER:  # the one place the symmetric scale is set: say what it means in p
            t = parse_symmetric(s.threshold)
            how = f"threshold {t:.2f} on the -1..1 scale, i.e. p >= {from_symmetric(t):.1%}"
        status = (f"{m.name + ': ' if self.several else ''}{len(tags)} of {len(m.labels)} tags pass ({how}); "
                  f"{m.family.size.label.lower()} {size}, {time.perf_counter() - start:.2f} s.")
        download = caption_file(self.web, self.web.entry(key).name, caption)
        return caption, shown, groups_html(m, tags), download, status

    def show(self, data: bytes, name: str, s: Settings, cam_tag: str, depth: float) -> tuple:
        m, size, _ = self.resolve(s)  # validate the settings before decoding anything
        key = self.web.add_image(data, name)
        return (key, self.web.cam(m, key, size, cam_tag, depth), *self.render(key, s))

    # -- events -------------------------------------------------------------------------------------

    def refilter(self, key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                 topk=None, metric=None):
        return self.render(key, Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size,
                                         topk, metric))

    def on_upload(self, path, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth, model=None,
                  max_size=None, topk=None, metric=None):
        if not path:
            return (None, None, *EMPTY)
        s = Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return self.show(self.web.read_file(path), os.path.basename(path), s, cam_tag, depth)

    def on_url(self, url, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth, model=None,
               max_size=None, topk=None, metric=None):
        data = self.web.fetch(url)
        name = url.split("?")[0].split("#")[0]
        s = Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return self.show(data, name, s, cam_tag, depth)

    def on_threshold(self, key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                     topk=None, metric=None):
        # as the original: moving the slider drops the calibration (and here the top-k selection too)
        s = Settings(threshold, SOURCE_SLIDER, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return (SOURCE_SLIDER, *self.render(key, s))

    def on_topk(self, key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                topk=None, metric=None):
        s = Settings(threshold, SOURCE_TOPK, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return (SOURCE_TOPK, *self.render(key, s))

    def on_metric(self, key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                  topk=None, metric=None):
        s = Settings(threshold, SOURCE_MODEL, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return (SOURCE_MODEL, *self.render(key, s))

    def on_calibration(self, path, key, threshold, source, calibration, mode, exclude, seqlen, model=None,
                       max_size=None, topk=None, metric=None):
        if not path:
            raise UserError("No calibration file was uploaded.")
        m = self.web.model(model)
        thresholds = m.load_calibration(path)
        gr.Info(f"Loaded {len(thresholds)} thresholds for {m.name} from {os.path.basename(path)}.")
        calibration = {**(calibration or {}), m.name: thresholds}  # one uploaded calibration per model
        s = Settings(threshold, SOURCE_UPLOAD, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        return (calibration, SOURCE_UPLOAD, *self.render(key, s))

    def on_cam(self, key, seqlen, cam_tag, depth, model=None):
        if not key:
            return gr.skip()
        m = self.web.model(model)
        size = m.size(seqlen) if m.family.size.name == "seqlen" else m.default_size  # the CAM event sends -S only
        return self.web.cam(m, key, size, cam_tag, depth)

    def on_select(self, model, evt: gr.SelectData):
        m = self.web.models.get(model, self.web.default)
        return evt.value if m.cam_depth is not None and evt.value in m.by_name else gr.skip()

    def on_model(self, model, key, exclude):
        """Swap the controls to what the chosen model supports (a `.then` re-filters afterwards)."""
        m = self.web.model(model)
        try:
            plain = self.web.entry(key).display if key else gr.skip()  # no CAM from the previous model
        except UserError:
            plain = gr.skip()
        cam = m.cam_depth is not None
        return (gr.Radio(choices=m.sources, value=m.default_source),
                gr.Dropdown(choices=list(m.family.implication_modes), value=m.default_mode,
                            interactive=m.has_implications, info=implications_info(m)),
                gr.CheckboxGroup(value=exclude if m.has_categories else [], interactive=m.has_categories,
                                 info=exclude_info(m)),
                *(gr.Slider(visible=m.family.size.name == name) for name in ("seqlen", "max_size")),
                gr.Dropdown(choices=cam_choices(m), value=NO_CAM, visible=cam),
                gr.Slider(maximum=m.cam_depth, value=1, visible=True) if cam else gr.Slider(visible=False),
                gr.Markdown(visible=not cam), gr.Textbox(visible=m.embedded), plain)

    def on_batch(self, files, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                 topk=None, metric=None, caption_extension=None, prefix=None, trigger_from_folder=False,
                 undesired_tags=None, replace_tags=None, category_thresholds=None, max_tags=None, separator=None,
                 underscores=False, progress=gr.Progress()):  # noqa: B008
        s = Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk, metric)
        m, size, rules = self.resolve(s)  # the shared settings first: their errors come first
        captions = batch_captions(m, rules.topk, extension=caption_extension, prefix=prefix,
                                  trigger_from_folder=trigger_from_folder, undesired=undesired_tags,
                                  replace=replace_tags, category_thresholds=category_thresholds, max_tags=max_tags,
                                  separator=separator, underscores=underscores)
        m, size, rules = self.resolve(s, **captions.rule_changes)
        progress(0, desc="Reading")
        return self.web.batch(m, files or [], rules, size,
                              lambda done, total: progress((done, total), desc="Tagging", unit="images"), captions)


# -- what the handlers show ------------------------------------------------------------------------------


def cam_choices(*models: WebModel) -> list[str]:
    """CAM tags of these models (those with a CAM: never 74,625 DINOv3 tags in the page)."""
    return [NO_CAM, *sorted({n for m in models if m.cam_depth is not None for n in m.names})]


def implications_info(m: WebModel) -> str:
    if m.has_implications:
        return IMPLICATIONS_INFO
    return "Needs tag metadata (-m)." if m.family.metadata_file else "Not available: this model has no implication data."


def exclude_info(m: WebModel) -> str | None:
    if m.has_categories:
        return None
    return ("Needs tag metadata (-m)." if m.family.metadata_file else
            "Not available: this model has no categories (for the DINOv3 tagger, tagger_vocab_with_categories.json "
            "has them).")


def groups_html(m: WebModel, tags: list[tuple[str, float]]) -> str:
    if not m.has_categories:
        why = "no tag metadata is loaded" if m.family.metadata_file else "the model has none"
        return f"<p><em>Categories are unknown for this model ({why}).</em></p>"
    groups: dict[str, list[str]] = {}
    for t, _ in tags:
        groups.setdefault(m.category_name(t), []).append(m.names[m.position[t]])
    # e621's categories in their order, then a model's own categories (Hydra 3.5) by name, unassigned last
    e621 = [E621_CATEGORY_NAMES[c] for c in CATEGORY_ORDER]
    order = [*e621[:-1], *sorted(set(groups) - set(e621)), e621[-1]]
    return "".join(f"<h4>{html.escape(name)} ({len(groups[name])})</h4><p>{html.escape(', '.join(groups[name]))}</p>"
                   for name in order if name in groups)


def download_name(name: str) -> str:
    """A safe file stem for a download named after `name` (an upload's or a URL's last part): the last
    segment after any `/` or `\\` (so `C:\\Users\\x.png` or `../x.png` names nothing outside the folder on any
    system), without its extension, drive colons, control or reserved characters and leading dots."""
    base = re.split(r"[\\/]", name or "")[-1]
    stem = os.path.splitext(base)[0] if base not in (".", "..") else ""
    stem = re.sub(r'[\x00-\x1f<>:"|?*]', "_", stem).strip(" .")[:200]
    if stem.split(".")[0].upper() in WINDOWS_RESERVED:
        stem = "_" + stem
    return stem or "image"


def caption_file(web: WebService, name: str, caption: str) -> str:
    """The caption as a .txt download named after the image (one folder per distinct caption)."""
    folder = os.path.join(web.tmpdir, hashlib.sha1(caption.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, download_name(name) + ".txt")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(caption)
    return path
