"""The trainable one-tag heads of train_extension.py, and turning their checkpoints back into tensors to ship.

A new tag is trained on top of a frozen model: the backbone is only run once per image (its features are
cached, hydra/train/features.py), and the shared weights of the pool stay frozen. Only the new tag's own
slices of the per-tag parameters train:

- JTP-3 (`JTP3TrainHead`, a one-tag `HydraPool`): the query `q` (H, 1, E) and the output matrix
  `out_proj.weight` (1, A, 2). The kv / ff weights are the base model's.
- Hydra 3.5 (`Hydra35TrainHead`): the query `attn_pool.q` (H, 1, E) and the head row `head.weight` (1, A).
  The kv, ff and mid-block weights are the base model's.

Every trainable head offers the same small interface, which the epoch loop (hydra/train/loop.py) uses:
`forward(x, patch_valid) -> (B, 1)` logits, `named_trainable()` (optimizer names: the model's own
parameter names, as upstream's checkpoints name them), `checkpoint_state()` (the checkpoint's entries,
one state dict per module) and `load_checkpoint_state(checkpoint)`.

The Hydra 3.5 q decision: q is trained as stored, without RMSNorm, because Hydra 3.5 uses its stored q as
is at inference (upstream's hydra2 pool does not normalise q in training either; only its constructor
RMS-normalises the random init). So validation in training computes exactly what inference computes with
the shipped file, the base file's unknown q norms do not matter, and `-i TAG` starts from that tag's exact
behaviour. A fresh q is upstream's constructor init: N(0, 1) RMS-normalised (L2 norm sqrt(E)); a fresh head
row is a random unit vector, as LinearHead initialises its rows. (JTP-3 differs: its training normalises q
on every forward, and the v1 builder stores the RMS-normalised q; see hydra/models/extensions.py.)

Shape legend: B = images, S = tokens (padded), D = backbone width, H = attention heads, E = head dim,
A = H * E, T = validation thresholds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hydra.common import log
from hydra.models.checkpoint import CheckpointError
from hydra.models.head import HydraPool
from hydra.models.hydra35_net import Hydra2Pool, LinearHead
from hydra.train.optim import schedule_free_eval_point

PREFIX = "attn_pool."  # JTP-3 optimizer names: upstream names them inside attn_pool


# ---------------------------------------------------------------------------------------------------
# JTP-3


class JTP3TrainHead(HydraPool):
    """A one-tag HydraPool whose q and out_proj are new and trainable; everything else is the base's.

    Built by `make_train_head`. Forward (inherited): x (B, S, D), patch_valid (B, S) -> logits (B, 1).
    """

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return named_trainable(self)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"attn_pool": head_state(self)}

    def load_checkpoint_state(self, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
        load_head_state(self, checkpoint["attn_pool"], source)


def make_train_head(base: HydraPool, init_index: int | None = None,
                    generator: torch.Generator | None = None) -> JTP3TrainHead:
    """A one-tag HydraPool sharing `base`'s frozen kv / ff weights, with new trainable q and out_proj.

    Fresh: q ~ N(0, 1) (H, 1, E) and out_proj.weight (1, A, 2) ~ U(+-1/sqrt(A)), which is nn.Linear's
    Kaiming-uniform init with a = sqrt(5). With `init_index`, both are copied from that tag of `base`.
    q passes through RMSNorm on every forward (`q_normed = False`), as upstream trains it.
    """
    cfg = dataclasses.replace(base.cfg, n_tags=1)
    w = base.kv.weight
    head = JTP3TrainHead(cfg, device="meta", dtype=w.dtype)
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
    _copy_params(source, "attn_pool", state, (("q", head.q), ("out_proj.weight", head.out_proj.weight)))


def extension_tensors(ckpt: dict[str, Any], say: Callable[[str], None] = log,
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The weights to ship: q (H, 1, E), out_proj.weight (1, A, 2) and validation (T, 4) or None.

    A checkpoint saved in schedule-free train mode holds y; the weights that were validated are the
    averaged point x = lerp(y, z, 1 - 1/beta1), reconstructed from the optimizer's z (`averaged_state`).
    q is returned as trained; `save_extension` RMS-normalises it.
    """
    state = averaged_state(ckpt, ("attn_pool",), say)["attn_pool"]
    q, out = state.get("q"), state.get("out_proj.weight")
    if q is None or out is None:
        raise CheckpointError("checkpoint attn_pool lacks q or out_proj.weight")
    h, one, e = q.shape
    if one != 1 or tuple(out.shape) != (1, h * e, 2):
        raise CheckpointError(f"checkpoint holds q {tuple(q.shape)} and out_proj.weight {tuple(out.shape)}; "
                              f"expected (H, 1, E) and (1, H*E, 2) for a one-tag extension")
    return q, out, ckpt.get("validation")


# ---------------------------------------------------------------------------------------------------
# Hydra 3.5


class Hydra35TrainHead(nn.Module):
    """One new Hydra 3.5 tag: a one-tag Hydra2Pool (`attn_pool`) and LinearHead (`head`).

    The pool's kv, ff and mid-block modules are the base model's own (shared, frozen); only `attn_pool.q`
    (H, 1, E) and `head.weight` (1, A) are new and trainable, so the module's parameter names are the
    model file's and a v2 extension's. q is used as stored, in training as at inference (module docstring).

    Args:
        pool: the base model's pool; head: its LinearHead.
        init_index: copy this tag's q and head row (`-i TAG`); None = fresh (see the module docstring).
        generator: RNG of the fresh init.
    """

    def __init__(self, pool: Hydra2Pool, head: LinearHead, init_index: int | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        cfg = dataclasses.replace(pool.cfg, n_tags=1)
        w = pool.kv.weight
        self.attn_pool = Hydra2Pool(cfg, device="meta", dtype=w.dtype)
        self.attn_pool.kv, self.attn_pool.ff, self.attn_pool.mid_blocks = pool.kv, pool.ff, pool.mid_blocks
        for module in (pool.kv, pool.ff, pool.mid_blocks):
            module.requires_grad_(False)
        self.head = LinearHead(1, cfg.attn_dim, device="meta", dtype=w.dtype)
        if init_index is None:
            q = torch.randn(cfg.n_heads, 1, cfg.head_dim, generator=generator)  # (H, 1, E)
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True))  # RMS 1: L2 norm sqrt(E), upstream's init
            row = torch.randn(1, cfg.attn_dim, generator=generator)  # (1, A)
            row = row / row.norm(dim=-1, keepdim=True)  # a unit row, as LinearHead initialises
        else:
            q = pool.q.detach()[:, init_index:init_index + 1].clone()  # (H, 1, E)
            row = head.weight.detach()[init_index:init_index + 1].clone()  # (1, A)
        self.attn_pool.q = nn.Parameter(q.to(w.device, w.dtype))
        self.head.weight = nn.Parameter(row.to(w.device, w.dtype))

    def forward(self, x: Tensor, patch_valid: Tensor | None = None) -> Tensor:
        """Logits (B, 1) in the activation dtype from features x (B, S, D) and patch_valid (B, S) or None."""
        return self.head(self.attn_pool(x, patch_valid))

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(full parameter name, parameter): `attn_pool.q` and `head.weight`, the v2 file's names."""
        return [("attn_pool.q", self.attn_pool.q), ("head.weight", self.head.weight)]

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint's `attn_pool` and `head` entries: each module's trainable tensors."""
        return {"attn_pool": {"q": self.attn_pool.q.detach().cpu().clone()},
                "head": {"weight": self.head.weight.detach().cpu().clone()}}

    def load_checkpoint_state(self, checkpoint: dict[str, Any], source: str = "checkpoint") -> None:
        """Copy q and the head row from a checkpoint written by `checkpoint_state`."""
        for module, params in (("attn_pool", (("q", self.attn_pool.q),)), ("head", (("weight", self.head.weight),))):
            if not isinstance(checkpoint.get(module), dict):
                raise CheckpointError(f"{source}: no {module!r} entry (not a Hydra 3.5 training checkpoint?)")
            _copy_params(source, module, checkpoint[module], params)


def hydra35_extension_tensors(ckpt: dict[str, Any], say: Callable[[str], None] = log,
                              ) -> tuple[dict[str, Tensor], Tensor | None]:
    """The weights to ship under their full names, `attn_pool.q` (H, 1, E) and `head.weight` (1, A), with the
    validation counts (T, 4) or None; the weights are the schedule-free average (`averaged_state`)."""
    state = averaged_state(ckpt, ("attn_pool", "head"), say)
    q, row = state["attn_pool"].get("q"), state["head"].get("weight")
    if q is None or row is None:
        raise CheckpointError("checkpoint lacks attn_pool.q or head.weight (not a Hydra 3.5 training checkpoint?)")
    if q.ndim != 3 or q.shape[1] != 1 or tuple(row.shape) != (1, q.shape[0] * q.shape[2]):
        raise CheckpointError(f"checkpoint holds attn_pool.q {tuple(q.shape)} and head.weight {tuple(row.shape)}; "
                              f"expected (H, 1, E) and (1, H*E) for a one-tag extension")
    return {"attn_pool.q": q, "head.weight": row}, ckpt.get("validation")


# ---------------------------------------------------------------------------------------------------
# Shared


def averaged_state(ckpt: dict[str, Any], modules: Sequence[str],
                   say: Callable[[str], None] = log) -> dict[str, dict[str, Tensor]]:
    """The checkpoint's module states (`modules`, e.g. attn_pool) with the schedule-free average applied.

    A checkpoint saved in schedule-free train mode holds y; the weights that were validated are the
    averaged point x = lerp(y, z, 1 - 1/beta1), reconstructed from the optimizer's z (upstream's builder
    does the same). Optimizer names are `<module>.<name in the module's state>`.

    Raises:
        CheckpointError: a train-mode optimizer state without `param_names`.
    """
    states = {m: dict(ckpt.get(m) or {}) for m in modules}
    opt = ckpt["optimizer"]
    for group in opt.get("param_groups", []):
        if not group.get("train_mode"):
            continue
        names = group.get("param_names")
        if names is None:
            raise CheckpointError(f"optimizer state has no param_names; cannot match it to {' / '.join(modules)} "
                                  "tensors")
        for index, name in zip(group["params"], names):
            z = opt["state"].get(index, {}).get("z")
            module, _, key = name.partition(".")
            if module not in states or z is None:  # never stepped: y = x = z already
                continue
            states[module][key] = schedule_free_eval_point(states[module][key], z, group["beta1"])
            say(f"Apply optimizer state: {name}")
    return states


def _copy_params(source: str, module: str, state: dict[str, Any], params: Sequence[tuple[str, nn.Parameter]]) -> None:
    for name, param in params:
        if name not in state:
            raise CheckpointError(f"{source}: {module} has no {name!r}")
        if tuple(state[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: {module}.{name} has shape {tuple(state[name].shape)}, but this "
                                  f"model needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(state[name])
