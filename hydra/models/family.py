"""What a model family is: how its files are recognised and loaded, how images are prepared for it, and what
it offers the tools. Callers ask a family (or the `Tagger` that holds one) instead of comparing names.

A family is one object (a `Family` subclass instance) registered in `hydra.models`. It declares:
- its size control (`SizeControl`: the NaFlex sequence length, or the long-edge cap in pixels) with its range
  and default, which the CLI flag, the web slider, the REPL command and the HTTP API all use;
- where thresholds come from by default (`calibration`): an external calibration CSV, counts embedded in the
  model file, or none (then the default selection is the `default_topk` best tags);
- its implication modes and default mode, and the caption spelling (`CaptionStyle`);
- what else it can do: extensions (and their default folder), a default tag-metadata file, the CAM.

It does the work behind those declarations: recognises a file (`recognises_metadata`, `recognises_keys`), `load`s
it into a `TagModel` (the runtime object a `Tagger` wraps), and builds the picklable, torch-free `preprocessor`
that loader workers run.

This module imports neither torch nor a family's network code: loader workers and the registry import it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hydra.images.dinov3 import DEFAULT_MAX_SIZE
from hydra.images.naflex import DEFAULT_SEQLEN
from hydra.tags.implications import MODES as JTP3_MODES

DEFAULT_TOPK = 30  # the DINOv3 card's top-k default: the library API, uncalibrated families, the web slider

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hydra.tags.rules import TagMetadata

# Where a family's default thresholds come from.
CALIBRATION_CSV = "csv"            # a calibration CSV (calibration.csv in the current folder, made by calibrate.py)
CALIBRATION_EMBEDDED = "embedded"  # validation counts inside the model file, turned into thresholds by a metric
CALIBRATION_NONE = "none"          # uncalibrated probabilities: the default selection is the top k


@dataclass(frozen=True)
class SizeControl:
    """The one image-size setting of a family: its name everywhere, its range and its default.

    `name` is the keyword of `Tagger`, the attribute of parsed command lines, the REPL command and the HTTP
    API / health field (`seqlen` or `max_size`); `flag` is the command-line flag that sets it.
    """

    name: str      # "seqlen" / "max_size"
    flag: str      # "-S" / "--max-size"
    label: str     # shown in the web UI and in messages
    help: str      # what the number means
    minimum: int
    maximum: int
    default: int

    def check(self, value: int) -> int:
        """`value` as an int within the range, else ValueError naming the setting and the range."""
        n = int(value)
        if not self.minimum <= n <= self.maximum:
            raise ValueError(f"{self.label} must be between {self.minimum} and {self.maximum}, got {n}")
        return n

    def argparse_type(self, text: str) -> int:
        """argparse type for the flag: the same range as everywhere else."""
        try:
            return self.check(int(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be between {self.minimum} and {self.maximum}") from None


# The two size controls of the families we ship. The web UI, the CLI and the REPL share these ranges.
SEQLEN = SizeControl("seqlen", "-S", "Sequence length", "NaFlex patches (16 px) per image", 64, 2048,
                     DEFAULT_SEQLEN)
MAX_SIZE = SizeControl("max_size", "--max-size", "Max size", "long image edge in pixels, never upscaled", 64, 4096,
                       DEFAULT_MAX_SIZE)


@dataclass(frozen=True)
class CaptionStyle:
    """How a family's tags are spelled and ordered in captions.

    Attributes:
        renames: (old, new) substring renames of label names, applied unless `-O` (JTP-3 renames `vulva` to
            `pussy` for diffusion-model compatibility, consistently in labels, metadata and calibrations).
        escape: characters written backslash-escaped in captions (prompt syntax).
        order: "probability" (most probable first) or "model" (the model's label order).
    """

    renames: tuple[tuple[str, str], ...] = ()
    escape: str = "()"
    order: str = "probability"


@dataclass(frozen=True)
class ModelOptions:
    """The loading options a command line or a caller gives; a family reads the ones it understands.

    Picklable: Ray actors and the calibration cache receive this instead of a loading function.
    """

    extensions: tuple[str, ...] = ()   # extension files (already expanded from folders)
    vocab: str | None = None           # DINOv3: the vocabulary JSON
    exif: bool = False                 # DINOv3: apply EXIF orientation (its published script does not)
    white_background: bool = False     # DINOv3: composite transparency on white
    max_pixels: int | None = None      # refuse larger images before decoding them (None: no limit)


class TagModel(Protocol):
    """What a family's `load` returns and a `Tagger` runs. Labels are in model order and model spelling."""

    labels: list[str]
    path: str
    title: str | None                  # the file's `modelspec.title`, if it has one
    extensions: list[Any]              # loaded extensions (objects with `path`, `label`, `category`)
    tag_metadata: TagMetadata | None   # categories / implications the model file itself carries
    cam_depth: int | None              # blocks available to the CAM, or None when the family has no CAM
    info: Sequence[str]                # lines about the model's own files for the web UI (e.g. a vocabulary)

    def sample_logits(self, samples: Sequence[dict[str, np.ndarray]], tags: torch.Tensor | None = None,
                      pad_to: int | None = None) -> torch.Tensor:
        """Logits (B, T) (or (B, len(tags))) for preprocessed samples."""
        ...


@dataclass(frozen=True)
class DefaultFile:
    """A file the project fetches on first use: where it goes (project-relative), its repo path and checks."""

    path: str
    repo_id: str
    repo_file: str
    sha256: tuple[str, ...]
    size: tuple[int, ...]
    what: str


class Family:
    """One model family. Subclasses set the declarations and implement `recognises`, `load`, `preprocessor`."""

    name: str = ""                         # short id ("jtp3"), in /api/health and caches
    title: str = ""                        # shown to users ("JTP-3 Hydra")
    files: str = ""                        # how its files are recognised, for the "unknown model" error
    size: SizeControl = SEQLEN
    calibration: str = CALIBRATION_NONE
    default_topk: int | None = None        # the default selection when thresholds are not calibrated
    default_implications: str = "off"      # the mode used when the tag data has implications and -i is not given
    implication_modes: tuple[str, ...] = JTP3_MODES  # what -i accepts for this family
    implications_after_thresholds: bool = False  # Hydra 3.5: modes act on the passing tags (JTP-3: on p first)
    caption: CaptionStyle = CaptionStyle()
    options: frozenset[str] = frozenset()  # ModelOptions fields beyond extensions / max_pixels it reads
    extension_dir: str | None = None       # default extensions folder (project-relative); None = no extensions
    metadata_file: DefaultFile | None = None  # default tag-metadata CSV (categories, implications)
    model_file: DefaultFile | None = None  # the published model, fetched on first use by `-M` with a short name
    model_names: tuple[str, ...] = ()      # short `-M` names of `model_file` ("hydra-3.5")
    suffixes: tuple[str, ...] = ()         # file suffixes that only this family uses (recognised without opening)
    csv_header_on_stdout: bool = False     # `-o -` prints the CSV header too (Hydra 3.5's CLI does, JTP-3's not)

    def recognises_metadata(self, metadata: Mapping[str, str]) -> bool:
        """True when the file's safetensors metadata says it is this family's (asked first)."""
        return False

    def recognises_keys(self, keys: Sequence[str]) -> bool:
        """True when the tensor names say it is this family's (asked when no family claims the metadata)."""
        return False

    def load(self, path: str, options: ModelOptions, device: torch.device, dtype: torch.dtype) -> TagModel:
        raise NotImplementedError

    def preprocessor(self, model: TagModel, size: int, options: ModelOptions) -> Any:
        """The picklable, torch-free image -> sample callable at `size`, for this loaded model.

        A preprocessor takes a path, an http(s) URL, file bytes or a PIL image and returns a dict of numpy
        arrays; it has a `tokens(sample)` static method (the sequence length the model runs, for batching).
        """
        raise NotImplementedError

    def read_extensions(self, paths: Sequence[str]) -> list[Any]:
        """This family's extension files, read and checked (objects with `path`, `label`, `category`, `implies`,
        `validation`); families without extensions refuse any."""
        if paths:
            raise ValueError(f"{self.title} models take no extensions (given: {', '.join(paths)})")
        return []

    def validation_curves(self, path: str, extensions: Sequence[Any] = ()) -> dict[str, Any]:
        """Families with `calibration = "embedded"`: tag -> `hydra.calibration.thresholds.Curve` of the counts
        inside the model file (extensions' rows merged in), read without building the network."""
        raise ValueError(f"{self.title} model files carry no validation counts")

    def cache_settings(self, size: int, options: ModelOptions) -> dict[str, Any]:
        """Everything besides the files and the dtype that changes this family's probabilities (cache keys)."""
        return {self.size.name: size}

    def model_files(self, path: str, options: ModelOptions) -> list[str]:
        """The files whose contents decide the model (the checkpoint, plus e.g. a vocabulary)."""
        return [path, *options.extensions]

    def rename(self, original_tags: bool) -> Any:
        """The label-name rewrite of `caption.renames` (identity with `-O` or when there are none)."""
        renames = () if original_tags else self.caption.renames
        return _Renamer(renames)

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.title}>"

    # -- training extensions (train_extension.py, build_extension.py) ----------------------------------
    # A family that trains turns one new tag's parameters, trained on its frozen model, into an extension
    # file its own `read_extensions` loads. The torch code lives in hydra/train/ (heads.py, export.py).

    trains: bool = False                   # train_extension.py can train a new tag for this family

    def require_training(self) -> None:
        """Raise the one-line refusal (ValueError) unless this family trains."""
        if not self.trains:
            from hydra.models import families

            able = ", ".join(f.title for f in families() if f.trains)
            raise ValueError(f"{self.title} models cannot be trained (extension training supports: {able})")

    def train_head(self, model: TagModel, init_index: int | None, generator: torch.Generator) -> torch.nn.Module:
        """A trainable one-tag head on `model`'s frozen weights (hydra/train/heads.py has the interface).

        Its forward maps cached backbone features x (B, S, D) and patch_valid (B, S) to logits (B, 1); only
        the new tag's own parameters train, named as the model file names them.

        Args:
            init_index: start from this existing tag's parameters (`-i TAG`); None = a fresh init.
            generator: RNG of the fresh init.
        """
        self.require_training()
        raise NotImplementedError

    def validation_thresholds(self, model: TagModel, requested: int) -> int:
        """The number of validation thresholds to train with (`-T`); families whose extension files must
        match the model's own validation table check `requested` against it."""
        self.require_training()
        return requested

    def extension_tensors(self, checkpoint: Mapping[str, Any], say: Any = None,
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The tensors to ship from a training checkpoint (the schedule-free averaged weights) and its
        validation counts (T, 4) or None. `say(line)` reports each step (default: stderr)."""
        self.require_training()
        raise NotImplementedError

    def extension_metadata(self, checkpoint: Mapping[str, Any], *, tag: str, category: str,
                           implies: Sequence[str] = (), implied_by: Sequence[str] = (), title: str | None = None,
                           author: str | None = None, license: str = "MIT", language: str = "en/US",
                           ) -> dict[str, str]:
        """The extension file's metadata. `title` None = "<family title> Extension: <tag>".

        Raises:
            ValueError: a field this family's extension format cannot carry, or a checkpoint that lacks
                what the format needs.
        """
        self.require_training()
        raise NotImplementedError

    def write_extension(self, path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                        validation: torch.Tensor | None) -> None:
        """Write the extension file (tensors from `extension_tensors`, metadata from `extension_metadata`)."""
        self.require_training()
        raise NotImplementedError


@dataclass(frozen=True)
class _Renamer:
    """A picklable `str -> str` applying substring renames in order."""

    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __call__(self, tag: str) -> str:
        for old, new in self.renames:
            tag = tag.replace(old, new)
        return tag


def file_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a safetensors file (header only), or [] when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError):
        return []
