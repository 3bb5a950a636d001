"""The HTTP API next to Gradio's own: `POST /api/tag` and `GET /api/health`, and serving the page and the API.

Request bodies are read with a hard cap (the declared length, and again while streaming), parsed as multipart
or JSON, and handed to `WebService.tag_request`; a `UserError` becomes `{"error": ...}` with its 4xx status,
anything else a one-line 500, never a traceback.
"""

from __future__ import annotations

import json
import traceback

import anyio
from fastapi import APIRouter, Request  # FastAPI and Starlette come with Gradio
from fastapi.responses import JSONResponse

from hydra.bulk.loader import describe_error
from hydra.common import log
from hydra.web.model import UserError
from hydra.web.service import Limits, WebService

# Threads of their own for /api/tag (not the shared pool that serves Gradio's routes): slow URL fetches wait
# in one limiter, decoding and the model in another (which WebService bounds again by memory), and at most
# MAX_PENDING requests are held at once (each up to the upload limit in memory); more get 503.
FETCH_THREADS = 16
WORK_THREADS = 8
MAX_PENDING = 64


def api_routes(web: WebService) -> list:
    """`POST /api/tag` and `GET /api/health`, as FastAPI routes to put in front of Gradio's."""
    router = APIRouter()
    limiters: dict[str, anyio.CapacityLimiter] = {}
    pending = [0]

    def limiter(name: str) -> anyio.CapacityLimiter:  # made in the server's event loop, on first use
        if name not in limiters:
            limiters[name] = anyio.CapacityLimiter(FETCH_THREADS if name == "fetch" else WORK_THREADS)
        return limiters[name]

    @router.get("/api/health")
    async def health() -> dict:  # on the event loop: no thread pool or queue that fetches could fill
        return web.health()

    @router.post("/api/tag")
    async def tag(request: Request):
        if pending[0] >= MAX_PENDING:
            return JSONResponse({"error": f"The server is busy ({MAX_PENDING} requests waiting); retry later."},
                                status_code=503, headers={"Retry-After": "5"})
        pending[0] += 1
        try:
            fields, data = await _read_tag_request(request, web.limits)
            url = fields.get("url")
            web.request_settings(fields, data)  # a bad setting is refused before a URL is fetched
            if data is None and isinstance(url, str) and url.strip():
                data = await anyio.to_thread.run_sync(web.fetch, url, limiter=limiter("fetch"))
            result = await anyio.to_thread.run_sync(web.tag_request, fields, data, limiter=limiter("work"))
            return JSONResponse(result)
        except UserError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except Exception as e:  # never a traceback to the client; the server log has it
            log("HTTP API: unexpected error:")
            traceback.print_exc()
            return JSONResponse({"error": f"internal error: {describe_error(e)}"}, status_code=500)
        finally:
            pending[0] -= 1

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
        except RecursionError:
            raise UserError("The JSON body is nested too deeply.") from None
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
