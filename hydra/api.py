"""`hydra.load`: a model with inference.py's tag rules, so a script gets the same tags and captions as the CLI.

    import hydra
    tagger = hydra.load("models/jtp-3-hydra.safetensors", calibration="calibration.csv", exclude=["meta"])
    tagger.caption("photo.png")      # the text inference.py writes to photo.txt
    tagger.tags("photo.png")         # [(tag, p), ...] the tags that pass, most probable first

Nothing here decides a rule: the options become the command line `hydra.cli.load_run` reads (the loading
policy of inference.py, app.py and calibrate.py), and captions come from the run's `CaptionFormat`, as
inference.py's caption writer does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence

from hydra.tagger import ImageSource, Tagger
from hydra.tags.rules import TagRules, TagSettings, ranked


class Captioner:
    """A loaded model and the tag rules of a run: `tags()` and `caption()` per image.

    Attributes:
        tagger: the `Tagger` (its `probabilities` / `predict` give raw model output).
        settings: the run's `TagSettings` (threshold or calibration, implications, exclusions, spelling).
    """

    def __init__(self, tagger: Tagger, settings: TagSettings, prefix: str = "", shuffle: bool = False):
        self.tagger, self.settings, self.prefix, self.shuffle = tagger, settings, prefix, shuffle
        self.rules: TagRules = settings.rules()

    def tag_probabilities(self, image: ImageSource) -> dict[str, float]:
        """{tag: p} of the tags that pass the rules, model order (tags spelled as the model's labels after the
        family's renames, e.g. `pussy` for JTP-3's `vulva` tags unless `original_tags`)."""
        probs = self.tagger.predict_samples([self.tagger.preprocess(image)], self.rules.active())[0]
        return self.rules.classify(probs)

    def tags(self, image: ImageSource) -> list[tuple[str, float]]:
        """(tag, p) of the tags that pass, most probable first."""
        return ranked(self.tag_probabilities(image))

    def caption(self, image: ImageSource) -> str:
        """The caption inference.py writes for this image (same spelling, order, prefix)."""
        return self.settings.captions.caption(self.tag_probabilities(image), self.prefix, self.shuffle)


def load(model: str | os.PathLike | None = None, *, threshold: float | None = None,
         calibration: str | os.PathLike | None = None, metric: str | None = None, topk: int | None = None,
         implications: str | None = None, exclude: Sequence[str] = (), exclude_tags: Iterable[str] = (),
         exclusive_groups: Sequence[Sequence[str]] = (), aliases: Mapping[str, str] | None = None,
         category_prefixes: Mapping[str, str] | None = None, prefix: str = "", shuffle: bool = False,
         underscores: bool = False, prompt: bool = False, original_tags: bool = False,
         metadata: str | os.PathLike | None = None, extensions: Sequence[str | os.PathLike] = (),
         default_extensions: bool = True, vocab: str | os.PathLike | None = None, size: int | None = None,
         device: str | None = None, dtype: str | None = None) -> Captioner:
    """Load a model with inference.py's tag rules; each option is the inference.py flag of the same name.

    Args:
        model: model file or short name (`jtp-3`, `hydra-3.5`); default the JTP-3 model (`-M`).
        threshold: one cutoff for every tag, a probability 0..1 (`-t T` is threshold=(T + 1) / 2).
        calibration: a calibration CSV (`-t PATH`). Without threshold or calibration the CLI's default
            applies: `calibration.csv` if present, else `-t 0.5` (JTP-3); the embedded calibration
            (Hydra 3.5); the top 30 (the DINOv3 tagger).
        metric, topk, implications: `--metric`, `--topk`, `-i`.
        exclude: categories (`-x`); exclude_tags: tags (`--exclude-tag`); exclusive_groups: `-g` groups.
        aliases: {old: new} (`-a`); category_prefixes: {category: prefix} (`-B`).
        prefix, shuffle, underscores, prompt, original_tags: `-p`, `-s`, `-u`, `-P`, `-O`.
        metadata: tag metadata CSV (`-m`; '' = none); extensions: `-e`; default_extensions=False is `-E`.
        vocab, size: the DINOv3 vocabulary (`--vocab`) and the family's size (`-S` / `--max-size`).
        device, dtype: `-d` (default: cuda if available, else cpu) and `--dtype`.

    Raises:
        ValueError: an option out of range or not valid for this model (the CLI's message).
        OSError: a file that cannot be read.
    """
    from hydra import cli

    if threshold is not None and calibration is not None:
        raise ValueError("give either threshold (a probability) or calibration (a CSV path), not both")
    if threshold is not None and not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a probability from 0 to 1, got {threshold!r}")
    t = os.fspath(calibration) if calibration is not None else None
    if threshold is not None:
        t = 2.0 * float(threshold) - 1.0  # the symmetric -t scale, exact for p >= 0.25 and within 1 ulp below
    args = argparse.Namespace(
        model=None if model is None else os.fspath(model), threshold=t, metric=metric, topk=topk,
        implications=implications, exclude=list(exclude), exclude_tag=list(exclude_tags),
        exclusive_group=[list(g) for g in exclusive_groups], alias=[list(kv) for kv in (aliases or {}).items()],
        category_prefix=[list(kv) for kv in (category_prefixes or {}).items()], underscores=underscores,
        prompt=prompt, original_tags=original_tags, metadata=None if metadata is None else os.fspath(metadata),
        extension=[os.fspath(e) for e in extensions], no_default_extensions=not default_extensions,
        vocab=None if vocab is None else os.fspath(vocab), device=device, dtype=dtype or "auto")
    if size is not None:  # each family reads the one its size control names (-S or --max-size)
        for control in cli.SIZE_CONTROLS:
            setattr(args, control.name, size)
    tagger, settings = cli.load_run(args)
    return Captioner(tagger, settings, prefix, shuffle)
