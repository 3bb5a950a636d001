"""Image tagging with RedRocket's JTP-3 Hydra and Hydra 3.5 and the DINOv3 tagger: `load_tagger` / `Tagger` to tag
images, `load` for a model with inference.py's tag rules (`.caption(image)`); the rest serves the scripts.

Attributes are imported lazily, so that loader worker processes (which import `hydra.images.naflex`) do not pay
for torch and timm at start-up.
"""

from typing import TYPE_CHECKING

__all__ = ["Tagger", "load_tagger", "load", "Captioner"]

if TYPE_CHECKING:
    from hydra.api import Captioner, load
    from hydra.tagger import Tagger, load_tagger


def __getattr__(name: str):
    if name in ("load", "Captioner"):  # the model with inference.py's tag rules (hydra/api.py)
        from hydra import api

        return getattr(api, name)
    if name in __all__:
        from hydra import tagger

        return getattr(tagger, name)
    raise AttributeError(f"module 'hydra' has no attribute {name!r}")
