"""JTP-3 Hydra web UI: tag images in the browser, see the class-activation map of any tag, tag batches,
and call it over HTTP. Loads the model once, as `inference.py` does (same flags, defaults and first-use
download), and serves on http://127.0.0.1:7860.

Examples:
    python app.py                                   # http://127.0.0.1:7860
    python app.py --port 8000 -e my_extensions/     # another port, extra extensions
    python app.py --host 0.0.0.0                    # reachable from the local network (no login!)
    curl -F image=@picture.png http://127.0.0.1:7860/api/tag
"""

from __future__ import annotations

import argparse
import os
import sys

# What this server accepts from a client (flags can change the first two).
MAX_UPLOAD_MB = 64            # one image: an upload, a URL's body, or a zip member
URL_TIMEOUT = 15.0            # seconds for a whole URL fetch, redirects included
MAX_PIXELS = 2 * 89_478_485   # refuse larger images before decoding: Pillow's own decompression-bomb limit
                              # (179 MP, ~540 MB decoded), which the original turns off
BATCH_MAX_FILES = 2000        # images per batch request (zip members included)
BATCH_MAX_MB = 1024           # total size of one batch request, uncompressed (also the upload limit for zips)
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
DEFAULT_THRESHOLD_ARG = "0.3"  # the UI slider's default, used when there is no usable calibration.csv
# inference.py flags this script shares (same names, same meaning), handed to `inference.load`.
MODEL_FLAGS = ("model", "metadata", "extension", "no_default_extensions", "original_tags", "seqlen", "device",
               "dtype")


def build_parser() -> argparse.ArgumentParser:
    from hydra.image import DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN
    from hydra.resources import DEFAULT_METADATA, DEFAULT_MODEL

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
    g = p.add_argument_group("model")
    g.add_argument("-M", "--model", metavar="PATH", help=f"Path to model file. (Default: {DEFAULT_MODEL})")
    g.add_argument("-m", "--metadata", metavar="PATH",
                   help=f"Path to CSV file with additional tag metadata. (Default: {DEFAULT_METADATA}; '' = none)")
    g.add_argument("-e", "--extension", metavar="PATH", action="append", default=[],
                   help="Path to extension. May be specified multiple times. If a directory is specified, all "
                        "extensions in the specified directory are loaded. (Default: extensions/jtp-3-hydra)")
    g.add_argument("-E", "--no-default-extensions", action="store_true", help="Do not load extensions by default.")
    g.add_argument("-O", "--original-tags", action="store_true",
                   help="Do not rewrite tags for compatibility with diffusion models.")
    g.add_argument("-S", "--seqlen", type=int, default=DEFAULT_SEQLEN,
                   help=f"Initial NaFlex sequence length. (Default: {DEFAULT_SEQLEN}; {MIN_SEQLEN} to {MAX_SEQLEN})")
    g.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                   help="Torch device. (Default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    return p


def startup_threshold() -> str:
    """calibration.csv (current folder) when it is there and valid, else the slider's default; a broken
    calibration.csv is reported and skipped rather than stopping the server."""
    from hydra.common import log
    from hydra.resources import DEFAULT_CALIBRATION
    from hydra.tags import DataFileError, load_calibration

    if not os.path.isfile(DEFAULT_CALIBRATION):
        return DEFAULT_THRESHOLD_ARG
    try:
        load_calibration(DEFAULT_CALIBRATION)
    except (DataFileError, OSError, UnicodeDecodeError) as e:
        log(f"warning: ignoring {DEFAULT_CALIBRATION}: {e}")
        return DEFAULT_THRESHOLD_ARG
    return DEFAULT_CALIBRATION


def make_web(args: argparse.Namespace):
    """The model, tag settings and limits for the server, loaded exactly as `inference.py` loads them.

    Raises:
        CheckpointError, DataFileError, DownloadError, OSError, ValueError: a bad flag or file.
    """
    import inference
    from hydra.image import MAX_SEQLEN, MIN_SEQLEN
    from hydra.webui import Limits, WebTagger

    if not MIN_SEQLEN <= args.seqlen <= MAX_SEQLEN:
        raise ValueError(f"--seqlen must be between {MIN_SEQLEN} and {MAX_SEQLEN}")
    if args.max_upload_mb <= 0 or args.url_timeout <= 0:
        raise ValueError("--max-upload-mb and --url-timeout must be positive")
    # The CLI's own defaults for every inference flag, then this script's model flags on top. The UI owns
    # the threshold (calibration.csv or the slider), implications and exclusions.
    load_args = inference.build_parser().parse_args([])
    for name in MODEL_FLAGS:
        setattr(load_args, name, getattr(args, name))
    load_args.threshold = startup_threshold()
    tagger, settings = inference.load(load_args)
    if tagger.family != "jtp3":
        raise ValueError(f"app.py serves JTP-3 Hydra models; '{load_args.model}' is a {tagger.family} tagger "
                         "(tag with inference.py)")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=MAX_PIXELS,
                    url_timeout=args.url_timeout, batch_max_files=BATCH_MAX_FILES,
                    batch_max_bytes=BATCH_MAX_MB * 2**20)
    return WebTagger(tagger, settings, limits)


def main(args: argparse.Namespace) -> int:
    from hydra.checkpoint import CheckpointError
    from hydra.common import log
    from hydra.hub import DownloadError
    from hydra.tags import DataFileError
    from hydra.webui import launch

    try:
        web = make_web(args)
    except (CheckpointError, DataFileError, DownloadError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {args.host}: anyone who can reach this address can use the tagger.")
    try:
        launch(web, args.host, args.port, args.share)
    finally:
        web.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
