"""JTP-3 Hydra web UI: tag images in the browser with one or more models (JTP-3 Hydra and the DINOv3 booru
tagger), see the class-activation map of any JTP-3 tag, tag batches, and call it over HTTP. Loads each model
once, as `inference.py` does (same flags, defaults and first-use download), and serves on
http://127.0.0.1:7860.

Examples:
    python app.py                                   # http://127.0.0.1:7860, the default JTP-3 model
    python app.py --port 8000 -e my_extensions/     # another port, extra extensions
    python app.py -M models/jtp-3-hydra.safetensors -M tagger/tagger_proto.safetensors   # both, with a selector
    python app.py --host 0.0.0.0                    # reachable from the local network (no login!)
    curl -F image=@picture.png -F model=tagger_proto.safetensors http://127.0.0.1:7860/api/tag
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import tempfile

# What this server accepts from a client (flags can change the first two).
MAX_UPLOAD_MB = 64            # one image: an upload, a URL's body, or a zip member
URL_TIMEOUT = 15.0            # seconds for a whole URL fetch, redirects included
MAX_PIXELS = 2 * 89_478_485   # refuse larger images before decoding: Pillow's own decompression-bomb limit
                              # (179 MP, ~540 MB decoded), which the original turns off
BATCH_MAX_FILES = 2000        # images per batch request (zip members included)
BATCH_MAX_MB = 1024           # total size of one batch request, uncompressed (also the upload limit for zips)
TEMP_MAX_AGE = 60.0           # minutes a temporary file (upload, caption download, batch result) is kept
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
DEFAULT_THRESHOLD_ARG = "0.3"  # the UI slider's default, used when there is no usable calibration.csv
def build_parser() -> argparse.ArgumentParser:
    from hydra import cli

    p = argparse.ArgumentParser(description="JTP-3 Hydra WebUI by Project RedRocket", allow_abbrev=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"Address to listen on. (Default: {DEFAULT_HOST}, this computer only; 0.0.0.0 = every "
                        "network interface, without any login)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port to listen on. (Default: {DEFAULT_PORT})")
    g.add_argument("--share", action="store_true",
                   help="Also publish a temporary public gradio.live link (anyone with the link can use it).")
    g.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                   help=f"Largest accepted image, in MiB. (Default: {MAX_UPLOAD_MB})")
    g.add_argument("--url-timeout", type=float, default=URL_TIMEOUT,
                   help=f"Seconds allowed to fetch an image URL. (Default: {URL_TIMEOUT:g})")
    g.add_argument("--temp-max-age", type=float, default=TEMP_MAX_AGE, metavar="MINUTES",
                   help="Delete uploads, downloads and batch results older than this while serving (all of them "
                        f"on exit). (Default: {TEMP_MAX_AGE:g})")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="Also fetch image URLs on loopback, private and link-local addresses and this server's own "
                        "(by default refused: with --share or --host 0.0.0.0 a client could probe your network). "
                        "For a trusted LAN only.")
    g = p.add_argument_group("models")
    cli.add_model_flag(g, repeat=True, help_extra="Repeat to serve several: the UI gets a model selector and the "
                       "API a 'model' field, both naming models by file name; the first is the default. ")
    cli.add_device_flags(g)
    cli.add_size_flags(g, unset=True)  # None unless given, so a size flag no served model uses is refused
    g = p.add_argument_group("tag data and extensions (for the models they apply to)")
    cli.add_metadata_flag(g)
    cli.add_extension_flags(g)
    g.add_argument("-O", "--original-tags", action="store_true",
                   help="Do not rewrite tags for compatibility with diffusion models (JTP-3's vulva -> pussy).")
    cli.add_dinov3_flags(p.add_argument_group("DINOv3 tagger models"), repeat_vocab=True)
    return p


def startup_threshold() -> str:
    """calibration.csv (current folder, else the project folder) when it is there and valid, else the slider's
    default; a broken calibration.csv is reported and skipped rather than stopping the server."""
    from hydra.common import log
    from hydra.models.resources import find_calibration
    from hydra.tags.rules import DataFileError, load_calibration

    if (calibration := find_calibration()) is None:  # the current folder's, else the project folder's
        return DEFAULT_THRESHOLD_ARG
    try:
        load_calibration(calibration)
    except (DataFileError, OSError, UnicodeDecodeError) as e:
        log(f"warning: ignoring {calibration}: {e}")
        return DEFAULT_THRESHOLD_ARG
    return calibration


def make_web(args: argparse.Namespace):
    """The models, their tag settings and the limits for the server, each model loaded exactly as
    `inference.py` loads it, one after the other.

    Raises:
        CheckpointError, DataFileError, DownloadError, OSError, ValueError: a bad flag or file.
    """
    from hydra import cli
    from hydra.common import log
    from hydra.web.model import WebModel
    from hydra.web.service import Limits, WebService

    if not all(math.isfinite(v) and v > 0 for v in (args.max_upload_mb, args.url_timeout, args.temp_max_age)):
        raise ValueError("--max-upload-mb, --url-timeout and --temp-max-age must be positive numbers")
    models = [cli.resolve_model(p) for p in args.model or [None]]
    _check_models(args, models)
    csv_threshold = startup_threshold() if any(f.calibration == "csv" for _, f in models) else None
    vocabs = iter(args.vocab)
    loaded = []
    for i, ((path, family), name) in enumerate(zip(models, model_names([p for p, _ in models])), 1):
        log(f"Model {i} of {len(models)}: {name} ({family.title})")
        # Each model gets the flags its family uses, loaded as inference.py loads it. The UI owns the selection
        # (a calibration, the slider or top k), implications and exclusions.
        load_args = argparse.Namespace(model=path, device=args.device, dtype=args.dtype, compile=args.compile,
                                       max_pixels=MAX_PIXELS,
                                       threshold=csv_threshold if family.calibration == "csv" else None,
                                       **family_flags(args, family))
        if "vocab" in family.options:
            load_args.vocab = next(vocabs, None)
        tagger, settings = cli.load_run(load_args)
        loaded.append(WebModel(name, path, tagger, settings))
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=MAX_PIXELS,
                    url_timeout=args.url_timeout, batch_max_files=BATCH_MAX_FILES,
                    batch_max_bytes=BATCH_MAX_MB * 2**20, allow_private_urls=args.allow_private_urls)
    return WebService(loaded, limits, temp_max_age=args.temp_max_age * 60)


def family_flags(args: argparse.Namespace, family) -> dict:
    """This script's flags that a model of `family` uses (a tags CSV, extensions, renames, its size (None =
    the family's default), its options); the others stay at their defaults for it."""
    flags = {family.size.name: getattr(args, family.size.name)}
    if family.metadata_file is not None:
        flags["metadata"] = args.metadata
    if family.extension_dir is not None:
        flags.update(extension=args.extension, no_default_extensions=args.no_default_extensions)
    if family.caption.renames:
        flags["original_tags"] = args.original_tags
    flags.update({name: getattr(args, name) for name in family.options if name != "vocab"})
    return flags


def _check_models(args: argparse.Namespace, models: list) -> None:
    """Flags that cannot apply to the configured models: say so before anything is loaded."""
    paths = [p for p, _ in models]
    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise ValueError("the same model file is given twice with -M")
    vocab_models = sum("vocab" in f.options for _, f in models)
    if len(args.vocab) > vocab_models:
        raise ValueError(f"{len(args.vocab)} --vocab for {vocab_models} DINOv3 tagger checkpoint(s) among the -M "
                         "files (each --vocab goes to the next DINOv3 model, in order)")
    from hydra import cli
    from hydra.models import families

    for control in cli.SIZE_CONTROLS:  # inference.py's check, for the first model when no model uses the flag
        if getattr(args, control.name) is not None and not any(f.size is control for _, f in models):
            path, family = models[0]
            cli.check_size_flags(args, family, path)
    for flag, given, uses in (("-m", args.metadata is not None, lambda f: f.metadata_file),
                              ("-e", bool(args.extension), lambda f: f.extension_dir)):
        if given and not any(uses(f) for _, f in models):
            titles = [f.title for f in families() if uses(f)]
            users = " and ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 1 else titles)
            raise ValueError(f"{flag} is for {users} models, and none is configured")


def model_names(paths: list[str]) -> list[str]:
    """What the selector and the API call each model: its file name, or its path when file names repeat."""
    names = [os.path.basename(p) for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def port_in_use(host: str, port: int) -> bool:
    """True if the server could not listen on (host, port): checked before the models load."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # a bad host is for the server to report
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as s:
            if os.name != "nt":  # as uvicorn binds: a port in TIME_WAIT is free (SO_REUSEADDR means more on Windows)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError:
                return True
    return False


def main(args: argparse.Namespace) -> int:
    from hydra.common import log
    from hydra.hub import DownloadError
    from hydra.models.checkpoint import CheckpointError
    from hydra.tags.rules import DataFileError
    from hydra.web.page import launch

    if port_in_use(args.host, args.port):
        log(f"error: port {args.port} is in use; use --port N")
        return 2
    # Every temporary file of this server (Gradio's uploads and cached outputs, our captions and batch results)
    # goes into one folder of this process, swept by age while serving and removed on every exit path.
    root = tempfile.mkdtemp(prefix="hydra-webui-")
    os.environ["GRADIO_TEMP_DIR"] = os.path.join(root, "gradio")
    previous = {sig: signal.signal(sig, _interrupt) for sig in _EXIT_SIGNALS}
    try:
        try:
            web = make_web(args)
        except (CheckpointError, DataFileError, DownloadError, OSError, ValueError) as e:
            log(f"error: {e}")
            return 2
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            log(f"warning: listening on {args.host}: anyone who can reach this address can use the tagger.")
        log(f"Temporary files: {root} (files older than {args.temp_max_age:g} min are deleted; all on exit)")
        try:
            launch(web, args.host, args.port, args.share)
        finally:
            web.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(root, ignore_errors=True)
    return 0


# SIGTERM (kill, docker stop, systemd) and SIGHUP (the terminal closed) end the server as Ctrl-C does, so the
# temporary folder is removed; Gradio's block_thread stops the server on KeyboardInterrupt.
_EXIT_SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
