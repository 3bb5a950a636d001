"""The metadata build_extension.py writes into extension files: JTP-3's v1 format and Hydra 3.5's v2 format.

v1 is upstream's builder's metadata, key for key and in its order. Upstream published no v2 builder, so the
v2 metadata is what upstream's v2 loader reads (`classifier.model` = the base model's `modelspec.title`,
`classifier.label`, `.category`, `.implies`, `.impliedby`) plus the same SAI model-spec fields as v1.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from hydra.models.checkpoint import ARCHITECTURE, HYDRA35_ARCHITECTURE, KEY_ARCHITECTURE
from hydra.models.extensions import IMPLEMENTATION, KEY_CATEGORY, KEY_IMPLEMENTATION, KEY_IMPLIES, KEY_LABEL
from hydra.models.extensions_v2 import IMPLEMENTATION as IMPLEMENTATION_V2
from hydra.models.extensions_v2 import KEY_IMPLIEDBY, KEY_MODEL

DESCRIPTION = ("This is an extension for the RedRocket JTP-3 Hydra image classifier. You can find usage "
               "instructions at https://huggingface.co/RedRocket/JTP-3.")
DESCRIPTION_V2 = ("This is an extension for the RedRocket Hydra 3.5 image classifier. You can find usage "
                  "instructions at https://huggingface.co/RedRocket/Hydra.")


def _spec(architecture: str, implementation: str, description: str) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.0",
        KEY_ARCHITECTURE: architecture,
        KEY_IMPLEMENTATION: implementation,
        "modelspec.description": description,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.tags": "Image Classification",
    }


def _authorship(meta: dict[str, str], title: str, author: str | None, license: str, language: str) -> None:
    meta["modelspec.title"] = title
    if author:
        meta["modelspec.author"] = author
    meta["modelspec.license"] = license
    meta["modelspec.language"] = language


def v1_metadata(tag: str, category: str, implies: Sequence[str], *, title: str, author: str | None = None,
                license: str = "MIT", language: str = "en/US") -> dict[str, str]:
    """A JTP-3 (v1) extension's metadata (docs/formats.md, extensions), in the order upstream prints it."""
    meta = _spec(ARCHITECTURE, IMPLEMENTATION, DESCRIPTION)
    meta[KEY_LABEL] = tag
    meta[KEY_CATEGORY] = category
    if implies:
        meta[KEY_IMPLIES] = " ".join(sorted(set(implies)))
    _authorship(meta, title, author, license, language)
    return meta


def v2_metadata(model_title: str, tag: str, category: str, implies: Sequence[str] = (),
                implied_by: Sequence[str] = (), *, title: str, author: str | None = None, license: str = "MIT",
                language: str = "en/US") -> dict[str, str]:
    """A Hydra 3.5 (v2) extension's metadata: v1's layout with `classifier.model` (the base model's title,
    which upstream's loader matches strictly) and `classifier.label.impliedby`; lists sorted, as v1's."""
    meta = _spec(HYDRA35_ARCHITECTURE, IMPLEMENTATION_V2, DESCRIPTION_V2)
    meta[KEY_MODEL] = model_title
    meta[KEY_LABEL] = tag
    meta[KEY_CATEGORY] = category
    if implies:
        meta[KEY_IMPLIES] = " ".join(sorted(set(implies)))
    if implied_by:
        meta[KEY_IMPLIEDBY] = " ".join(sorted(set(implied_by)))
    _authorship(meta, title, author, license, language)
    return meta
