"""AdamWSFSR: Schedule-Free AdamW (refined, with decoupling constant C) and bf16 stochastic rounding.

The optimizer `train_extension.py` uses for the two small tensors of a new tag (q and out_proj.weight).
Upstream's `optimizer.bf16sr_adamwsf.AdamWSFSR` is not public. Its callers show param groups of (name, tensor)
pairs, the keyword arguments lr, beta1, beta2, c, weight_decay and warmup_steps, `train()` / `eval()` switches,
a per-parameter state `z` with the eval point x = lerp(y, z, 1 - 1/beta1), and bf16 parameters updated with
stochastic rounding in a Triton kernel; this module is a from-scratch implementation of that. Papers: Defazio
et al. 2024, "The Road Less Scheduled" (arXiv 2405.15682), and Song, Baek, Ahn, Yun 2025 (arXiv 2507.09846) for
the decoupled averaging weight.

Algorithm, step t = 1, 2, ... (the paper's form, with three sequences x, y, z)::

    y_t     = (1 - b1) z_t + b1 x_t                    # gradients are taken here
    v_t     = b2 v_{t-1} + (1 - b2) g_t^2,             g_t = grad f(y_t)
    gh_t    = g_t / (sqrt(v_t / (1 - b2^t)) + eps) + wd y_t
    z_{t+1} = z_t - gamma_t gh_t
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}      # x is the averaged (evaluation) point
    gamma_t = lr min(1, t / warmup_steps);   c_{t+1} = min(gamma_t^2 / sum_{i<=t} gamma_i^2 (1 - b1) C, 1)

C = 1/(1 - b1) gives the original Schedule-Free weights gamma_t^2 / sum gamma_i^2.

Memory-efficient form (as Meta's `schedulefree` package): store y (the parameter) and z, never x.
Substituting x_t = (y_t - (1 - b1) z_t) / b1 and z_{t+1} = z_t - gamma_t gh_t into y_{t+1}, the z_t
terms collect to c_{t+1} z_t, so::

    y_{t+1} = lerp(y_t, z_t, c_{t+1}) + gamma_t (b1 (1 - c_{t+1}) - 1) gh_t     (uses z_t, before its update)
    z_{t+1} = z_t - gamma_t gh_t
    x       = lerp(y, z, 1 - 1/b1)        (eval point; build_extension applies this to a checkpoint)

Choices where upstream is unknown:
- eps = 1e-8, added after the square root of the bias-corrected second moment.
- v is bias-corrected (1 - b2^t), as schedulefree does; there is no first moment (the averaging is it).
- Warmup is linear and counted from t = 1, so the first step already uses lr / warmup_steps.
- Weight decay is decoupled, evaluated at y and applied through gh (so it is scaled by gamma_t and
  enters both z and y), as in schedulefree's default.
- State dtypes: z and v are always float32 (48 KiB for q + out_proj); the parameter keeps its dtype.
  bf16 parameters are computed in float32 and written back with stochastic rounding.
- The optimizer starts in train mode. `eval()` stashes the exact y in the state ("y") so `train()`
  restores it bit for bit; recomputing y from a rounded bf16 x would perturb training every epoch.
- The rounding RNG is not part of `state_dict()` (upstream does not save torch RNG state either).

Two implementations of the per-tensor update: plain PyTorch (any device) and one fused Triton kernel
(CUDA, or CPU tensors under TRITON_INTERPRET=1). `HYDRA_OPTIM_IMPL=torch|triton` forces a choice;
`optimizer.impl` and `optimizer.impl_reason` say which one runs and why.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

IMPLS = ("torch", "triton")
_BLOCK = 1024  # elements per Triton program; the tensors here have 2k-4k elements


def _probe_triton() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1; CPU tensors, slow, for tests)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "triton with a CUDA device"


HAS_TRITON, TRITON_REASON = _probe_triton()

if HAS_TRITON:
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # a broken install must not break the torch path; the reason is kept
        HAS_TRITON, TRITON_REASON = False, f"triton import failed: {e!r}"

if HAS_TRITON:

    @triton.jit
    def _sf_adamw_kernel(
        y_ptr,  # (N,) parameter y, fp32 or bf16; updated in place
        g_ptr,  # (N,) gradient, any float dtype
        z_ptr,  # (N,) fp32 state z; updated in place
        v_ptr,  # (N,) fp32 second moment; updated in place
        n_elements,  # N
        avg_weight,  # c_{t+1}
        lr,  # gamma_t
        y_grad_coef,  # gamma_t (b1 (1 - c_{t+1}) - 1)
        beta2,
        bias_correction2,  # 1 - b2^t
        eps,
        weight_decay,
        seed,  # int32, fresh per step and tensor; read only when ROUNDING == 2
        ROUNDING: tl.constexpr,  # 0 = none (fp32), 1 = nearest-even to bf16, 2 = stochastic to bf16
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        z = tl.load(z_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        gh = g / (tl.sqrt(v / bias_correction2) + eps) + weight_decay * y
        y = y + avg_weight * (z - y) + y_grad_coef * gh
        z = z - lr * gh
        tl.store(z_ptr + offs, z, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if ROUNDING == 0:
            tl.store(y_ptr + offs, y, mask=mask)
        else:
            # Round in the integer domain and store the bf16 bit pattern, with no float conversion: the
            # interpreter truncates fp32 -> bf16 casts and flushes subnormals, and this way GPU and
            # interpreter agree bit for bit.
            bits = y.to(tl.int32, bitcast=True)
            if ROUNDING == 2:
                add = tl.randint(seed, offs).to(tl.int32, bitcast=True) & 0xFFFF
            else:
                add = 0x7FFF + ((bits >> 16) & 1)
            # NaN payloads could carry into the sign bit: keep the top half and force the quiet bit.
            top = tl.where(y != y, (bits >> 16) | 0x40, (bits + add) >> 16)
            tl.store(y_ptr + offs, top.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)


def stochastic_round_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 to bfloat16 stochastically: up with probability equal to the distance from below.

    Adds a uniform random 16-bit integer to the float32 bit pattern and truncates the low 16 bits. Bit
    patterns are sign-magnitude, so this rounds the magnitude and is unbiased for negatives too;
    infinities stay infinite (their low bits are zero), NaNs are passed through untouched.

    Args:
        x: float32 tensor, any shape.
        generator: RNG for the random bits (on x's device); None uses torch's global RNG.

    Returns:
        bfloat16 tensor of x's shape, each element one of the two bf16 neighbours of x.
    """
    assert x.dtype == torch.float32, f"expected float32, got {x.dtype}"
    nan = torch.isnan(x)
    bits = torch.where(nan, 0.0, x).view(torch.int32)  # zeroed NaNs cannot overflow the int32 add
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(nan, x, rounded).to(torch.bfloat16)  # exact cast: low 16 bits are zero


def schedule_free_eval_point(y: Tensor, z: Tensor, beta1: float) -> Tensor:
    """The averaged point x = lerp(y, z, 1 - 1/beta1), computed in float32, returned in y's dtype.

    This is the conversion build_extension applies to a train-mode checkpoint before writing it. Use
    this rather than `torch.lerp(y, z, ...)` directly: z is float32 while y may be bf16, and lerp refuses
    mixed dtypes.
    """
    return torch.lerp(y.float(), z.float(), 1.0 - 1.0 / beta1).to(y.dtype)


def _update_torch(p: Tensor, grad: Tensor, z: Tensor, v: Tensor, *, avg_weight: float, lr: float,
                  y_grad_coef: float, beta2: float, bias_correction2: float, eps: float,
                  weight_decay: float, rounding: int, generator: torch.Generator | None) -> None:
    """Plain-PyTorch twin of `_sf_adamw_kernel`, same operation order (so results match to fp32 ulps)."""
    g = grad.float()
    v.mul_(beta2).add_((1.0 - beta2) * (g * g))
    gh = g / ((v / bias_correction2).sqrt_() + eps)
    y = p if p.dtype == torch.float32 else p.float()  # fp32: update the parameter itself, exactly
    if weight_decay != 0:
        gh.add_(y, alpha=weight_decay)
    y.add_(z - y, alpha=avg_weight).add_(gh, alpha=y_grad_coef)
    z.sub_(gh, alpha=lr)
    if rounding == 1:
        p.copy_(y.to(p.dtype))
    elif rounding == 2:
        p.copy_(stochastic_round_bf16(y, generator))


def _update_triton(p: Tensor, grad: Tensor, z: Tensor, v: Tensor, *, avg_weight: float, lr: float,
                   y_grad_coef: float, beta2: float, bias_correction2: float, eps: float,
                   weight_decay: float, rounding: int, seed: int) -> None:
    assert HAS_TRITON, TRITON_REASON
    assert p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", \
        f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1), got {p.device}"
    for t in (p, grad, z, v):
        assert t.is_contiguous() and t.numel() == p.numel(), f"need contiguous same-size tensors: {t.shape}"
    n = p.numel()
    _sf_adamw_kernel[(triton.cdiv(n, _BLOCK),)](
        p, grad, z, v, n, avg_weight, lr, y_grad_coef, beta2, bias_correction2, eps, weight_decay, seed,
        ROUNDING=rounding, BLOCK=_BLOCK)


def _resolve_impl(requested: str | None, params: list[Tensor]) -> tuple[str, str]:
    """Pick "torch" or "triton" and say why: explicit argument, then HYDRA_OPTIM_IMPL, then auto."""
    source = "impl argument"
    if requested is None and os.environ.get("HYDRA_OPTIM_IMPL"):
        requested, source = os.environ["HYDRA_OPTIM_IMPL"], "HYDRA_OPTIM_IMPL"
    if requested is not None:
        if requested not in IMPLS:
            raise ValueError(f"{source}={requested!r}; choose one of {', '.join(IMPLS)}")
        if requested == "triton" and not HAS_TRITON:
            raise RuntimeError(f"{source} forces triton, but it is unavailable: {TRITON_REASON}")
        return requested, f"forced by {source}"
    if not HAS_TRITON:
        return "torch", TRITON_REASON
    if not all(p.is_cuda for p in params):
        return "torch", "parameters are not all on CUDA"
    return "triton", TRITON_REASON


class AdamWScheduleFree(torch.optim.Optimizer):
    """Schedule-Free AdamW with decoupled averaging constant C and stochastic rounding for bf16 params.

    See the module docstring for the equations. The parameter holds y in train mode and x in eval mode;
    param groups carry `train_mode` and `beta1`, and each parameter's state carries `z`, so a saved
    `state_dict()` is enough to recover x (`schedule_free_eval_point`).

    Attributes:
        impl: "torch" or "triton", the per-tensor update in use.
        impl_reason: why that implementation was chosen (log it).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, beta1: float = 0.9, beta2: float = 0.999,
                 c: float = 200.0, weight_decay: float = 1e-2, warmup_steps: int = 20, eps: float = 1e-8,
                 *, stochastic_rounding: bool = True, seed: int | None = None, impl: str | None = None):
        """Create the optimizer.

        Args:
            params: tensors, (name, tensor) tuples, or param-group dicts holding either (named params
                give `param_names` in `state_dict()`, as upstream's checkpoints have).
            lr: peak learning rate (after linear warmup).
            beta1: interpolation between z and x for the gradient point y; 0 < beta1 < 1.
            beta2: second-moment decay.
            c: decoupling constant C of the averaging weight; 1/(1 - beta1) is original Schedule-Free.
            weight_decay: decoupled weight decay, evaluated at y.
            warmup_steps: linear warmup length in optimizer steps (0 = none).
            eps: added to the root of the bias-corrected second moment (upstream's value is unknown).
            stochastic_rounding: round bf16 parameters stochastically (False = round to nearest even).
            seed: seeds the rounding RNG for reproducible runs; None draws from torch's global RNG.
            impl: "torch" or "triton" to force an implementation (overrides HYDRA_OPTIM_IMPL).
        """
        if not 0.0 < beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"need 0 < beta1 < 1 and 0 <= beta2 < 1, got beta1={beta1}, beta2={beta2}")
        if lr < 0 or c <= 0 or weight_decay < 0 or warmup_steps < 0 or eps < 0:
            raise ValueError(f"need lr, weight_decay, warmup_steps, eps >= 0 and c > 0; got lr={lr}, "
                             f"c={c}, weight_decay={weight_decay}, warmup_steps={warmup_steps}, eps={eps}")
        # step and lr_sq_sum live in the groups so that state_dict() carries the schedule.
        defaults = dict(lr=lr, beta1=beta1, beta2=beta2, c=c, weight_decay=weight_decay,
                        warmup_steps=warmup_steps, eps=eps, train_mode=True, step=0, lr_sq_sum=0.0)
        super().__init__(params, defaults)
        all_params = [p for group in self.param_groups for p in group["params"]]
        for p in all_params:
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"parameters must be float32 or bfloat16, got {p.dtype} {tuple(p.shape)}")
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self.impl, self.impl_reason = _resolve_impl(impl, all_params)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _triton_seed(self) -> int:
        # Drawn on the CPU so a CUDA step does not synchronise to read it back.
        return int(torch.randint(0, 2**31 - 1, (), generator=self._generator(torch.device("cpu"))))

    @staticmethod
    def _advance_schedule(group: dict[str, Any]) -> dict[str, float]:
        """Count one step for the group; return the scalars of this step's update."""
        group["step"] += 1
        t, beta1, warmup = group["step"], group["beta1"], group["warmup_steps"]
        lr = group["lr"] * (min(1.0, t / warmup) if warmup > 0 else 1.0)
        group["lr_sq_sum"] += lr * lr
        total = group["lr_sq_sum"]
        avg_weight = min(lr * lr / total * (1.0 - beta1) * group["c"], 1.0) if total > 0 else 0.0
        return dict(avg_weight=avg_weight, lr=lr, y_grad_coef=lr * (beta1 * (1.0 - avg_weight) - 1.0),
                    beta2=group["beta2"], bias_correction2=1.0 - group["beta2"] ** t, eps=group["eps"],
                    weight_decay=group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Do one optimizer step at y. Raises RuntimeError in eval mode (the parameter would be x)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError("optimizer.step() in eval mode: the parameters hold the averaged x, "
                                   "not y. Call optimizer.train() first.")
            scalars = self._advance_schedule(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().float().clone()  # x_1 = y_1 = z_1 = initial parameter
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                rounding = 0 if p.dtype == torch.float32 else (2 if self.stochastic_rounding else 1)
                if self.impl == "triton":
                    seed = self._triton_seed() if rounding == 2 else 0
                    _update_triton(p, p.grad, state["z"], state["exp_avg_sq"], rounding=rounding, seed=seed,
                                   **scalars)
                else:
                    _update_torch(p, p.grad, state["z"], state["exp_avg_sq"], rounding=rounding,
                                  generator=self._generator(p.device), **scalars)
        return loss

    @torch.no_grad()
    def eval(self) -> None:
        """Swap every parameter from y to the averaged x (in place; a no-op if already in eval mode)."""
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "z" in state:  # before the first step y == x == z
                        state["y"] = p.detach().clone()
                        p.copy_(schedule_free_eval_point(p, state["z"], group["beta1"]))
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Swap every parameter back from x to y (in place; a no-op if already in train mode)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    state = self.state[p]
                    if "y" in state:
                        p.copy_(state.pop("y"))
                    elif "z" in state:  # eval-mode state from elsewhere: y = (1 - b1) z + b1 x
                        p.copy_(torch.lerp(p.float(), state["z"], 1.0 - group["beta1"]).to(p.dtype))
                group["train_mode"] = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does, then restore z and v to float32 (torch casts them to the param dtype)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for p, i in zip(params, saved_ids, strict=True):
            for key in ("z", "exp_avg_sq"):
                if key in state_dict["state"].get(i, {}):
                    self.state[p][key] = state_dict["state"][i][key].to(device=p.device, dtype=torch.float32)


__all__ = ["AdamWScheduleFree", "HAS_TRITON", "IMPLS", "TRITON_REASON",
           "schedule_free_eval_point", "stochastic_round_bf16"]
