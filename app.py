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
# inference.py flags this script shares (same names, same meaning), handed to `inference.load` per model family.
SHARED_FLAGS = ("device", "dtype")
JTP3_FLAGS = ("metadata", "extension", "no_default_extensions", "original_tags", "seqlen")
DINOV3_FLAGS = ("max_size", "exif", "white_background")


def build_parser() -> argparse.ArgumentParser:
    from hydra.images.naflex import DEFAULT_MAX_SIZE, DEFAULT_SEQLEN, MAX_SEQLEN, MIN_SEQLEN
    from hydra.models.resources import DEFAULT_METADATA, DEFAULT_MODEL
    from hydra.web.service import MAX_SIZE_MAX, MAX_SIZE_MIN

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
    g = p.add_argument_group("models")
    g.add_argument("-M", "--model", metavar="PATH", action="append",
                   help="Path to model file: JTP-3 Hydra, or a DINOv3 tagger checkpoint (recognised from the file). "
                        "Repeat to serve several: the UI gets a model selector and the API a 'model' field, both "
                        f"naming models by file name; the first is the default. (Default: {DEFAULT_MODEL})")
    g.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                   help="Torch device. (Default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    g = p.add_argument_group("JTP-3 models")
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
    g = p.add_argument_group("DINOv3 tagger models")
    g.add_argument("--vocab", metavar="PATH", action="append", default=[],
                   help="Vocabulary JSON of a DINOv3 model; repeatable, matched in order to the DINOv3 models among "
                        "the -M files. (Default: tagger_vocab_with_categories.json or tagger_vocab.json next to the "
                        "checkpoint; categories are shown and can be excluded only with the former)")
    g.add_argument("--max-size", metavar="PX", type=int, default=DEFAULT_MAX_SIZE,
                   help=f"Initial cap on the long image edge, never upscaled. (Default: {DEFAULT_MAX_SIZE}; "
                        f"{MAX_SIZE_MIN} to {MAX_SIZE_MAX})")
    g.add_argument("--exif", action="store_true",
                   help="Apply EXIF orientation (the published script does not; off for parity).")
    g.add_argument("--white-background", action="store_true",
                   help="Composite transparency on white (the published script drops alpha; off for parity).")
    return p


def startup_threshold() -> str:
    """calibration.csv (current folder) when it is there and valid, else the slider's default; a broken
    calibration.csv is reported and skipped rather than stopping the server."""
    from hydra.common import log
    from hydra.models.resources import DEFAULT_CALIBRATION
    from hydra.tags.rules import DataFileError, load_calibration

    if not os.path.isfile(DEFAULT_CALIBRATION):
        return DEFAULT_THRESHOLD_ARG
    try:
        load_calibration(DEFAULT_CALIBRATION)
    except (DataFileError, OSError, UnicodeDecodeError) as e:
        log(f"warning: ignoring {DEFAULT_CALIBRATION}: {e}")
        return DEFAULT_THRESHOLD_ARG
    return DEFAULT_CALIBRATION


def make_web(args: argparse.Namespace):
    """The models, their tag settings and the limits for the server, each model loaded exactly as
    `inference.py` loads it, one after the other.

    Raises:
        CheckpointError, DataFileError, DownloadError, OSError, ValueError: a bad flag or file.
    """
    import inference
    from hydra.common import log
    from hydra.images.naflex import MAX_SEQLEN, MIN_SEQLEN
    from hydra.models.resources import resolve_model
    from hydra.tagger import JTP3, detect_family, find_vocab
    from hydra.web.service import FAMILY_TITLES, MAX_SIZE_MAX, MAX_SIZE_MIN, Limits, WebModel, WebService

    if not MIN_SEQLEN <= args.seqlen <= MAX_SEQLEN:
        raise ValueError(f"--seqlen must be between {MIN_SEQLEN} and {MAX_SEQLEN}")
    if not MAX_SIZE_MIN <= args.max_size <= MAX_SIZE_MAX:
        raise ValueError(f"--max-size must be between {MAX_SIZE_MIN} and {MAX_SIZE_MAX}")
    if args.max_upload_mb <= 0 or args.url_timeout <= 0:
        raise ValueError("--max-upload-mb and --url-timeout must be positive")
    paths = [resolve_model(p) for p in args.model or [None]]
    families = [detect_family(p) for p in paths]
    _check_models(args, paths, families)
    threshold = startup_threshold() if JTP3 in families else None
    vocabs = iter(args.vocab)
    models = []
    for i, (path, family, name) in enumerate(zip(paths, families, model_names(paths)), 1):
        log(f"Model {i} of {len(paths)}: {name} ({FAMILY_TITLES[family]})")
        # The CLI's own defaults for every inference flag, then this script's flags for the model's family on
        # top. The UI owns the selection (calibration.csv, the slider or top k), implications and exclusions.
        load_args = inference.build_parser().parse_args([])
        for flag in SHARED_FLAGS + (JTP3_FLAGS if family == JTP3 else DINOV3_FLAGS):
            setattr(load_args, flag, getattr(args, flag))
        load_args.model = path
        if family == JTP3:
            load_args.threshold = threshold
        else:
            load_args.vocab = next(vocabs, None) or find_vocab(path)
        tagger, settings = inference.load(load_args)
        models.append(WebModel(name, path, tagger, settings, load_args.vocab))
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=MAX_PIXELS,
                    url_timeout=args.url_timeout, batch_max_files=BATCH_MAX_FILES,
                    batch_max_bytes=BATCH_MAX_MB * 2**20)
    return WebService(models, limits)


def _check_models(args: argparse.Namespace, paths: list[str], families: list[str]) -> None:
    """Flags that cannot apply to the configured models: say so before anything is loaded."""
    from hydra.tagger import DINOV3, JTP3

    if len({os.path.realpath(p) for p in paths}) < len(paths):
        raise ValueError("the same model file is given twice with -M")
    dinos = families.count(DINOV3)
    if len(args.vocab) > dinos:
        raise ValueError(f"{len(args.vocab)} --vocab for {dinos} DINOv3 tagger checkpoint(s) among the -M files "
                         "(each --vocab goes to the next DINOv3 model, in order)")
    if JTP3 not in families and (args.metadata is not None or args.extension):
        raise ValueError("-m and -e are for JTP-3 models, and none is configured (a DINOv3 model takes its "
                         "categories from its vocabulary; for implications use inference.py -m)")


def model_names(paths: list[str]) -> list[str]:
    """What the selector and the API call each model: its file name, or its path when file names repeat."""
    names = [os.path.basename(p) for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def main(args: argparse.Namespace) -> int:
    from hydra.common import log
    from hydra.hub import DownloadError
    from hydra.models.checkpoint import CheckpointError
    from hydra.tags.rules import DataFileError
    from hydra.web.page import launch

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
