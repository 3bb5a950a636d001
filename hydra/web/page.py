"""The web page of `app.py` (Gradio): its layout, how its events are wired to `hydra/web/handlers.py`, and
`launch`, which serves it with the HTTP API of `hydra/web/api.py`.

The page has a column of tag settings shared by the image and batch tabs, a model selector when more than one
model is served, and for each model only the controls it supports, read from its family: the size slider its
size control names (sequence length or long-edge cap), implications and category exclusion when it has the
data, the CAM when it has one. Switching the model swaps those controls, then re-filters: the new model runs
once per image and size, the old one's probabilities stay cached. The batch tab adds inference.py's caption
options (`BATCH_CAPTION_OPTIONS`, parsed in `hydra/web/batch.py`).
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import time

import gradio as gr  # noqa: E402

from hydra.calibration.embedded import DEFAULT_METRIC  # noqa: E402
from hydra.cli import SIZE_CONTROLS  # noqa: E402
from hydra.common import log  # noqa: E402
from hydra.tags.rules import CATEGORIES  # noqa: E402
from hydra.web.api import api_routes  # noqa: E402
from hydra.web.handlers import (  # noqa: E402
    EMPTY,
    TOP_K,
    Handlers,
    cam_choices,
    exclude_info,
    implications_info,
    ui_errors,
)
from hydra.web.model import DEFAULT_THRESHOLD, THRESHOLD_MAX, THRESHOLD_MIN  # noqa: E402
from hydra.web.service import NO_CAM, WebService  # noqa: E402

THRESHOLD_STEP = 0.01
SIZE_STEP = 16  # both size sliders: patches are 16 px
SIZE_INFO = {"seqlen": "Patches per image (1024 as trained).",
             "max_size": "Long image edge in pixels, never upscaled (1024 as the published script)."}

# System fonts only: the page must not fetch anything from the internet (Gradio's themes can pull fonts).
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
TAG_LIST_HEIGHT = 560   # px: the scored list scrolls inside this box (250 tags would make the page very tall)
GROUPS_HEIGHT = 360     # px: the same for the tags grouped by category
NARROW = 768            # px: below this the columns stack, and the image comes before the settings
CSS = f"""
#tag-list .confidence-set {{ cursor: pointer; }}
#tag-list {{ max-height: {TAG_LIST_HEIGHT}px; overflow-y: auto; }}
#tag-groups {{ max-height: {GROUPS_HEIGHT}px; overflow-y: auto; }}
#tag-groups h4 {{ margin: 0.6em 0 0.1em 0; }}
@media (max-width: {NARROW}px) {{
  #main-col {{ order: 1; }}
  #settings-col {{ order: 2; }}
}}
"""
# Runs once on page load. Typing in the CAM tag picker replaces the shown tag instead of appending to it (Gradio
# keeps the current value in the search box): its text is selected on focus. Each new request of the image tab
# (upload, fetch, a settings change) or of the batch tab ("Tag all") closes the error messages left from earlier
# ones, so a stale error never sits beside fresh results.
JS = """
() => {
  let fresh = null;
  document.addEventListener("focusin", (e) => {
    const t = e.target;
    if (t instanceof HTMLInputElement && t.closest("#cam-tag")) { fresh = t; t.select(); }
  });
  document.addEventListener("mouseup", (e) => {
    if (fresh && e.target === fresh) { e.preventDefault(); fresh.select(); }
    fresh = null;
  });
  const clearErrors = () => document.querySelectorAll(".toast-body.error .toast-close").forEach((b) => b.click());
  const fresh_request = (e) => {
    if (e.target.closest && e.target.closest("#image, #settings-col, #fetch, #url, #cam-tag")) clearErrors();
  };
  document.addEventListener("change", fresh_request, true);
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest("#fetch, #batch-run")) clearErrors();
  }, true);
  document.addEventListener("drop", fresh_request, true);
}
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


def build_ui(web: WebService) -> gr.Blocks:
    """The Gradio app: an image tab (tags, caption, CAM), a batch tab, and the shared tag settings."""
    h = Handlers(web)
    title = page_title(web)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\nUpload, drop or paste an image, or give its URL.{cam_header(web)} "
                    "HTTP API: `POST /api/tag`, `GET /api/health`.", elem_id="header")
        c = {"key": gr.State(None), "calibration": gr.State(None)}
        with gr.Row():
            with gr.Column(scale=1, min_width=300, elem_id="settings-col"):
                c.update(_settings_column(web))
            with gr.Column(scale=3, elem_id="main-col"):
                with gr.Tab("Image"):
                    c.update(_image_tab(web))
                with gr.Tab("Batch"):
                    c.update(_batch_tab())
        _wire(h, c)
        if h.several:  # the page starts with the first model: offer only its choices
            first = web.default
            demo.load(lambda: (gr.Radio(choices=first.sources), gr.Dropdown(choices=cam_choices(first))), None,
                      [c["source"], c["cam_tag"]], api_visibility="private")
    return demo


def _settings_column(web: WebService) -> dict:
    first, several = web.default, len(web.models) > 1
    c = {}
    # custom values reach the handlers, which name the valid models (Gradio's own check would log a traceback
    # for every API call with a wrong name)
    c["model"] = gr.Dropdown(list(web.models), value=first.name, label="Model", visible=several,
                             allow_custom_value=True, elem_id="model",
                             info="Each model runs once per image; switching back re-filters.")
    # Built with what any model accepts (Gradio checks API calls against these choices); switching the model
    # narrows them in the page.
    c["source"] = gr.Radio(list(dict.fromkeys(s for m in web.models.values() for s in m.sources)),
                           value=first.default_source, label="Select tags by", elem_id="source")
    c["threshold"] = gr.Slider(THRESHOLD_MIN, THRESHOLD_MAX, value=DEFAULT_THRESHOLD, step=THRESHOLD_STEP,
                               label="Tag threshold (symmetric scale, -1 to 1)", elem_id="threshold",
                               info="Not a probability: the scale 2p - 1 of -t and the original WebUI, so 0.30 "
                                    "means p >= 65% and 0 means p >= 50%. The tag list shows p. Moving it selects "
                                    "the slider.")
    c["topk"] = gr.Slider(1, TOP_K, value=first.default_topk, step=1, label="Top k", elem_id="topk",
                          info="The k most probable tags (the default for models with uncalibrated scores, such as "
                               "the DINOv3 tagger). Moving it selects top k.")
    c["cal_file"] = gr.UploadButton("Upload a calibration CSV", file_types=[".csv"], type="filepath", size="sm")
    c["metric"] = gr.Textbox(DEFAULT_METRIC, label="Calibration metric", visible=first.embedded, elem_id="metric",
                             info="Model calibration: f<beta> or csi<weight>, optionally @<min precision>, e.g. "
                                  "f1.0@0.1 (upstream's default), f0.5 (precise), f2.0@0.3 (more tags).")
    # every family's modes (Gradio checks API calls against these); switching the model narrows them
    all_modes = list(dict.fromkeys(m for model in web.models.values() for m in model.family.implication_modes))
    c["mode"] = gr.Dropdown(all_modes, value=first.default_mode, label="Implications",
                            interactive=first.has_implications, info=implications_info(first))
    c["exclude"] = gr.CheckboxGroup(list(CATEGORIES), value=[], label="Exclude categories",
                                    interactive=first.has_categories, info=exclude_info(first))
    for control in SIZE_CONTROLS:  # one slider per size control; each model shows the one its family uses
        start = next((m.default_size for m in web.models.values() if m.family.size == control), control.default)
        c[control.name] = gr.Slider(control.minimum, control.maximum, value=start, step=SIZE_STEP,
                                    label=control.label, info=SIZE_INFO[control.name],
                                    visible=first.family.size == control, elem_id=control.name.replace("_", "-"))
    with gr.Accordion("Models" if several else "Model and extensions", open=False):
        gr.Markdown(model_info(web))
    return c


def _image_tab(web: WebService) -> dict:
    first = web.default
    cam = first.cam_depth is not None
    c = {}
    with gr.Row():
        with gr.Column():
            c["image"] = image_input(label="Image", sources=["upload", "clipboard"], type="filepath",
                                     image_mode=None, format="png", height=560, elem_id="image")
            with gr.Row():
                c["url"] = gr.Textbox(label="Image URL", placeholder="https://...", scale=4, elem_id="url")
                c["fetch"] = gr.Button("Fetch", scale=1, min_width=80, elem_id="fetch")
            c["cam_tag"] = gr.Dropdown(cam_choices(*web.models.values()), value=NO_CAM, label="CAM tag",
                                       info=CAM_INFO, elem_id="cam-tag", visible=cam)
            c["depth"] = gr.Slider(1, first.cam_depth or 2, value=1, step=1, label="CAM depth", visible=cam,
                                   info="1 = fastest, most precise; the maximum = slowest, most general")
            c["cam_note"] = gr.Markdown("CAM is not available for this model.", visible=not cam, elem_id="cam-note")
        with gr.Column():
            c["caption"] = gr.Textbox(label="Caption", lines=4, max_lines=12, buttons=["copy"], interactive=False,
                                      elem_id="caption")
            c["download"] = gr.DownloadButton("Download caption (.txt)", value=None, size="sm")
            c["status"] = gr.Markdown(elem_id="status")
            c["tag_list"] = gr.Label(label=f"Tags: probability p (top {TOP_K})", num_top_classes=TOP_K,
                                     show_heading=False, elem_id="tag-list")
            c["groups"] = gr.HTML(elem_id="tag-groups")
    return c


# The batch tab's caption options, in the order of `Handlers.on_batch`'s parameters: inference.py's flags of the
# same names (README "Coming from kohya / TagGUI"), parsed by the same functions. Each has an initial value, so
# gradio_client callers of /batch may leave them out.
BATCH_CAPTION_OPTIONS = ("caption_extension", "prefix", "trigger_from_folder", "undesired_tags", "replace_tags",
                         "category_thresholds", "max_tags", "separator", "underscores")


def _batch_tab() -> dict:
    c = {"files": gr.File(label="Images, or .zip files of images", file_count="multiple",
                          file_types=["image", ".zip"], type="filepath", elem_id="batch-files")}
    with gr.Accordion("Caption options (as inference.py)", open=False, elem_id="batch-options"):
        with gr.Row():
            c["caption_extension"] = gr.Textbox(".txt", label="Caption extension (--caption-extension)",
                                                elem_id="caption-extension", info="e.g. .txt or .caption")
            c["max_tags"] = gr.Number(0, label="Max tags (--max-tags)", minimum=0, precision=0, elem_id="max-tags",
                                      info="The N most probable that pass; 0 = no limit")
        c["prefix"] = gr.Textbox("", label="Always first (-p)", placeholder="trigger, anthro", elem_id="prefix",
                                 info="Tags or trigger words every caption starts with, comma-separated; a tag "
                                      "named here is not repeated.")
        c["trigger_from_folder"] = gr.Checkbox(label="Trigger word from kohya N_name/ folders in zips "
                                               "(--trigger-from-folder)", elem_id="trigger-from-folder")
        c["undesired_tags"] = gr.Textbox("", label="Undesired tags (--undesired-tags)", elem_id="undesired-tags",
                                         placeholder="text, signature, watermark",
                                         info="Never output; e621 or caption spelling, comma-separated.")
        c["replace_tags"] = gr.Textbox("", label="Replace tags (--replace-tag)", placeholder="male=man, female=woman",
                                       elem_id="replace-tags", info="OLD=NEW, separated by commas or new lines.")
        c["category_thresholds"] = gr.Textbox("", label="Category thresholds (--category-threshold)",
                                              placeholder="character=0.7, general=0.35", elem_id="category-thresholds",
                                              info="CATEGORY=T on the slider's symmetric -1..1 scale (p >= (T+1)/2); "
                                                   "replaces the threshold or calibration for that category.")
        with gr.Row():
            c["separator"] = gr.Textbox("", label="Separator (--separator)", placeholder=", ", elem_id="separator",
                                        info="Between caption tags; empty = ', ' (' ' with underscores)")
            c["underscores"] = gr.Checkbox(label="Keep underscores (-u; off = --spaces)", elem_id="underscores")
    c["run"] = gr.Button("Tag all", variant="primary", elem_id="batch-run")
    c["batch_status"] = gr.Markdown(elem_id="batch-status")
    with gr.Row():
        c["zip_out"] = gr.File(label="Captions (.zip)")
        c["csv_out"] = gr.File(label="Probabilities (.csv)")
    return c


def _wire(h: Handlers, c: dict) -> None:
    """Connect the events; the input lists are the handlers' parameters, in order."""
    on = {name: ui_errors(getattr(h, name)) for name in (
        "refilter", "on_upload", "on_url", "on_threshold", "on_topk", "on_metric", "on_calibration", "on_cam",
        "on_model",
        "on_batch")}
    controls = [c[k] for k in ("threshold", "source", "calibration", "mode", "exclude", "seqlen")]
    # last, so gradio_client calls that pass only the six controls above (one JTP-3 model) keep working
    later = [c["model"], c["max_size"], c["topk"], c["metric"]]
    settings = [c["key"], *controls, *later]
    outputs = [c[k] for k in ("caption", "tag_list", "groups", "download", "status")]
    cam_inputs = [c["key"], c["seqlen"], c["cam_tag"], c["depth"], c["model"]]
    private = {"api_visibility": "private"}
    c["image"].upload(on["on_upload"], [c["image"], *controls, c["cam_tag"], c["depth"], *later],
                      [c["key"], c["image"], *outputs], api_name="tag_image")
    c["image"].clear(lambda: (None, *EMPTY), None, [c["key"], *outputs], **private)
    url_inputs = [c["url"], *controls, c["cam_tag"], c["depth"], *later]
    c["fetch"].click(on["on_url"], url_inputs, [c["key"], c["image"], *outputs], api_name="tag_url")
    c["url"].submit(on["on_url"], url_inputs, [c["key"], c["image"], *outputs], **private)
    c["source"].input(on["refilter"], settings, outputs, api_name="refilter")
    c["mode"].input(on["refilter"], settings, outputs, **private)
    c["exclude"].input(on["refilter"], settings, outputs, **private)
    c["threshold"].input(on["on_threshold"], settings, [c["source"], *outputs], trigger_mode="always_last",
                         show_progress="hidden", **private)
    c["topk"].input(on["on_topk"], settings, [c["source"], *outputs], trigger_mode="always_last",
                    show_progress="hidden", **private)
    c["metric"].submit(on["on_metric"], settings, [c["source"], *outputs], **private)
    c["seqlen"].release(on["refilter"], settings, outputs, **private).then(on["on_cam"], cam_inputs, c["image"],
                                                                           **private)
    c["max_size"].release(on["refilter"], settings, outputs, **private)
    c["model"].input(on["on_model"], [c["model"], c["key"], c["exclude"]],
                     [c[k] for k in ("source", "mode", "exclude", "seqlen", "max_size", "cam_tag", "depth", "cam_note",
                                     "metric", "image")],
                     **private).then(on["refilter"], settings, outputs, **private)
    c["cal_file"].upload(on["on_calibration"], [c["cal_file"], *settings], [c["calibration"], c["source"], *outputs],
                         api_name="calibration")
    c["cam_tag"].change(on["on_cam"], cam_inputs, c["image"], api_name="cam", show_progress="minimal")
    c["depth"].release(on["on_cam"], cam_inputs, c["image"], **private)
    c["tag_list"].select(h.on_select, [c["model"]], c["cam_tag"], **private)
    c["run"].click(on["on_batch"], [c["files"], *controls, *later, *(c[k] for k in BATCH_CAPTION_OPTIONS)],
                   [c["zip_out"], c["csv_out"], c["batch_status"]], api_name="batch", concurrency_limit=1,
                   concurrency_id="batch")


CAM_INFO = ("Type to search, or click a tag in the tag list. On the image: green = evidence for the tag, red = "
            "against it; the blue number at the bottom right is the map's peak |relevance|, the value the "
            "colours are scaled to.")


def cam_header(web: WebService) -> str:
    """The header's CAM sentence: only for models that have a CAM, naming them when some do not."""
    with_cam = [m for m in web.models.values() if m.cam_depth is not None]
    if not with_cam:
        return ""
    sentence = " Click a tag to see where the model found it (class-activation map)"
    if len(with_cam) == len(web.models):
        return sentence + "."
    names = ", ".join(dict.fromkeys(m.family.title for m in with_cam))
    return f"{sentence}: {names} models only."


def page_title(web: WebService) -> str:
    return " and ".join(dict.fromkeys(m.family.title for m in web.models.values()))


def model_info(web: WebService) -> str:
    """The "Model and extensions" panel: per model its file, family, device and where its tag data comes from."""
    blocks = []
    for m in web.models.values():
        model = m.tagger.model
        default = " (default)" if m is web.default and len(web.models) > 1 else ""
        title = f", \"{model.title or 'untitled'}\"" if model.title is not None or m.family.extension_dir else ""
        lines = [f"- Model: `{m.path}`{default}", f"- {m.family.title}, {m.tagger.describe()}{title}"]
        lines += [f"- {line}" for line in model.info]
        if m.family.metadata_file:
            lines.append(f"- Tag metadata: {'loaded' if m.has_categories else 'not loaded'}")
        if m.family.calibration == "csv":
            lines.append(f"- calibration.csv: {'loaded' if m.default_calibration else 'not found'}")
        else:
            lines.append("- Uncalibrated scores: the top k by default (upload a calibration made for this model)")
        if m.family.extension_dir:
            lines.append(f"- Extensions: {len(model.extensions)}" + ("" if model.extensions else " (none loaded)"))
            lines += [f"  - `{e.label}` ({e.category}) from `{e.path}`" for e in model.extensions]
        if m.cam_depth is None:
            lines.append("- No CAM")
        blocks.append((f"**{m.name}**\n\n" if len(web.models) > 1 else "") + "\n".join(lines))
    return "\n\n".join(blocks)


def launch(web: WebService, host: str, port: int, share: bool = False) -> None:
    """Serve the UI and the API until interrupted (Ctrl-C)."""
    demo = build_ui(web)
    demo.queue(default_concurrency_limit=4, max_size=64)
    demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS, js=JS, quiet=True,
                prevent_thread_lock=True,
                max_file_size=max(web.limits.max_upload_bytes, web.limits.batch_max_bytes),  # batch zips
                allowed_paths=[web.tmpdir], app_kwargs={"routes": api_routes(web)},
                footer_links=["api", "settings"], ssr_mode=False, mcp_server=False, show_error=False)
    url = demo.local_url.rstrip("/")
    log(f"Serving the web UI on {url} with {', '.join(web.models)} (HTTP API: POST {url}/api/tag, "
        f"GET {url}/api/health).")
    if demo.share_url:
        log(f"Public link (anyone who has it can use this tagger): {demo.share_url}")
    log("Press Ctrl-C to stop.")
    demo.block_thread()

