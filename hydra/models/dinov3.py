"""The DINOv3 ViT-H/16+ booru tagger family: `tagger_proto.safetensors` (or a `.pt` state dict) + its vocabulary.

Declarations: the size control is the long-edge cap (`--max-size`, 64..4096 px, default 1024 as the published
script); its probabilities are uncalibrated, so the default selection is the top 30 tags; categories come
from a `*_with_categories*` vocabulary; implications only from a tags CSV given with `-m`; no extensions, no
CAM; tags keep the vocabulary's spelling. The network lives in `hydra/models/dinov3_net.py`, the
preprocessing in `hydra/images/dinov3.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.images.dinov3 import DinoV3Preprocess
from hydra.models.checkpoint import CheckpointError
from hydra.models.family import DEFAULT_TOPK, MAX_SIZE, CaptionStyle, Family, ModelOptions

if TYPE_CHECKING:
    import numpy as np
    import torch

    from hydra.models.dinov3_net import DinoV3Tagger
    from hydra.models.vocab import Vocab
    from hydra.tags.rules import TagMetadata

VOCAB_NAMES = ("tagger_vocab_with_categories.json", "tagger_vocab.json")  # looked for beside the checkpoint


def find_vocab(checkpoint_path: str | os.PathLike) -> str:
    """The vocabulary beside a checkpoint (the with-categories variant preferred)."""
    folder = Path(checkpoint_path).parent
    for name in VOCAB_NAMES:
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"'{checkpoint_path}' is a DINOv3 tagger checkpoint: give its vocabulary with "
                            f"--vocab (no {' or '.join(VOCAB_NAMES)} next to it)")


@dataclass
class DinoV3Model:
    """A loaded DINOv3 tagger with its vocabulary (the `TagModel` a Tagger runs)."""

    net: DinoV3Tagger
    vocab: Vocab
    path: str
    vocab_path: str
    title = None
    extensions: tuple = ()
    cam_depth = None

    @property
    def labels(self) -> list[str]:
        return self.vocab.tags

    @property
    def info(self) -> list[str]:
        cats = "with categories" if self.vocab.categories is not None else "no categories"
        return [f"Vocabulary: `{self.vocab_path}`, {cats}"]

    @property
    def tag_metadata(self) -> TagMetadata | None:
        """The vocabulary's e621 categories (no implications), when it has them."""
        from hydra.tags.rules import TagMetadata

        if self.vocab.categories is None:
            return None
        return TagMetadata(category=dict(self.vocab.categories), implies={})

    def sample_logits(self, samples: Sequence[dict[str, np.ndarray]], tags: torch.Tensor | None = None,
                      pad_to: int | None = None) -> torch.Tensor:
        """Logits (B, T) float32; whole images, one forward per distinct size (the published script runs them
        one at a time). `pad_to` does not apply (nothing is padded)."""
        import numpy as np
        import torch

        out = [None] * len(samples)
        by_shape: dict[tuple, list[int]] = {}
        for i, s in enumerate(samples):
            by_shape.setdefault(s["pixels"].shape, []).append(i)
        device = self.net.head_device
        for rows in by_shape.values():
            pixels = torch.from_numpy(np.stack([samples[i]["pixels"] for i in rows])).to(device)
            feats = self.net.forward_features(pixels)  # (b, F) float32
            logits = self.net.head_rows(feats, tags)  # (b, T')
            for j, i in enumerate(rows):
                out[i] = logits[j]
        return torch.stack(out)


MAX_LAYERS = 256  # the published backbone has 32; more is a damaged or hostile file


def _check_layers(path: str, state: Mapping[str, Any]) -> None:
    """The `backbone.[model.]layer.N.*` indices must be 0..n-1 with n <= MAX_LAYERS: the loader builds a key
    table per layer up to the largest index, so `layer.99999999` alone would exhaust memory."""
    import re

    layers = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.(?:model\.)?layer\.(\d+)\.", k))}
    if layers and (max(layers) >= MAX_LAYERS or len(layers) != max(layers) + 1):
        raise CheckpointError(f"{path}: backbone layer indices must run 0..n-1 with n <= {MAX_LAYERS}, got "
                              f"{len(layers)} layer(s) up to index {max(layers)}")


class DinoV3Family(Family):
    name = "dinov3"
    title = "DINOv3 tagger"
    files = "tensors under 'backbone.' with a vocabulary JSON, or a .pt/.pth state dict"
    size = MAX_SIZE
    default_topk = DEFAULT_TOPK  # the probabilities are uncalibrated
    caption = CaptionStyle()  # the vocabulary's own spelling: no renames
    options = frozenset({"vocab", "exif", "white_background"})
    suffixes = (".pt", ".pth")  # torch state dicts cannot be inspected without unpickling them

    def recognises_keys(self, keys: Sequence[str]) -> bool:
        return any(k.startswith("backbone.") for k in keys)

    def load(self, path: str, options: ModelOptions, device: torch.device, dtype: torch.dtype) -> DinoV3Model:
        from hydra.models.checkpoint import check_weights, parse_backbone_overrides
        from hydra.models.dinov3_net import build_dinov3, read_checkpoint
        from hydra.models.vocab import load_vocab

        if options.extensions:
            raise CheckpointError("the DINOv3 tagger takes no extensions (extensions are JTP-3 files)")
        vocab_path = options.vocab or find_vocab(path)
        vocab = load_vocab(vocab_path)
        state, metadata = read_checkpoint(path)  # what `load_dinov3` does, with the file checked before building
        check_weights(path, state, floating=True)
        parse_backbone_overrides(path, metadata, allowed=None)
        _check_layers(path, state)
        try:
            net = build_dinov3(state, len(vocab), metadata=metadata, device=device, dtype=dtype, source=path,
                               vocab_source=vocab_path)
        except (IndexError, KeyError, TypeError) as e:  # a tensor of the wrong rank where a shape is read
            raise CheckpointError(f"{path}: not a usable DINOv3 tagger checkpoint ({type(e).__name__}: {e})") from None
        return DinoV3Model(net, vocab, path, vocab_path)

    def preprocessor(self, model: Any, size: int, options: ModelOptions) -> DinoV3Preprocess:
        return DinoV3Preprocess(size, exif=options.exif, white_background=options.white_background,
                                max_pixels=options.max_pixels)

    def cache_settings(self, size: int, options: ModelOptions) -> dict[str, Any]:
        return {"max_size": size, "exif": options.exif, "white_background": options.white_background}

    def model_files(self, path: str, options: ModelOptions) -> list[str]:
        return [path, options.vocab or find_vocab(path)]

    def recognises_metadata(self, metadata: Mapping[str, str]) -> bool:
        return False


DINOV3 = DinoV3Family()
