"""The Hydra 3.5 family: RedRocket's successor to JTP-3 (`models/hydra-3.5.safetensors` from RedRocket/Hydra,
`naflexvit_so400m_patch16_siglip+rr_hydra2`).

Declarations: the size control is the NaFlex sequence length (`-S`, 64..2048, default 1024) as for JTP-3;
the file carries its labels with their categories and implications and per-tag validation counts, so it is
calibrated by default (thresholds from the counts with a metric, `f1.0@0.1` as upstream); upstream's ten
implication modes, applied after thresholding (default `inherit`); captions in model order, spaces for
underscores, no escaping and no renames; v2 extensions from `extensions/hydra-3.5`; CAM through the pool's
mid-block. The network is `hydra/models/hydra35_net.py`, the preprocessing libvips' (`hydra/images/vips.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hydra.models import resources
from hydra.models.checkpoint import HYDRA35_ARCHITECTURE as ARCHITECTURE
from hydra.models.checkpoint import KEY_ARCHITECTURE
from hydra.models.family import CALIBRATION_EMBEDDED, SEQLEN, CaptionStyle, DefaultFile, Family, ModelOptions
from hydra.tags import modes

if TYPE_CHECKING:
    import torch

    from hydra.models.hydra35_net import Hydra35Model



class Hydra35Family(Family):
    name = "hydra35"
    title = "Hydra 3.5"
    files = f"modelspec.architecture {ARCHITECTURE!r}"
    size = SEQLEN
    calibration = CALIBRATION_EMBEDDED
    default_implications = modes.DEFAULT_MODE
    implication_modes = modes.MODES
    implications_after_thresholds = True
    caption = CaptionStyle(renames=(), escape="", order="model")
    extension_dir = "extensions/hydra-3.5"
    csv_header_on_stdout = True
    model_file = DefaultFile(resources.HYDRA35_MODEL, "RedRocket/Hydra", resources.HYDRA35_MODEL,
                             (resources.HYDRA35_SHA256,), (resources.HYDRA35_SIZE,), "Hydra 3.5 model")
    model_names = ("hydra-3.5", "hydra3.5", "hydra35")

    def recognises_metadata(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get(KEY_ARCHITECTURE) == ARCHITECTURE

    def load(self, path: str, options: ModelOptions, device: torch.device, dtype: torch.dtype) -> Hydra35Model:
        from hydra.models.hydra35_net import load_hydra35

        return load_hydra35(path, device, dtype, self.read_extensions(options.extensions))

    def read_extensions(self, paths: Sequence[str]) -> list[Any]:
        from hydra.models.extensions_v2 import load_extensions_v2

        return load_extensions_v2(paths)

    def validation_curves(self, path: str, extensions: Sequence[Any] = ()) -> dict[str, Any]:
        import numpy as np
        from safetensors import safe_open

        from hydra.calibration.grid import threshold_grid
        from hydra.calibration.thresholds import Curve
        from hydra.models.checkpoint import KEY_LABELS, read_metadata
        from hydra.models.hydra35_net import parse_labels

        labels, _, _ = parse_labels(path, read_metadata(path).get(KEY_LABELS, ""))
        with safe_open(path, framework="numpy") as f:
            counts = np.asarray(f.get_tensor("validation"), dtype=np.float64)  # (T, n, 4)
        rows = dict(zip(labels, counts))
        for ext in extensions:  # an extension replaces or adds its tag's rows, as when it is merged
            rows[ext.label] = np.asarray(ext.validation, dtype=np.float64).reshape(-1, 4)
        grid = threshold_grid(counts.shape[1]).astype(np.float64)
        return {tag: Curve(grid.copy(), c) for tag, c in rows.items()}

    def preprocessor(self, model: Hydra35Model, size: int, options: ModelOptions) -> Any:
        from hydra.images.vips import Hydra35Preprocess

        return Hydra35Preprocess(size, background=model.background, resize=model.resize,
                                 max_pixels=options.max_pixels)

    # -- training extensions: v2 files (hydra/train/heads.py, export.py) -------------------------------

    trains = True

    def train_head(self, model: Hydra35Model, init_index: int | None, generator: torch.Generator) -> Any:
        """New `attn_pool.q` (H, 1, E) and `head.weight` (1, A) on the frozen pool; q used as stored."""
        from hydra.train.heads import Hydra35TrainHead

        return Hydra35TrainHead(model.pool, model.net.head, init_index, generator)

    def validation_thresholds(self, model: Hydra35Model, requested: int) -> int:
        """The model's own table length: a v2 extension's counts join the model's (T, n, 4) table."""
        n = model.validation.shape[1]
        if requested != n:
            raise ValueError(f"-T {requested}: {self.title} extensions must carry counts at the model's own {n} "
                             f"validation thresholds; use -T {n}")
        return n

    def extension_tensors(self, checkpoint: Mapping[str, Any], say: Any = None) -> tuple[dict[str, Any], Any]:
        """`attn_pool.q` (H, 1, E) and `head.weight` (1, A), stored as trained (q is used as is)."""
        from hydra.common import log
        from hydra.train.heads import hydra35_extension_tensors

        tensors, validation = hydra35_extension_tensors(dict(checkpoint), say or log)
        if validation is None:
            raise ValueError(f"the checkpoint has no validation counts, which {self.title} (v2) extension files "
                             "must carry; train with -v 1 or more")
        return tensors, validation

    def extension_metadata(self, checkpoint: Mapping[str, Any], *, tag: str, category: str,
                           implies: Sequence[str] = (), implied_by: Sequence[str] = (), title: str | None = None,
                           author: str | None = None, license: str = "MIT", language: str = "en/US",
                           ) -> dict[str, str]:
        """v2 metadata; `classifier.model` is the base model's title the checkpoint recorded."""
        from hydra.train.export import v2_metadata
        from hydra.train.loop import KEY_MODEL_TITLE

        model_title = checkpoint.get(KEY_MODEL_TITLE)
        if not model_title:
            raise ValueError(f"the checkpoint does not record its base model's title, which {self.title} "
                             "extensions must name (classifier.model); train it with this toolkit's "
                             "train_extension.py")
        return v2_metadata(model_title, tag, category, implies, implied_by,
                           title=title or f"{self.title} Extension: {tag}", author=author, license=license,
                           language=language)

    def write_extension(self, path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str],
                        validation: Any) -> None:
        from hydra.models.extensions_v2 import save_extension_v2

        save_extension_v2(path, tensors["attn_pool.q"], tensors["head.weight"], metadata, validation)


HYDRA35 = Hydra35Family()
