"""`Tagger`: load a model once, then tag images. The CLI, the web UI, calibration and the Ray workers all use it.

Every model family (`hydra.models`) sits behind this one API; the family is recognised from the file. A
Tagger knows nothing about any particular family: it asks `tagger.family` for its declarations (size
control, calibration source, caption style...) and runs `tagger.model` (the family's `TagModel`).

Two levels, as in SAM's predictor:
- friendly: `probabilities(image) -> {tag: p}` and `predict(image, topk=..., threshold=...) -> [(tag, p)]`
  (images are paths, http(s) URLs, file bytes or PIL images);
- batch: `preprocess(image) -> sample` (picklable and torch-free, run by loader workers) and
  `predict_samples(samples) -> (B, T) float32 numpy probabilities` for bulk inference and calibration.

Labels are the model's own spelling (before any caption rewriting).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from hydra.common import choose_dtype, default_device, log
from hydra.images.decode import DEFAULT_MAX_PIXELS
from hydra.models import detect
from hydra.models.family import DEFAULT_TOPK, Family, ModelOptions, TagModel
from hydra.models.resources import DEFAULT_MODEL

ImageSource = str | os.PathLike | bytes | Image.Image


class Tagger:
    """A loaded tagging model with its preprocessing.

    Args:
        checkpoint_path: model file; the family is recognised from it (default: the JTP-3 model).
        vocab_path: the DINOv3 tagger's vocabulary JSON (default: `tagger_vocab*.json` beside the checkpoint).
        device: torch device; default cuda when available, else cpu.
        dtype: "bf16", "fp32", or None / "auto" (see `hydra.common.choose_dtype`).
        size: the family's image size setting (`family.size`: JTP-3's sequence length, the DINOv3 tagger's
            long-edge cap); None = its default. `seqlen` and `max_size` are accepted as its names.
        extensions: extension files to merge (families with extensions).
        max_pixels: refuse images above this many pixels before decoding (default 256 Mpx; None: no limit).
        exif, white_background: DINOv3 preprocessing fixes, off by default for parity with its script.
        compile: run the network's forward under `torch.compile` (upstream Hydra 3.5's `-c`), for every family;
            where compiling fails (no C++ compiler, an unsupported device...) it warns once and runs eagerly.
    """

    def __init__(self, checkpoint_path: str | os.PathLike = DEFAULT_MODEL, vocab_path: str | os.PathLike | None = None,
                 *, device: str | None = None, dtype: str | None = None, size: int | None = None,
                 seqlen: int | None = None, max_size: int | None = None, extensions: Sequence[str] = (),
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, exif: bool = False, white_background: bool = False,
                 compile: bool = False):
        self.path = os.fspath(checkpoint_path)
        self.family: Family = detect(self.path)
        self.options = ModelOptions(extensions=tuple(os.fspath(e) for e in extensions),
                                    vocab=None if vocab_path is None else os.fspath(vocab_path), exif=exif,
                                    white_background=white_background, max_pixels=max_pixels)
        self.device = torch.device(device or default_device())
        self.dtype, self.dtype_reason = choose_dtype(self.device, dtype)
        self._requested_dtype = dtype
        self._warned_empty = False  # predict_samples' "no tag selectable" warning, given once
        self.model: TagModel = self.family.load(self.path, self.options, self.device, self.dtype)
        self.labels: list[str] = self.model.labels
        self.compile = compile
        if compile:
            compile_model(self.model)
        given = {self.family.size.name: None, "size": size, "seqlen": seqlen, "max_size": max_size}
        self.size = next((v for v in given.values() if v is not None), self.family.size.default)

    # -- preprocessing (changing the size rebuilds the picklable `preprocess`) --------------------------

    @property
    def size(self) -> int:
        """The family's size setting (`family.size.name`: sequence length or long-edge pixels)."""
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = self.family.size.check(value)
        self.preprocess: Any = self.preprocessor(self._size)

    def preprocessor(self, size: int) -> Any:
        """A picklable image -> sample callable at another size (the web UI's per-request size)."""
        return self.family.preprocessor(self.model, self.family.size.check(size), self.options)

    @property
    def spec(self) -> TaggerSpec:
        """What reloads this tagger (elsewhere, e.g. in a Ray actor)."""
        return TaggerSpec(self.path, self.options, self.size, str(self.device), self._requested_dtype, self.compile)

    def sample_tokens(self, sample: dict[str, np.ndarray]) -> int:
        """The tokens the model runs for one sample (batching groups similar lengths)."""
        return self.preprocess.tokens(sample)

    # -- batch level ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict_samples(self, samples: Sequence[dict[str, np.ndarray]], tags: np.ndarray | None = None,
                        pad_to: int | None = None) -> np.ndarray:
        """Probabilities (B, T) float32 for preprocessed samples: sigmoid of the float32 logits.

        Args:
            tags: optional (T,) bool mask of the tags worth computing; the others come back as NaN. A mask
                selecting nothing runs no model at all (all NaN) and warns once on stderr.
            pad_to: NaFlex families: pad every image to this many tokens (the original JTP-3's behaviour).
        """
        index = None
        if tags is not None and not tags.any():  # thresholds / exclusions that no tag can pass: nothing to run
            if not self._warned_empty:
                log("warning: the thresholds and exclusions leave none of the model's tags selectable, so every "
                    "image gets no tags")
                self._warned_empty = True
            return np.full((len(samples), len(self.labels)), np.nan, dtype=np.float32)
        if tags is not None and not tags.all():
            index = torch.from_numpy(np.flatnonzero(tags)).to(self.device)
        probs = self.model.sample_logits(samples, index, pad_to).float().sigmoid().cpu().numpy()
        if index is None:
            return probs
        out = np.full((len(samples), len(self.labels)), np.nan, dtype=np.float32)
        out[:, tags] = probs
        return out

    # -- friendly level ---------------------------------------------------------------------------------

    def probabilities(self, image: ImageSource) -> dict[str, float]:
        """{tag: probability} for one image (a path, URL, file bytes or a PIL image), model order."""
        probs = self.predict_samples([self.preprocess(image)])[0]
        return dict(zip(self.labels, probs.tolist()))

    def predict(self, image: ImageSource, topk: int | None = None,
                threshold: float | None = None) -> list[tuple[str, float]]:
        """Tags sorted by probability: the `topk` best, or all with p >= `threshold` (default: top 30).

        As in the DINOv3 card's API, `topk` wins when both are given; `threshold` is a probability (0..1).

        Raises:
            ValueError: `threshold` outside 0..1 (inference.py's `-t T` is p = (T + 1) / 2) or `topk` below 1.
        """
        if threshold is not None and not (isinstance(threshold, int | float | np.floating)
                                          and 0.0 <= threshold <= 1.0):  # NaN fails too
            raise ValueError(f"threshold must be a probability from 0 to 1, got {threshold!r} "
                             "(inference.py's -t T on the -1..1 scale is p = (T + 1) / 2)")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int | np.integer) or topk < 1):
            raise ValueError(f"topk must be a whole number of at least 1, got {topk!r}")
        probs = self.predict_samples([self.preprocess(image)])[0]
        order = np.argsort(-probs, kind="stable")
        if topk is None and threshold is None:
            topk = DEFAULT_TOPK
        order = order[:topk] if topk is not None else order[probs[order] >= threshold]
        return [(self.labels[i], float(probs[i])) for i in order]

    def describe(self) -> str:
        return f"{len(self.labels)} tags on {self.device} ({self.dtype_reason})"


COMPILE_MODE = "max-autotune-no-cudagraphs"  # upstream Hydra 3.5's -c


def compile_model(model: TagModel) -> bool:
    """Run `model.net.forward_features` (the backbone, every family's forward) under `torch.compile`.

    Shapes are compiled dynamic: NaFlex batches change length with every image, and DINOv3 images change size,
    so one graph serves them all instead of a recompile per size. Returns False, after one line on stderr,
    when the model has no such forward.
    """
    net = getattr(model, "net", None)
    eager = getattr(net, "forward_features", None)
    if eager is None:
        log(f"warning: -c/--compile is not supported for {type(model).__name__}; running without it")
        return False
    net.forward_features = _CompiledForward(eager)
    return True


class _CompiledForward:
    """A forward under torch.compile that falls back to eager, with one warning, when compiling fails.

    torch.compile can fail when it is set up or, lazily, at a call that (re)compiles (no C++ compiler, an
    unsupported device or op). Either way the call is re-run eagerly and every later call stays eager. Once a
    compiled call has worked, only compiler errors fall back; any other error (bad input, out of memory) is the
    caller's and propagates.
    """

    def __init__(self, eager: Any):
        self.eager = eager
        self.worked = False
        try:
            self.compiled = torch.compile(eager, dynamic=True, mode=COMPILE_MODE)
        except Exception as e:  # noqa: BLE001 -- any set-up failure means: run eagerly
            self.compiled = None
            self._give_up(e)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None:
            try:
                out = self.compiled(*args, **kwargs)
                self.worked = True
                return out
            except Exception as e:  # noqa: BLE001
                if self.worked and not _compiler_error(e):
                    raise
                self.compiled = None
                self._give_up(e)
        return self.eager(*args, **kwargs)

    @staticmethod
    def _give_up(e: BaseException) -> None:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        log(f"warning: -c/--compile: torch.compile failed ({type(e).__name__}: {reason}); running without it")


def _compiler_error(e: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return isinstance(e, TorchDynamoException | InductorError)


def load_tagger(checkpoint_path: str | os.PathLike = DEFAULT_MODEL, device: str | None = None,
                **kwargs: Any) -> Tagger:
    """Load a tagger once; see `Tagger` for the keyword arguments."""
    tagger = Tagger(checkpoint_path, device=device, **kwargs)
    log(f"Loaded '{checkpoint_path}': {tagger.describe()}")
    return tagger


@dataclass(frozen=True)
class TaggerSpec:
    """Everything that decides a loaded Tagger, picklable: Ray actors and caches receive this, not a function.

    `load()` gives a Tagger equal to the one it was taken from (`Tagger.spec`), optionally on another device.
    """

    path: str
    options: ModelOptions
    size: int
    device: str | None = None
    dtype: str | None = None
    compile: bool = False

    def load(self, device: str | None = None) -> Tagger:
        o = self.options
        return Tagger(self.path, o.vocab, device=device or self.device, dtype=self.dtype, size=self.size,
                      extensions=o.extensions, max_pixels=o.max_pixels, exif=o.exif,
                      white_background=o.white_background, compile=self.compile)
