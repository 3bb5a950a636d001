"""Tests for hydra/train/optim.py: Schedule-Free AdamW (refined, constant C) with bf16 stochastic rounding.

Covers: the PyTorch update against a float64 reference written from the paper's x/y/z equations;
train()/eval() swaps and the checkpoint formula build_extension uses; stochastic rounding properties;
bf16 training on a toy logistic regression; the Triton kernel against the PyTorch update (run under
TRITON_INTERPRET=1 in a subprocess, so no GPU is needed); state_dict save/load; implementation choice.

Run: venv/bin/python -m pytest tests/test_optim.py -q      (add -m "not slow" to skip the Triton run)
"""

import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra.train import optim
from hydra.train.optim import AdamWScheduleFree, schedule_free_eval_point, stochastic_round_bf16

REPO = Path(__file__).resolve().parents[1]
SHAPE = (3, 5)  # small fixed shape for the exact-arithmetic tests


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing between |x| (bf16) and the next larger bf16 value, as float32."""
    a = x.to(torch.bfloat16).abs()
    up = (a.view(torch.int16) + 1).view(torch.bfloat16)
    return up.float() - a.float()


def quadratic_grad(y: torch.Tensor, target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (y - target) * 0.7 + noise


def reference_run(p0, target, noises, *, lr, beta1, beta2, c, wd, warmup, eps):
    """Paper form in float64 with explicit x, y, z and v. Returns (y_{T+1}, x_{T+1}, z_{T+1})."""
    x, z, v, total = p0.double(), p0.double(), torch.zeros_like(p0, dtype=torch.float64), 0.0
    for t, noise in enumerate(noises, start=1):
        y = (1 - beta1) * z + beta1 * x
        g = quadratic_grad(y, target, noise)
        v = beta2 * v + (1 - beta2) * g * g
        gamma = lr * min(1.0, t / warmup)
        total += gamma**2
        ck = min(gamma**2 / total * (1 - beta1) * c, 1.0)
        z = z - gamma * (g / ((v / (1 - beta2**t)).sqrt() + eps) + wd * y)
        x = (1 - ck) * x + ck * z
    return (1 - beta1) * z + beta1 * x, x, z


@pytest.mark.parametrize("c", [10.0, 200.0], ids=["C=1/(1-beta1)", "C=200"])
def test_torch_update_matches_float64_reference(c):
    torch.manual_seed(0)
    hp = dict(lr=0.05, beta1=0.9, beta2=0.999, c=c, wd=0.1, warmup=8, eps=1e-8)
    p0, target = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    noises = [0.3 * torch.randn(SHAPE, dtype=torch.float64) for _ in range(40)]
    y_ref, x_ref, z_ref = reference_run(p0, target, noises, **hp)

    p = p0.float().requires_grad_()
    opt = AdamWScheduleFree([p], lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], c=c,
                            weight_decay=hp["wd"], warmup_steps=hp["warmup"], eps=hp["eps"], impl="torch")
    for noise in noises:
        p.grad = quadratic_grad(p.detach().double(), target, noise).float()
        opt.step()
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.detach().double(), y_ref, **tol)
    torch.testing.assert_close(opt.state[p]["z"].double(), z_ref, **tol)
    opt.eval()
    torch.testing.assert_close(p.detach().double(), x_ref, **tol)
    assert not torch.allclose(x_ref, y_ref, atol=1e-3), "x and y should differ, or the test proves little"


def named_setup(dtype, steps=5, **kw):
    """Two named tensors shaped like train_extension's q and out_proj.weight (smaller), a few steps."""
    torch.manual_seed(1)
    q = torch.randn(4, 1, 8).to(dtype).requires_grad_()
    w = (0.1 * torch.randn(1, 16, 2)).to(dtype).requires_grad_()
    groups = [{"params": [("attn_pool.q", q), ("attn_pool.out_proj.weight", w)]}]
    # c=2 keeps the averaging weight below 1 from step 2 on, so x, y and z differ after a few steps.
    opt = AdamWScheduleFree(groups, lr=1e-2, c=2.0, warmup_steps=3, seed=0, impl="torch", **kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for t in (q, w):
            t.grad = torch.randn(t.shape, generator=gen).to(dtype)
        opt.step()
    return opt, {"attn_pool.q": q, "attn_pool.out_proj.weight": w}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_eval_round_trip_restores_y_exactly(dtype):
    opt, params = named_setup(dtype)
    y = {k: v.detach().clone() for k, v in params.items()}
    opt.eval()
    opt.eval()  # idempotent
    for k, p in params.items():
        expected = schedule_free_eval_point(y[k], opt.state[p]["z"], 0.9)
        assert torch.equal(p.detach(), expected), k
        assert not torch.equal(p.detach(), y[k]), k
    opt.train()
    opt.train()
    for k, p in params.items():
        assert torch.equal(p.detach(), y[k]), k
    assert all(g["train_mode"] for g in opt.param_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_formula_reproduces_eval_params(dtype):
    """What build_extension does before writing: x = lerp(y, z, 1 - 1/beta1) from a train-mode save."""
    opt, params = named_setup(dtype)
    sd = opt.state_dict()
    (group,) = sd["param_groups"]
    assert group["train_mode"] and group["beta1"] == 0.9
    assert group["param_names"] == ["attn_pool.q", "attn_pool.out_proj.weight"]
    rebuilt = {}
    for name, idx in zip(group["param_names"], group["params"]):
        y, z = params[name].detach(), sd["state"][idx]["z"]
        assert z.shape == y.shape and z.dtype == torch.float32
        rebuilt[name] = torch.lerp(y.float(), z, 1 - 1 / group["beta1"]).to(y.dtype)
    opt.eval()
    for name, p in params.items():
        assert torch.equal(rebuilt[name], p.detach()), name


def test_step_in_eval_mode_raises():
    opt, _ = named_setup(torch.float32, steps=1)
    opt.eval()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step()


def test_eval_before_first_step_is_identity():
    p = torch.randn(SHAPE, requires_grad=True)
    p0 = p.detach().clone()
    opt = AdamWScheduleFree([p], impl="torch")
    opt.eval()
    assert torch.equal(p.detach(), p0) and not opt.param_groups[0]["train_mode"]
    opt.train()
    assert torch.equal(p.detach(), p0)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    n = 20000
    for lo_val, frac in [(1.0, 0.3), (-3.5, 0.75), (1e-20, 0.5), (12345.0, 0.1)]:
        lo = torch.tensor(lo_val, dtype=torch.bfloat16)
        ulp = bf16_ulp(lo)
        x = lo.float() + math.copysign(1, lo_val) * frac * ulp  # strictly between lo and its neighbour
        hi = (lo.float() + math.copysign(1, lo_val) * ulp).to(torch.bfloat16)
        out = stochastic_round_bf16(x.expand(n).contiguous(), gen)
        assert bool(((out == lo) | (out == hi)).all()), (lo_val, out.unique())
        p_hi = (out == hi).double().mean().item()
        assert abs(p_hi - frac) < 4 * math.sqrt(frac * (1 - frac) / n), (lo_val, p_hi, frac)


def test_stochastic_rounding_exact_for_bf16_values_and_specials():
    gen = torch.Generator().manual_seed(0)
    exact = torch.randn(1000).to(torch.bfloat16).float()
    edges = torch.tensor([0.0, -0.0, 3.3895313892515355e38, -(2.0**-130)])  # largest finite, a subnormal
    exact = torch.cat([exact, edges])
    for _ in range(5):
        out = stochastic_round_bf16(exact, gen)
        assert torch.equal(out.float(), exact)
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -float("nan")])
    out = stochastic_round_bf16(special.expand(100, 4).contiguous(), gen).float()
    assert bool((out[:, 0] == float("inf")).all() and (out[:, 1] == float("-inf")).all())
    assert bool(out[:, 2:].isnan().all())


def logistic_run(dtype, steps=300):
    """Full-batch logistic regression on fixed synthetic data; returns (final fp32 loss, weights)."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(512, 16, generator=gen)
    w_true = torch.randn(16, generator=gen)
    labels = (feats @ w_true + 0.5 * torch.randn(512, generator=gen) > 0).float()
    w = torch.zeros(16, dtype=dtype, requires_grad=True)
    opt = AdamWScheduleFree([w], lr=0.05, warmup_steps=20, weight_decay=1e-3, seed=0, impl="torch")
    loss_fn = lambda w_: torch.nn.functional.binary_cross_entropy_with_logits(feats @ w_.float(), labels)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w).backward()
        opt.step()
    opt.eval()
    with torch.no_grad():
        return loss_fn(w).item(), w.detach().float()


def test_bf16_training_converges_close_to_fp32():
    loss32, w32 = logistic_run(torch.float32)
    loss16, w16 = logistic_run(torch.bfloat16)
    assert loss32 < 0.35 * math.log(2), loss32  # well below the loss at w = 0
    assert abs(loss16 - loss32) < 0.01, (loss16, loss32)
    assert (w16 - w32).abs().max().item() < 0.05 * w32.abs().max().item(), (w16, w32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_save_load_continues_identically(dtype):
    opt_a, params_a = named_setup(dtype, stochastic_rounding=False)
    buf = io.BytesIO()
    torch.save({"optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["optimizer"]

    params_b = {k: v.detach().clone().requires_grad_() for k, v in params_a.items()}
    opt_b = AdamWScheduleFree([{"params": list(params_b.items())}], lr=123.0, impl="torch",
                              stochastic_rounding=False)
    opt_b.load_state_dict(saved)
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.param_groups[0]["step"] == 5
    for p in params_b.values():
        assert {opt_b.state[p][k].dtype for k in ("z", "exp_avg_sq")} == {torch.float32}
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        for k in params_a:
            g = torch.randn(params_a[k].shape, generator=gen).to(dtype)
            params_a[k].grad, params_b[k].grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for k in params_a:
        assert torch.equal(params_a[k].detach(), params_b[k].detach()), k
        assert torch.equal(opt_a.state[params_a[k]]["z"], opt_b.state[params_b[k]]["z"]), k


def test_impl_choice_is_explicit(monkeypatch):
    p = torch.zeros(2, requires_grad=True)
    monkeypatch.delenv("HYDRA_OPTIM_IMPL", raising=False)
    opt = AdamWScheduleFree([p])
    assert opt.impl in optim.IMPLS and opt.impl_reason
    if not p.is_cuda:
        assert opt.impl == "torch"
    monkeypatch.setenv("HYDRA_OPTIM_IMPL", "bogus")
    with pytest.raises(ValueError, match="torch, triton"):
        AdamWScheduleFree([p])
    monkeypatch.setenv("HYDRA_OPTIM_IMPL", "triton")
    monkeypatch.setattr(optim, "HAS_TRITON", False)
    monkeypatch.setattr(optim, "TRITON_REASON", "no CUDA device")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        AdamWScheduleFree([p])
    monkeypatch.setenv("HYDRA_OPTIM_IMPL", "torch")
    assert AdamWScheduleFree([p]).impl_reason == "forced by HYDRA_OPTIM_IMPL"


# Runs in a fresh interpreter: TRITON_INTERPRET must be set before hydra.train.optim decorates its kernel.
TRITON_SCRIPT = r"""
import torch
from hydra.train import optim
assert optim.HAS_TRITON, optim.TRITON_REASON

def ulp(x):
    a = x.to(torch.bfloat16).abs()
    return (a.view(torch.int16) + 1).view(torch.bfloat16).float() - a.float()

def pair(dtype, sr, steps):
    torch.manual_seed(0)
    p0 = torch.randn(32, 1, 64).to(dtype)  # train_extension's q shape; 2048 elements = 2 programs
    pa, pb = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    kw = dict(lr=1e-2, warmup_steps=2, weight_decay=0.1, stochastic_rounding=sr, seed=1)
    oa = optim.AdamWScheduleFree([pa], impl="torch", **kw)
    ob = optim.AdamWScheduleFree([pb], impl="triton", **kw)
    assert ob.impl == "triton"
    for _ in range(steps):
        g = torch.randn(p0.shape).to(dtype)
        pa.grad, pb.grad = g.clone(), g.clone()
        oa.step(); ob.step()
    for key in ("z", "exp_avg_sq"):
        torch.testing.assert_close(ob.state[pb][key], oa.state[pa][key], rtol=1e-6, atol=1e-7)
    return pa.detach().float(), pb.detach().float()

a, b = pair(torch.float32, True, steps=4)
torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
a, b = pair(torch.bfloat16, False, steps=4)  # round to nearest: equal up to fp32-ulp ties
assert bool(((a - b).abs() <= ulp(torch.maximum(a.abs(), b.abs()))).all()) and (a == b).float().mean() > 0.99
a, b = pair(torch.bfloat16, True, steps=1)  # different random bits: each one of the two neighbours
assert bool(((a - b).abs() <= ulp(torch.maximum(a.abs(), b.abs()))).all()) and (a != b).any()

# Kernel rounding alone: with y = 0, g = 0, c = 1 the fp32 result is exactly z, so z's rounding shows.
def kernel_round(values, rounding, n=4096):
    z = values.repeat_interleave(n).contiguous()
    p = torch.zeros_like(z, dtype=torch.bfloat16)
    scalars = dict(avg_weight=1.0, lr=0.0, y_grad_coef=0.0, beta2=0.999, bias_correction2=1.0, eps=1e-8,
                   weight_decay=0.0)
    optim._update_triton(p, torch.zeros_like(z), z.clone(), torch.zeros_like(z), rounding=rounding, seed=7,
                         **scalars)
    return p.view(len(values), n).float()

lo = torch.tensor([1.0, -3.5, 12345.0]).to(torch.bfloat16).float()
frac = torch.tensor([0.3, 0.75, 0.1])
x = lo + torch.sign(lo) * frac * ulp(lo)
out = kernel_round(x, rounding=2)
hi = lo + torch.sign(lo) * ulp(lo)
assert bool(((out == lo[:, None]) | (out == hi[:, None])).all())
p_hi = (out == hi[:, None]).double().mean(1)
assert ((p_hi - frac).abs() < 4 * (frac * (1 - frac) / 4096) ** 0.5).all(), (p_hi, frac)
assert torch.equal(kernel_round(x, rounding=1), x.to(torch.bfloat16).float()[:, None].expand(3, 4096))
specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 1.5, -2.0**-130])
for rounding in (1, 2):
    out = kernel_round(specials, rounding, n=64)
    assert bool((out[0] == float("inf")).all() and (out[1] == float("-inf")).all() and out[2].isnan().all())
    assert bool((out[3] == 1.5).all() and (out[4] == -2.0**-130).all())
print("OK")
"""


@pytest.mark.slow
def test_triton_kernel_matches_torch_under_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO), "HYDRA_OPTIM_IMPL": ""}
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr
