"""The JTP-3 Hydra family: `models/jtp-3-hydra.safetensors` (`naflexvit_so400m_patch16_siglip+rr_hydra`).

Declarations: the size control is the NaFlex sequence length (`-S`, 64..2048, default 1024); thresholds come
from a calibration CSV (`calibration.csv` in the current folder when present, written by calibrate.py from
RedRocket's validation data), else the `-t` threshold; categories and implications come from the tags CSV
`data/jtp-3-hydra-tags.csv` (fetched on first use); default implications `inherit`; v1 extensions from
`extensions/jtp-3-hydra`; CAM over any number of the last blocks. Captions rename `vulva` to `pussy` unless
`-O`, as the original does for diffusion-model compatibility. The network is `hydra/models/jtp3_net.py`
(backbone.py + head.py); the preprocessing is Pillow's (`hydra/images/naflex.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hydra.hub import REPO_ID
from hydra.images.naflex import JTP3Preprocess
from hydra.models import resources
from hydra.models.checkpoint import ARCHITECTURE, KEY_ARCHITECTURE
from hydra.models.family import CALIBRATION_CSV, SEQLEN, CaptionStyle, DefaultFile, Family, ModelOptions

if TYPE_CHECKING:
    import torch

    from hydra.models.jtp3_net import JTP3Model


class JTP3Family(Family):
    name = "jtp3"
    title = "JTP-3 Hydra"
    files = f"modelspec.architecture {ARCHITECTURE!r}"
    size = SEQLEN
    calibration = CALIBRATION_CSV
    default_implications = "inherit"
    caption = CaptionStyle(renames=(("vulva", "pussy"),), escape="()", order="probability")
    extension_dir = resources.DEFAULT_EXTENSIONS
    metadata_file = DefaultFile(resources.DEFAULT_METADATA, REPO_ID, resources.DEFAULT_METADATA,
                                resources.METADATA_SHA256, resources.METADATA_SIZE, "tag metadata")
    model_file = DefaultFile(resources.DEFAULT_MODEL, REPO_ID, resources.DEFAULT_MODEL, (resources.MODEL_SHA256,),
                             (resources.MODEL_SIZE,), "JTP-3 model")
    model_names = ("jtp-3", "jtp3", "jtp-3-hydra")

    def recognises_metadata(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get(KEY_ARCHITECTURE) == ARCHITECTURE

    def recognises_keys(self, keys: Sequence[str]) -> bool:
        return "attn_pool.out_proj.weight" in keys

    def load(self, path: str, options: ModelOptions, device: torch.device, dtype: torch.dtype) -> JTP3Model:
        from hydra.models.jtp3_net import load_jtp3

        return load_jtp3(path, device, dtype, self.read_extensions(options.extensions))

    def read_extensions(self, paths: Sequence[str]) -> list[Any]:
        from hydra.models.extensions import load_extensions

        return load_extensions(paths)

    def preprocessor(self, model: Any, size: int, options: ModelOptions) -> JTP3Preprocess:
        return JTP3Preprocess(size, options.max_pixels)

    # -- training extensions: upstream's trainer and v1 builder (hydra/train/heads.py, export.py) -----

    trains = True

    def train_head(self, model: JTP3Model, init_index: int | None, generator: torch.Generator) -> Any:
        """A one-tag HydraPool: new q (H, 1, E) and out_proj.weight (1, A, 2), RMSNorm on q in training."""
        from hydra.train.heads import make_train_head

        return make_train_head(model.head, init_index, generator)

    def extension_tensors(self, checkpoint: Mapping[str, Any], say: Any = None) -> tuple[dict[str, Any], Any]:
        """`q` (H, 1, E) as trained (the v1 writer RMS-normalises it) and `out_proj.weight` (1, A, 2)."""
        from hydra.common import log
        from hydra.train.heads import extension_tensors

        say = say or log
        q, out_proj, validation = extension_tensors(dict(checkpoint), say)
        say(f"Normalize: attn_pool.q (RMSNorm: each head's query gets L2 norm sqrt({q.shape[-1]}), as the base "
            "model stores q)")
        return {"q": q, "out_proj.weight": out_proj}, validation

    def extension_metadata(self, checkpoint: Mapping[str, Any], *, tag: str, category: str,
                           implies: Sequence[str] = (), implied_by: Sequence[str] = (), title: str | None = None,
                           author: str | None = None, license: str = "MIT", language: str = "en/US",
                           ) -> dict[str, str]:
        """Upstream's v1 metadata (no `classifier.model`: v1 files name the architecture only)."""
        from hydra.train.export import v1_metadata

        if implied_by:
            raise ValueError(f"{self.title} (v1) extensions cannot say which tags imply theirs "
                             f"(given: {' '.join(implied_by)}); only Hydra 3.5 (v2) extensions can")
        return v1_metadata(tag, category, implies, title=title or f"{self.title} Extension: {tag}", author=author,
                           license=license, language=language)

    def write_extension(self, path: str, tensors: Mapping[str, Any], metadata: Mapping[str, str],
                        validation: Any) -> None:
        from hydra.models.extensions import save_extension

        save_extension(path, tensors["q"], tensors["out_proj.weight"], dict(metadata), validation)


JTP3 = JTP3Family()
