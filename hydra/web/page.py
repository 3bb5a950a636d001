"""The web UI (Gradio) and the HTTP API of `app.py`, on top of `hydra.web.service`, which does the work.

`build_ui` lays out the page: a column of tag settings shared by the image and batch tabs, a model
selector when more than one model is served, and for each model only the controls it supports (JTP-3:
sequence length, implications, CAM; DINOv3: max size, and category exclusion when its vocabulary has
categories). Switching the model swaps those controls, then re-filters: the new model runs once per image
and size, the old one's probabilities stay cached. `api_routes` adds `POST /api/tag` and `GET /api/health`
next to Gradio's own API, and `launch` serves both.

Gradio endpoints take their original parameters first and the later ones (`model`, `max_size`, `topk`)
last, with defaults, so `gradio_client` code written for a single JTP-3 model keeps working.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import os
import posixpath
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this at import time

import gradio as gr  # noqa: E402
from fastapi import APIRouter, Request  # noqa: E402  (FastAPI and Starlette come with Gradio)
from fastapi.responses import JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from hydra.bulk.loader import describe_error  # noqa: E402
from hydra.common import log  # noqa: E402
from hydra.images.naflex import DEFAULT_MAX_SIZE, DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN  # noqa: E402
from hydra.models.vocab import E621_CATEGORY_NAMES  # noqa: E402
from hydra.tagger import JTP3  # noqa: E402
from hydra.tags.implications import MODES  # noqa: E402
from hydra.tags.rules import CATEGORIES, TagRules, format_caption, to_symmetric  # noqa: E402
from hydra.web.service import (  # noqa: E402
    CATEGORY_ORDER,
    DEFAULT_THRESHOLD,
    FAMILY_TITLES,
    MAX_SIZE_MAX,
    MAX_SIZE_MIN,
    NO_CAM,
    SOURCE_SLIDER,
    SOURCE_TOPK,
    SOURCE_UPLOAD,
    THRESHOLD_MAX,
    THRESHOLD_MIN,
    Limits,
    UserError,
    WebModel,
    WebService,
)

THRESHOLD_STEP = 0.01
SIZE_STEP = 16               # both size sliders: patches are 16 px
TOP_K = 250                  # tags in the scored list (the original's num_top_classes), and the top-k slider's end
IMPLICATIONS_INFO = ("As inference.py -i. inherit: a tag gets the best probability of the tags implying it; "
                     "constrain: the lowest of the tags it implies; remove: only the most specific tags.")
TITLE = "RedRocket JTP-3 Hydra"


class _Settings(NamedTuple):
    """The tag settings every handler receives (the shared column of controls)."""

    threshold: float
    source: str
    calibration: dict | None  # {model name: uploaded thresholds}
    mode: str
    exclude: list[str]
    seqlen: float             # JTP-3 models
    model: str | None
    max_size: float | None    # DINOv3 models
    topk: float | None


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


def build_ui(web: WebService) -> gr.Blocks:
    """The Gradio app: an image tab (tags, caption, CAM), a batch tab, and the shared tag settings."""
    first = web.default
    several = len(web.models) > 1
    start_size = {jtp3: next((m.default_size for m in web.models.values() if m.jtp3 == jtp3), default)
                  for jtp3, default in ((True, DEFAULT_SEQLEN), (False, DEFAULT_MAX_SIZE))}
    empty = ("", None, "", None, "")

    def resolve(s: _Settings) -> tuple[WebModel, int, TagRules]:
        m = web.model(s.model)
        rules = m.rules(s.threshold, s.source, (s.calibration or {}).get(m.name), s.mode, s.exclude, s.topk)
        return m, m.size(s.seqlen if m.jtp3 else s.max_size), rules

    def render(key, s: _Settings):
        if not key:
            return empty
        m, size, rules = resolve(s)
        start = time.perf_counter()
        tags = m.classify(web.probabilities(m, key, size), rules)
        caption = format_caption(dict(tags))
        shown = {m.names[m.position[t]]: to_symmetric(p) for t, p in tags[:TOP_K]}
        how = f"top {rules.topk}" if rules.topk else f"thresholds from {s.source.lower()}"
        status = (f"{m.name + ': ' if several else ''}{len(tags)} of {len(m.labels)} tags pass ({how}); "
                  f"{'seqlen' if m.jtp3 else 'max size'} {size}, {time.perf_counter() - start:.2f} s.")
        download = _caption_file(web, web.entry(key).name, caption)
        return caption, shown, _groups_html(m, tags), download, status

    def show(data, name, s: _Settings, cam_tag, depth):
        m, size, _ = resolve(s)  # validate the settings before decoding anything
        key = web.add_image(data, name, m, size)
        return (key, web.cam(m, key, size, cam_tag, depth), *render(key, s))

    # Every handler spells out its parameters: gradio_client takes them by these names.
    @_ui
    def refilter(key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None, topk=None):
        return render(key, _Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk))

    @_ui
    def on_upload(path, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth, model=None,
                  max_size=None, topk=None):
        if not path:
            return (None, None, *empty)
        s = _Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk)
        return show(web.read_file(path), os.path.basename(path), s, cam_tag, depth)

    @_ui
    def on_url(url, threshold, source, calibration, mode, exclude, seqlen, cam_tag, depth, model=None,
               max_size=None, topk=None):
        data = web.fetch(url)
        name = posixpath.basename(url.split("?")[0].split("#")[0].rstrip("/")) or "image"
        s = _Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size, topk)
        return show(data, name, s, cam_tag, depth)

    @_ui
    def on_threshold(key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                     topk=None):
        # as the original: moving the slider drops the calibration (and here the top-k selection too)
        s = _Settings(threshold, SOURCE_SLIDER, calibration, mode, exclude, seqlen, model, max_size, topk)
        return (SOURCE_SLIDER, *render(key, s))

    @_ui
    def on_topk(key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None, topk=None):
        s = _Settings(threshold, SOURCE_TOPK, calibration, mode, exclude, seqlen, model, max_size, topk)
        return (SOURCE_TOPK, *render(key, s))

    @_ui
    def on_calibration(path, key, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None,
                       topk=None):
        if not path:
            raise UserError("No calibration file was uploaded.")
        m = web.model(model)
        thresholds = m.load_calibration(path)
        gr.Info(f"Loaded {len(thresholds)} thresholds for {m.name} from {os.path.basename(path)}.")
        calibration = {**(calibration or {}), m.name: thresholds}  # one uploaded calibration per model
        s = _Settings(threshold, SOURCE_UPLOAD, calibration, mode, exclude, seqlen, model, max_size, topk)
        return (calibration, SOURCE_UPLOAD, *render(key, s))

    @_ui
    def on_cam(key, seqlen, cam_tag, depth, model=None):
        if not key:
            return gr.skip()
        m = web.model(model)
        return web.cam(m, key, m.size(seqlen) if m.jtp3 else m.default_size, cam_tag, depth)

    def on_select(model, evt: gr.SelectData):
        m = web.models.get(model, first)
        return evt.value if m.jtp3 and evt.value in m.by_name else gr.skip()

    @_ui
    def on_model(model, key, exclude):
        """Swap the controls to what the chosen model supports (a `.then` re-filters afterwards)."""
        m = web.model(model)
        try:
            plain = web.entry(key).display if key else gr.skip()  # no CAM from the previous model
        except UserError:
            plain = gr.skip()
        return (gr.Radio(choices=m.sources, value=m.default_source),
                gr.Dropdown(value=m.default_mode, interactive=m.has_implications, info=_implications_info(m)),
                gr.CheckboxGroup(value=exclude if m.has_categories else [], interactive=m.has_categories,
                                 info=_exclude_info(m)),
                gr.Slider(visible=m.jtp3), gr.Slider(visible=not m.jtp3),
                gr.Dropdown(choices=_cam_choices(m), value=NO_CAM, visible=m.jtp3),
                gr.Slider(maximum=m.tagger.model.depth, value=1, visible=True) if m.jtp3 else gr.Slider(visible=False),
                gr.Markdown(visible=not m.jtp3), plain)

    @_ui
    def on_batch(files, threshold, source, calibration, mode, exclude, seqlen, model=None, max_size=None, topk=None,
                 progress=gr.Progress()):  # noqa: B008
        m, size, rules = resolve(_Settings(threshold, source, calibration, mode, exclude, seqlen, model, max_size,
                                           topk))
        progress(0, desc="Reading")
        return web.batch(m, files or [], rules, size,
                         lambda done, total: progress((done, total), desc="Tagging", unit="images"))

    title = _title(web)
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        cam_text = " Click a tag to see where the model found it (class-activation map)." if any(
            m.jtp3 for m in web.models.values()) else ""
        gr.Markdown(f"# {title}\nUpload, drop or paste an image, or give its URL.{cam_text} "
                    "HTTP API: `POST /api/tag`, `GET /api/health`.")
        key = gr.State(None)
        calibration = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                # custom values reach the handlers, which name the valid models (Gradio's own check would log a
                # traceback for every API call with a wrong name)
                model = gr.Dropdown(list(web.models), value=first.name, label="Model", visible=several,
                                    allow_custom_value=True, elem_id="model",
                                    info="Each model runs once per image; switching back re-filters.")
                # Built with what any model accepts (Gradio checks API calls against these choices); switching
                # the model narrows them in the page.
                source = gr.Radio(list(dict.fromkeys(s for m in web.models.values() for s in m.sources)),
                                  value=first.default_source, label="Select tags by", elem_id="source")
                threshold = gr.Slider(THRESHOLD_MIN, THRESHOLD_MAX, value=DEFAULT_THRESHOLD, step=THRESHOLD_STEP,
                                      label="Tag threshold", elem_id="threshold",
                                      info="-1 to 1 (= 2p - 1, so 0.30 means p >= 0.65). Moving it selects the "
                                           "slider.")
                topk = gr.Slider(1, TOP_K, value=first.default_topk, step=1, label="Top k", elem_id="topk",
                                 info="The k most probable tags (the DINOv3 default: its scores are uncalibrated). "
                                      "Moving it selects top k.")
                cal_file = gr.UploadButton("Upload a calibration CSV", file_types=[".csv"], type="filepath",
                                           size="sm")
                mode = gr.Dropdown(list(MODES), value=first.default_mode, label="Implications",
                                   interactive=first.has_implications, info=_implications_info(first))
                exclude = gr.CheckboxGroup(list(CATEGORIES), value=[], label="Exclude categories",
                                           interactive=first.has_categories, info=_exclude_info(first))
                seqlen = gr.Slider(MIN_SEQLEN, MAX_SEQLEN, value=start_size[True], step=SIZE_STEP,
                                   label="Sequence length", info="Patches per image (1024 as trained).",
                                   visible=first.jtp3, elem_id="seqlen")
                max_size = gr.Slider(MAX_SIZE_MIN, MAX_SIZE_MAX, value=start_size[False], step=SIZE_STEP,
                                     label="Max size", info="Long image edge in pixels, never upscaled (1024 as the "
                                     "published script).", visible=not first.jtp3, elem_id="max-size")
                with gr.Accordion("Models" if several else "Model and extensions", open=False):
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
                            cam_tag = gr.Dropdown(_cam_choices(*web.models.values()), value=NO_CAM, label="CAM tag",
                                                  info="Pick a tag, or click one in the tag list.", elem_id="cam-tag",
                                                  visible=first.jtp3)
                            depth_max = first.tagger.model.depth if first.jtp3 else 2
                            depth = gr.Slider(1, depth_max, value=1, step=1, label="CAM depth", visible=first.jtp3,
                                              info="1 = fastest, most precise; the maximum = slowest, most general")
                            cam_note = gr.Markdown("CAM is available for JTP-3 models.", visible=not first.jtp3,
                                                   elem_id="cam-note")
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
        later = [model, max_size, topk]  # added after the first release: last, so old clients keep working
        settings = [key, *controls, *later]
        outputs = [caption, tag_list, groups, download, status]
        cam_inputs = [key, seqlen, cam_tag, depth, model]
        image.upload(on_upload, [image, *controls, cam_tag, depth, *later], [key, image, *outputs],
                     api_name="tag_image")
        image.clear(lambda: (None, *empty), None, [key, *outputs], api_visibility="private")
        fetch.click(on_url, [url, *controls, cam_tag, depth, *later], [key, image, *outputs], api_name="tag_url")
        url.submit(on_url, [url, *controls, cam_tag, depth, *later], [key, image, *outputs], api_visibility="private")
        source.input(refilter, settings, outputs, api_name="refilter")
        mode.input(refilter, settings, outputs, api_visibility="private")
        exclude.input(refilter, settings, outputs, api_visibility="private")
        threshold.input(on_threshold, settings, [source, *outputs], trigger_mode="always_last",
                        show_progress="hidden", api_visibility="private")
        topk.input(on_topk, settings, [source, *outputs], trigger_mode="always_last", show_progress="hidden",
                   api_visibility="private")
        seqlen.release(refilter, settings, outputs, api_visibility="private").then(
            on_cam, cam_inputs, image, api_visibility="private")
        max_size.release(refilter, settings, outputs, api_visibility="private")
        model.input(on_model, [model, key, exclude],
                    [source, mode, exclude, seqlen, max_size, cam_tag, depth, cam_note, image],
                    api_visibility="private").then(refilter, settings, outputs, api_visibility="private")
        cal_file.upload(on_calibration, [cal_file, *settings], [calibration, source, *outputs],
                        api_name="calibration")
        cam_tag.change(on_cam, cam_inputs, image, api_name="cam", show_progress="minimal")
        depth.release(on_cam, cam_inputs, image, api_visibility="private")
        tag_list.select(on_select, [model], cam_tag, api_visibility="private")
        run.click(on_batch, [files, *controls, *later], [zip_out, csv_out, batch_status], api_name="batch",
                  concurrency_limit=1, concurrency_id="batch")
        if several:  # the page starts with the first model: offer only its choices
            demo.load(lambda: (gr.Radio(choices=first.sources), gr.Dropdown(choices=_cam_choices(first))), None,
                      [source, cam_tag], api_visibility="private")
    return demo


def _title(web: WebService) -> str:
    families = {m.family for m in web.models.values()}
    return TITLE if families == {JTP3} else " and ".join(FAMILY_TITLES[f] for f in sorted(families, reverse=True))


def _cam_choices(*models: WebModel) -> list[str]:
    """CAM tags of these models (the JTP-3 ones: never 74,625 DINOv3 tags in the page)."""
    return [NO_CAM, *sorted({n for m in models if m.jtp3 for n in m.names})]


def _implications_info(m: WebModel) -> str:
    if m.has_implications:
        return IMPLICATIONS_INFO
    return "Needs tag metadata (-m)." if m.jtp3 else "Not available: this model has no implication data."


def _exclude_info(m: WebModel) -> str | None:
    if m.has_categories:
        return None
    return ("Needs tag metadata (-m)." if m.jtp3 else
            "Not available: this model's vocabulary has no categories (tagger_vocab_with_categories.json has).")


def _groups_html(m: WebModel, tags: list[tuple[str, float]]) -> str:
    if not m.has_categories:
        why = "no tag metadata is loaded" if m.jtp3 else "its vocabulary has none"
        return f"<p><em>Categories are unknown for this model ({why}).</em></p>"
    groups: dict[str, list[str]] = {}
    for t, _ in tags:
        groups.setdefault(m.category_name(t), []).append(m.names[m.position[t]])
    order = [E621_CATEGORY_NAMES[c] for c in CATEGORY_ORDER]
    return "".join(f"<h4>{name} ({len(groups[name])})</h4><p>{html.escape(', '.join(groups[name]))}</p>"
                   for name in order if name in groups)


def _caption_file(web: WebService, name: str, caption: str) -> str:
    """The caption as a .txt download named after the image (one folder per distinct caption)."""
    folder = os.path.join(web.tmpdir, hashlib.sha1(caption.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, (os.path.splitext(name)[0] or "image") + ".txt")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(caption)
    return path


def _model_info(web: WebService) -> str:
    blocks = []
    for m in web.models.values():
        lines = [f"- Model: `{m.path}`" + (" (default)" if m is web.default and len(web.models) > 1 else ""),
                 f"- {FAMILY_TITLES[m.family]}, {m.tagger.describe()}"]
        if m.jtp3:
            model = m.tagger.model
            lines[1] += f", \"{model.metadata.get('modelspec.title', 'untitled')}\""
            lines += [f"- Tag metadata: {'loaded' if m.has_categories else 'not loaded'}",
                      f"- calibration.csv: {'loaded' if m.default_calibration else 'not found'}",
                      f"- Extensions: {len(model.extensions)}" + ("" if model.extensions else " (none loaded)")]
            lines += [f"  - `{e.label}` ({e.category}) from `{e.path}`" for e in model.extensions]
        else:
            cats = "with categories" if m.has_categories else "no categories"
            lines += [f"- Vocabulary: `{m.vocab_path}`, {cats}",
                      "- No implications, no CAM; calibration.csv is for JTP-3 models (upload one for this model)."]
        blocks.append((f"**{m.name}**\n\n" if len(web.models) > 1 else "") + "\n".join(lines))
    return "\n\n".join(blocks)


# -- the HTTP API --------------------------------------------------------------------------------------

def api_routes(web: WebService) -> list:
    """`POST /api/tag` and `GET /api/health`, as FastAPI routes to put in front of Gradio's."""
    router = APIRouter()

    @router.get("/api/health")
    def health() -> dict:
        return web.health()

    @router.post("/api/tag")
    async def tag(request: Request):
        try:
            fields, data = await _read_tag_request(request, web.limits)
            return JSONResponse(await run_in_threadpool(web.tag_request, fields, data))
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # never a traceback to the client; the server log has it
            log("HTTP API: unexpected error:")
            traceback.print_exc()
            return JSONResponse({"error": f"internal error: {describe_error(e)}"}, status_code=500)

    return router.routes


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


def launch(web: WebService, host: str, port: int, share: bool = False) -> None:
    """Serve the UI and the API until interrupted (Ctrl-C)."""
    demo = build_ui(web)
    demo.queue(default_concurrency_limit=4, max_size=64)
    demo.launch(server_name=host, server_port=port, share=share, theme=THEME, css=CSS, quiet=True,
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
