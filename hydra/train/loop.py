"""Training one new tag on top of frozen JTP-3: split, head, loop, checkpoints (workspace and feature cache:
hydra/features.py).

What `train_extension.py` and `build_extension.py` run (spec §7, §8.1). A new tag is one query per
attention head `q` (H, 1, E) and one output matrix `out_proj.weight` (1, A, 2); everything else (the
backbone and the shared kv / ff weights of the Hydra head) is frozen. Because the backbone is frozen, its
final-LayerNorm token features are computed once per image and cached in bf16 next to the image; an epoch
then only runs the head.

Deliberate differences from upstream (see README):
- Padding tokens are masked in training and validation exactly as at inference (upstream's mask came out
  all True, so zero-feature padding took part in the softmax). With the mask, a batch only needs padding
  to its longest member, not to 1024 tokens: same numbers, less work.
- Checkpoint names are valid on Windows (`%Y%m%d-%H%M%S_e{epoch}.pt`) and `-c k` saves every k epochs.
- Checkpoints load with `torch.load(weights_only=True)`; the Python RNG state is a tuple of ints.
- CPU training works: the optimizer has a plain-PyTorch path next to the Triton kernel (hydra/optim.py).

Shape legend: B = images, S = tokens (padded), N = valid tokens of one image, D = backbone width,
H = attention heads, E = head dim, A = H * E, T = validation thresholds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from hydra.common import atomic_write, log
from hydra.models.checkpoint import CheckpointError
from hydra.models.head import HydraPool
from hydra.train.features import NEGATIVE, POSITIVE, Item, load_features
from hydra.train.optim import schedule_free_eval_point

TRAINABLE = ("q", "out_proj.weight")  # names inside attn_pool; optimizer names carry the prefix
PREFIX = "attn_pool."

# Sanity checks (spec §7.4), skipped with --force.
MIN_TRAIN, MIN_VAL, MIN_EFFECTIVE_BATCH = 100, 40, 16
MIN_RATIO, MAX_RATIO = 0.25, 1.5  # positives / negatives


# ---------------------------------------------------------------------------------------------------
# Dataset split and epoch sampling (spec §7.4)


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
# The trainable head (spec §7.5)


def make_train_head(base: HydraPool, init_index: int | None = None,
                    generator: torch.Generator | None = None) -> HydraPool:
    """A one-tag HydraPool sharing `base`'s frozen kv / ff weights, with new trainable q and out_proj.

    Fresh: q ~ N(0, 1) (H, 1, E) and out_proj.weight (1, A, 2) ~ U(+-1/sqrt(A)), which is nn.Linear's
    Kaiming-uniform init with a = sqrt(5). With `init_index`, both are copied from that tag of `base`.
    q passes through RMSNorm on every forward (`q_normed = False`), as upstream trains it.
    """
    cfg = dataclasses.replace(base.cfg, n_tags=1)
    w = base.kv.weight
    head = HydraPool(cfg, device="meta", dtype=w.dtype)
    head.kv, head.ff_norm, head.ff_in, head.ff_out = base.kv, base.ff_norm, base.ff_in, base.ff_out
    for module in (head.kv, head.ff_norm, head.ff_in, head.ff_out):
        module.requires_grad_(False)
    if init_index is None:
        q = torch.randn(cfg.n_heads, 1, cfg.head_dim, generator=generator)  # (H, 1, E)
        bound = 1.0 / math.sqrt(cfg.attn_dim)
        out = torch.rand(1, cfg.attn_dim, 2, generator=generator) * (2 * bound) - bound  # (1, A, 2)
    else:
        q = base.q.detach()[:, init_index:init_index + 1].clone()  # (H, 1, E)
        out = base.out_proj.weight.detach()[init_index:init_index + 1].clone()  # (1, A, 2)
    head.q = nn.Parameter(q.to(w.device, w.dtype))
    head.out_proj.weight = nn.Parameter(out.to(w.device, w.dtype))
    head.q_normed = False
    return head


def named_trainable(head: HydraPool) -> list[tuple[str, nn.Parameter]]:
    """(optimizer name, parameter) pairs, named as upstream's checkpoints name them."""
    return [(PREFIX + "q", head.q), (PREFIX + "out_proj.weight", head.out_proj.weight)]


def head_state(head: HydraPool) -> dict[str, Any]:
    """The checkpoint's `attn_pool` entry: the trainable tensors (and upstream's `_extra_state` flag)."""
    return {"q": head.q.detach().cpu().clone(), "out_proj.weight": head.out_proj.weight.detach().cpu().clone(),
            "_extra_state": {"q_normed": False}}


def load_head_state(head: HydraPool, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Copy q and out_proj.weight from a checkpoint's `attn_pool` (frozen copies in it are ignored)."""
    for name, param in (("q", head.q), ("out_proj.weight", head.out_proj.weight)):
        if name not in state:
            raise CheckpointError(f"{source}: attn_pool has no {name!r}")
        if tuple(state[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: attn_pool.{name} has shape {tuple(state[name].shape)}, but this "
                                  f"model needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(state[name])


# ---------------------------------------------------------------------------------------------------
# Train and validate (spec §7.5, §7.6)


def validation_thresholds(n: int) -> Tensor:
    """(n,) logit thresholds logit(i / (n + 1)), i = 1..n, rounded to bf16 as upstream does."""
    return torch.logit(torch.linspace(0, 1, n + 2)[1:-1]).to(torch.bfloat16)


def count_outcomes(logits: Tensor, labels: Tensor, thresholds: Tensor) -> Tensor:
    """(T, 4) int32 [tp, fp, tn, fn] of `logit >= threshold` for logits (N,) and 0/1 labels (N,)."""
    pred = logits.float()[:, None] >= thresholds.float()[None, :]  # (N, T)
    pos = labels.bool()[:, None]  # (N, 1)
    counts = [pred & pos, pred & ~pos, ~pred & ~pos, ~pred & pos]
    return torch.stack([c.sum(0) for c in counts], dim=1).to(torch.int32)  # (T, 4)


def best_cti(counts: Tensor, thresholds: Tensor) -> tuple[float, float]:
    """The best CTI = TP / (TP + FP + FN) over the thresholds and its probability threshold."""
    tp, fp, _, fn = counts.double().unbind(1)
    cti = torch.where(tp > 0, tp / (tp + fp + fn).clamp_min(1), 0.0)  # (T,)
    i = int(cti.argmax())
    return float(cti[i]), float(torch.sigmoid(thresholds[i].float()))


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


def _forward(head: HydraPool, chunk: Sequence[Item]) -> tuple[Tensor, Tensor]:
    w = head.kv.weight
    x, valid = collate_features([load_features(it.cache) for it in chunk], w.device, w.dtype)
    labels = torch.tensor([float(it.label) for it in chunk], device=w.device)  # (B,)
    return head(x, valid).squeeze(-1).float(), labels  # (B,), (B,)


def train_epoch(head: HydraPool, optimizer: torch.optim.Optimizer, items: Sequence[Item], *, batch: int,
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
def validate(head: HydraPool, items: Sequence[Item], thresholds: Tensor, batch: int) -> Validation:
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


def fit(head: HydraPool, optimizer: Any, train: Sequence[Item], val: Sequence[Item], rng: random.Random, *,
        seed: int, settings: LoopSettings, checkpoint_dir: str, start_epoch: int = 0,
        stop: StopFlag | None = None, on_epoch: Callable[[int, Validation | None], None] | None = None,
        ) -> list[str]:
    """The epoch loop: train, validate (prints the EPOCH line), save checkpoints. Returns the saved paths.

    A checkpoint is saved every `checkpoint_interval` epochs and after the last one: epoch `max_epochs`,
    or the epoch in which `stop` was requested (first Ctrl-C).
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
                            optimizer=optimizer, validation=None if result is None else result.counts)
            log(f"Saved checkpoint '{path}'.")
            saved.append(path)
        if last:
            return saved


# ---------------------------------------------------------------------------------------------------
# Checkpoints (spec §7.7) and turning one into an extension (spec §8.1)


def checkpoint_name(epoch: int, when: float | None = None) -> str:
    """`YYYYmmdd-HHMMSS_e{epoch}.pt` (local time; valid on every file system)."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(when)) + f"_e{epoch}.pt"


def save_checkpoint(path: str, *, seed: int, epoch: int, rng_state: tuple, head: HydraPool,
                    optimizer: torch.optim.Optimizer, validation: Tensor | None) -> None:
    """Write a training checkpoint atomically (loadable with `torch.load(weights_only=True)`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ckpt = {"seed": seed, "epoch": epoch, "rng_state": rng_state, "attn_pool": head_state(head),
            "optimizer": optimizer.state_dict(), "validation": validation}
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


def extension_tensors(ckpt: dict[str, Any], say: Callable[[str], None] = log,
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The weights to ship: q (H, 1, E), out_proj.weight (1, A, 2) and validation (T, 4) or None.

    A checkpoint saved in schedule-free train mode holds y; the weights that were validated are the
    averaged point x = lerp(y, z, 1 - 1/beta1), reconstructed from the optimizer's z (spec §8.1 step 3).
    q is returned as trained; `save_extension` RMS-normalises it.
    """
    state = dict(ckpt["attn_pool"])
    opt = ckpt["optimizer"]
    for group in opt.get("param_groups", []):
        if not group.get("train_mode"):
            continue
        names = group.get("param_names")
        if names is None:
            raise CheckpointError("optimizer state has no param_names; cannot match it to attn_pool tensors")
        for index, name in zip(group["params"], names):
            z = opt["state"].get(index, {}).get("z")
            if not name.startswith(PREFIX) or z is None:  # never stepped: y = x = z already
                continue
            key = name[len(PREFIX):]
            state[key] = schedule_free_eval_point(state[key], z, group["beta1"])
            say(f"Apply optimizer state: {name}")
    q, out = state.get("q"), state.get("out_proj.weight")
    if q is None or out is None:
        raise CheckpointError("checkpoint attn_pool lacks q or out_proj.weight")
    h, one, e = q.shape
    if one != 1 or tuple(out.shape) != (1, h * e, 2):
        raise CheckpointError(f"checkpoint holds q {tuple(q.shape)} and out_proj.weight {tuple(out.shape)}; "
                              f"expected (H, 1, E) and (1, H*E, 2) for a one-tag extension")
    return q, out, ckpt.get("validation")
