"""Training one new tag on top of a frozen model: split, loop, checkpoints (workspace and feature cache:
hydra/train/features.py; the trainable heads: hydra/train/heads.py).

What `train_extension.py` and `build_extension.py` run, as RedRocket's trainer does. A new tag is its own slices of the
per-tag parameters (JTP-3: `q` (H, 1, E) and `out_proj.weight` (1, A, 2); Hydra 3.5: `attn_pool.q`
(H, 1, E) and `head.weight` (1, A)); everything else (the backbone and the pool's shared weights) is
frozen. Because the backbone is frozen, its final-LayerNorm token features are computed once per image and
cached in bf16 next to the image; an epoch then only runs the head. The loop works with any head that has
the interface of hydra/train/heads.py (`named_trainable`, `checkpoint_state`, `load_checkpoint_state`).

Deliberate differences from upstream (docs/deviations.md):
- Padding tokens are masked in training and validation exactly as at inference (upstream's mask came out
  all True, so zero-feature padding took part in the softmax). With the mask, a batch only needs padding
  to its longest member, not to 1024 tokens: same numbers, less work.
- Checkpoint names are valid on Windows (`%Y%m%d-%H%M%S_e{epoch}.pt`) and `-c k` saves every k epochs.
- Checkpoints load with `torch.load(weights_only=True)`; the Python RNG state is a tuple of ints.
- Checkpoints written by train_extension.py also record the model family, the base model's title and its
  label count (`checkpoint_info`); upstream's, which lack them, are JTP-3 checkpoints.
- CPU training works: the optimizer has a plain-PyTorch path next to the Triton kernel (hydra/train/optim.py).

Shape legend: B = images, S = tokens (padded), N = valid tokens of one image, D = backbone width,
H = attention heads, E = head dim, A = H * E, T = validation thresholds.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from hydra.calibration.grid import grid_logits
from hydra.calibration.thresholds import cti
from hydra.common import atomic_write, log
from hydra.models.checkpoint import CheckpointError
from hydra.train.features import NEGATIVE, POSITIVE, Item, load_features

if TYPE_CHECKING:
    from hydra.models.family import Family, TagModel

# What a checkpoint records about its base model (build_extension.py needs the family and the title).
KEY_FAMILY, KEY_MODEL_TITLE, KEY_MODEL_LABELS = "family", "model_title", "model_labels"
UPSTREAM_FAMILY = "jtp3"  # upstream's trainer only trains JTP-3, and its checkpoints name no family

# Upstream's sanity checks on the dataset, skipped with --force.
MIN_TRAIN, MIN_VAL, MIN_EFFECTIVE_BATCH = 100, 40, 16
MIN_RATIO, MAX_RATIO = 0.25, 1.5  # positives / negatives


# ---------------------------------------------------------------------------------------------------
# Dataset split and epoch sampling


def split_dataset(items: Sequence[Item], n_val: int, rng: random.Random) -> tuple[list[Item], list[Item]]:
    """Hold out the first `n_val` positives and negatives of a seeded shuffle. Returns (train, val), sorted."""
    shuffled = sorted(items)
    rng.shuffle(shuffled)
    for label, name in ((1, POSITIVE), (0, NEGATIVE)):
        count = sum(it.label == label for it in shuffled)
        if count <= n_val:
            raise ValueError(f"{count} {name} example(s) cached, but -v {n_val} holds out {n_val} for validation "
                             f"and training needs at least one more")
    val = [it for it in shuffled if it.label == 1][:n_val] + [it for it in shuffled if it.label == 0][:n_val]
    held = set(val)
    return sorted(it for it in shuffled if it not in held), sorted(val)


def sanity_problems(items: Sequence[Item], train: Sequence[Item], val: Sequence[Item], batch: int,
                    accumulate: int) -> list[str]:
    """The reasons this dataset is likely to train badly (empty = fine). `--force` ignores them."""
    problems = []
    if len(train) < MIN_TRAIN:
        problems.append(f"Training dataset of size {len(train)} is too small (at least {MIN_TRAIN}).")
    if len(val) < MIN_VAL:
        problems.append(f"Validation dataset of size {len(val)} is too small (at least {MIN_VAL}).")
    pos = sum(it.label for it in items)
    neg = len(items) - pos
    if not (neg and MIN_RATIO <= pos / neg <= MAX_RATIO):
        problems.append(f"Training dataset is very imbalanced ({pos} positive, {neg} negative; the ratio "
                        f"should be between {MIN_RATIO} and {MAX_RATIO}).")
    if batch * accumulate < MIN_EFFECTIVE_BATCH:
        problems.append(f"Effective batch size {batch} x {accumulate} is below {MIN_EFFECTIVE_BATCH}.")
    return problems


def optimizer_steps(n_train: int, batch: int, accumulate: int) -> int:
    steps = n_train // (batch * accumulate)
    if steps < 1:
        raise ValueError(f"{n_train} training items are fewer than one optimizer step of -b {batch} x -a "
                         f"{accumulate}; lower the batch size")
    return steps


def epoch_sample(rng: random.Random, train: Sequence[Item], batch: int, accumulate: int) -> list[Item]:
    """This epoch's items: a random subset of whole optimizer steps (the remainder waits for later epochs)."""
    items = rng.sample(list(train), optimizer_steps(len(train), batch, accumulate) * accumulate * batch)
    rng.shuffle(items)
    return items


def collate_features(features: Sequence[Tensor], device: torch.device | str,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero-pad per-image features (N_i, D) into x (B, S, D) and patch_valid (B, S), S = max N_i."""
    s = max(f.shape[0] for f in features)
    x = torch.zeros(len(features), s, features[0].shape[1], dtype=dtype)  # (B, S, D)
    valid = torch.zeros(len(features), s, dtype=torch.bool)  # (B, S)
    for i, f in enumerate(features):
        x[i, :len(f)] = f
        valid[i, :len(f)] = True
    return x.to(device), valid.to(device)


# ---------------------------------------------------------------------------------------------------
# Train and validate


def validation_thresholds(n: int) -> Tensor:
    """(n,) bf16 logit thresholds bf16(logit(i / (n + 1))), i = 1..n: the grid extension counts are taken at.

    The grid has one definition, `hydra.calibration.grid.grid_logits`, which calibration replays; its values
    are bf16 numbers already, so the cast is exact.
    """
    return torch.from_numpy(grid_logits(n)).to(torch.bfloat16)


def count_outcomes(logits: Tensor, labels: Tensor, thresholds: Tensor) -> Tensor:
    """(T, 4) int32 [tp, fp, tn, fn] of `logit >= threshold` for logits (N,) and 0/1 labels (N,)."""
    pred = logits.float()[:, None] >= thresholds.float()[None, :]  # (N, T)
    pos = labels.bool()[:, None]  # (N, 1)
    counts = [pred & pos, pred & ~pos, ~pred & ~pos, ~pred & pos]
    return torch.stack([c.sum(0) for c in counts], dim=1).to(torch.int32)  # (T, 4)


def best_cti(counts: Tensor, thresholds: Tensor) -> tuple[float, float]:
    """The best CTI = TP / (TP + FP + FN) over the thresholds (0 where TP = 0) and its probability threshold.

    CTI is calibration's `cti`; ties go to the first, lowest threshold, as calibration's selection does.
    """
    scores = cti(*counts.double().cpu().numpy().T)  # (T,)
    i = int(np.argmax(scores))
    return float(scores[i]), float(torch.sigmoid(thresholds[i].float()))


@dataclass
class Validation:
    loss: float
    cti: float
    thr: float
    counts: Tensor  # (T, 4) int32 [tp, fp, tn, fn]

    def line(self, epoch: int) -> str:
        return f"EPOCH {epoch} VALIDATION: loss={self.loss:.4f}, cti={self.cti:.4f}, thr={self.thr:.4f}"


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _forward(head: nn.Module, chunk: Sequence[Item]) -> tuple[Tensor, Tensor]:
    w = head.named_trainable()[0][1]  # features go to the device and dtype of the trained parameters
    x, valid = collate_features([load_features(it.cache) for it in chunk], w.device, w.dtype)
    labels = torch.tensor([float(it.label) for it in chunk], device=w.device)  # (B,)
    return head(x, valid).squeeze(-1).float(), labels  # (B,), (B,)


def train_epoch(head: nn.Module, optimizer: torch.optim.Optimizer, items: Sequence[Item], *, batch: int,
                accumulate: int, epoch: int, progress: bool = True) -> float:
    """One pass over `items` (from `epoch_sample`); returns the mean training loss."""
    bar = tqdm(list(_chunks(items, batch)), desc=f"epoch {epoch}", unit="batch", file=sys.stderr,
               disable=not progress, dynamic_ncols=True, leave=False)
    total, step, i = 0.0, 0, -1
    optimizer.zero_grad(set_to_none=True)
    for i, chunk in enumerate(bar):
        logits, labels = _forward(head, chunk)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        (loss / accumulate).backward()
        total += float(loss.detach())
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        bar.set_postfix_str(f"step={step} acc={i % accumulate + 1}/{accumulate} loss={float(loss.detach()):.4f}")
    bar.close()
    return total / max(i + 1, 1)


@torch.no_grad()
def validate(head: nn.Module, items: Sequence[Item], thresholds: Tensor, batch: int) -> Validation:
    """Loss (summed BCE / N), counts at every threshold, and the best CTI. Call in eval mode."""
    logits, labels = zip(*(_forward(head, chunk) for chunk in _chunks(items, batch)))
    logits, labels = torch.cat(logits).cpu(), torch.cat(labels).cpu()  # (N,), (N,)
    loss = float(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")) / len(items)
    counts = count_outcomes(logits, labels, thresholds)
    return Validation(loss, *best_cti(counts, thresholds), counts)


class StopFlag:
    """SIGINT handling for the epoch loop: the first Ctrl-C asks to stop after this epoch, the second
    raises KeyboardInterrupt. A context manager; the previous handler is restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __call__(self, signum: int = signal.SIGINT, frame: object = None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("Interrupted. Stopping at the end of this epoch.")

    def __enter__(self) -> StopFlag:
        self._previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclass
class LoopSettings:
    batch: int = 16
    accumulate: int = 1
    max_epochs: int = 0            # 0 = until Ctrl-C
    checkpoint_interval: int = 0   # 0 = only the last epoch
    thresholds: int = 99
    progress: bool = True


def fit(head: nn.Module, optimizer: Any, train: Sequence[Item], val: Sequence[Item], rng: random.Random, *,
        seed: int, settings: LoopSettings, checkpoint_dir: str, start_epoch: int = 0,
        stop: StopFlag | None = None, on_epoch: Callable[[int, Validation | None], None] | None = None,
        info: dict[str, Any] | None = None) -> list[str]:
    """The epoch loop: train, validate (prints the EPOCH line), save checkpoints. Returns the saved paths.

    A checkpoint is saved every `checkpoint_interval` epochs and after the last one: epoch `max_epochs`,
    or the epoch in which `stop` was requested (first Ctrl-C).

    Args:
        head: a trainable head from hydra/train/heads.py (forward (B, S, D), (B, S) -> (B, 1) logits).
        info: extra checkpoint entries (`checkpoint_info`: the base model's family, title, label count).
    """
    stop = stop or StopFlag()
    thresholds = validation_thresholds(settings.thresholds)
    saved, epoch = [], start_epoch
    while True:
        epoch += 1
        items = epoch_sample(rng, train, settings.batch, settings.accumulate)
        head.train()
        train_epoch(head, optimizer, items, batch=settings.batch, accumulate=settings.accumulate, epoch=epoch,
                    progress=settings.progress)
        result = None
        if val:
            head.eval()
            optimizer.eval()  # schedule-free: evaluate at the averaged point x
            result = validate(head, val, thresholds, settings.batch)
            optimizer.train()
            head.train()
            print(result.line(epoch), flush=True)
        if on_epoch is not None:
            on_epoch(epoch, result)
        last = stop.requested or 0 < settings.max_epochs <= epoch
        k = settings.checkpoint_interval
        if last or (k > 0 and epoch % k == 0):
            path = os.path.join(checkpoint_dir, checkpoint_name(epoch))
            save_checkpoint(path, seed=seed, epoch=epoch, rng_state=rng.getstate(), head=head,
                            optimizer=optimizer, validation=None if result is None else result.counts, info=info)
            log(f"Saved checkpoint '{path}'.")
            saved.append(path)
        if last:
            return saved


# ---------------------------------------------------------------------------------------------------
# Checkpoints (their format: docs/formats.md)


def checkpoint_name(epoch: int, when: float | None = None) -> str:
    """`YYYYmmdd-HHMMSS_e{epoch}.pt` (local time; valid on every file system)."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(when)) + f"_e{epoch}.pt"


def save_checkpoint(path: str, *, seed: int, epoch: int, rng_state: tuple, head: nn.Module,
                    optimizer: torch.optim.Optimizer, validation: Tensor | None,
                    info: dict[str, Any] | None = None) -> None:
    """Write a training checkpoint atomically (loadable with `torch.load(weights_only=True)`).

    Entries: seed, epoch, rng_state, the head's module states (`head.checkpoint_state()`: `attn_pool`, and
    `head` for Hydra 3.5), optimizer, validation ((T, 4) int32 or None), then `info` (`checkpoint_info`).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"seed": seed, "epoch": epoch, "rng_state": rng_state, **head.checkpoint_state(),
            "optimizer": optimizer.state_dict(), "validation": validation, **(info or {})}
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a training checkpoint (ours or upstream's) safely: tensors and plain containers only."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle / zip errors: not a checkpoint, or not a safe one
        raise CheckpointError(f"{path}: not a readable training checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("seed", "epoch", "attn_pool", "optimizer") if k not in ckpt]
    if not isinstance(ckpt, dict) or missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing) or 'everything'})")
    return ckpt


def checkpoint_info(family: Family, model: TagModel) -> dict[str, Any]:
    """What a checkpoint records about the model it was trained on: its family name (which builder applies),
    its `modelspec.title` (v2 extensions must name it) and its label count."""
    return {KEY_FAMILY: family.name, KEY_MODEL_TITLE: model.title, KEY_MODEL_LABELS: len(model.labels)}


def checkpoint_family(ckpt: dict[str, Any]) -> Family:
    """The model family a checkpoint was trained for; upstream's checkpoints name none and are JTP-3's."""
    from hydra.models import get

    name = ckpt.get(KEY_FAMILY, UPSTREAM_FAMILY)
    try:
        return get(name)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint was trained for {e}") from None


def check_resume(ckpt: dict[str, Any], info: dict[str, Any], source: str) -> None:
    """A checkpoint continues only on the model it was trained on (what it records must match `info`)."""
    for key, what in ((KEY_FAMILY, "model family"), (KEY_MODEL_TITLE, "model title"),
                      (KEY_MODEL_LABELS, "label count")):
        ours = ckpt.get(key, UPSTREAM_FAMILY if key == KEY_FAMILY else info[key])
        if ours != info[key]:
            raise ValueError(f"{source} was trained on a model with {what} {ours!r}, but this model has "
                             f"{info[key]!r}; resume with the model it was trained on (-M)")
