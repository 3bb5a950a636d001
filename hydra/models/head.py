"""The Hydra head (`attn_pool.*` in the checkpoint): per-tag cross-attention over the image tokens.

Why per-tag queries: a single pooled vector has to serve 7,504 tags at once; giving every tag its own
learned query (per attention head) lets each tag look at the patches that matter to it, the "many heads"
the name refers to. After attention comes one shared SwiGLU feed-forward with a residual, and finally a
per-tag SwiGLU output head (a 2048 -> 2 matrix per tag, logit = silu(z0) * z1). docs/formats.md, JTP-3.

Parameter names and layouts are a file format: `q` (H, T, E), `kv.weight` (2A, D) with K rows before V
rows, `ff_norm`, `ff_in.weight` (2F, A) with the activated half first, `ff_out.weight` (A, F), and
`out_proj.weight` (T, A, 2) stored (in, out). Every dimension is read from these shapes.

Speed (the head costs ~0.6 TFLOP per image whatever the image size, almost all of it the feed-forward over
7,504 tags; measured on a 2-core Zen 4 with AVX512-BF16):
- Tags are independent once K and V exist, so they run in chunks of `CHUNK_ROWS` (image, tag) rows: the
  (B, C, 2F) feed-forward activations are reused buffers of a few MB instead of ~0.5 GB of fresh ones per
  image. Same bits; the time gain is small (head alone, one 256-token image, 2 threads: 1.71 s against
  1.77 s in one pass, best of two). On GPUs the chunks are larger (`GPU_CHUNK_ROWS`): there they only
  bound the memory of big batches.
- Folding (`fold`, on for loaded models unless `HYDRA_NO_FOLD=1`): `ff_out` (F -> A) feeds only the residual
  sum that each tag's `out_proj` (A -> 2) reads, so z_t = y_t W_t + ff_out(h_t) W_t = y_t W_t + h_t G_t with
  G_t = ff_out.weight^T W_t, one (F, 2) matrix per tag (`fold_weights`, stored (T, 2, F): 184 MB in bf16).
  That removes the (C, F) x (F, A) matmul (2 T F A = 0.19 TFLOP per image) and keeps the residual term y_t W_t
  through the un-folded `out_proj`. The file's parameters are untouched (training, saving and the strict key
  match see only them); G is derived state, rebuilt whenever `out_proj` or `ff_out` change (extensions).

Shape legend: B = images, S = tokens, D = backbone width, T = tags, H = attention heads, E = head dim,
A = H * E (attention width), F = feed-forward hidden size, C = tags in one chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RMS_EPS = 1e-5  # RMSNorm on q and k: torch's default, no affine weight (not stored in the file)
CHUNK_ROWS = 1024  # (image, tag) rows per step of the forward on CPU; 512-1024 measured best (docstring)
GPU_CHUNK_ROWS = 65536  # elsewhere: 65536 rows of the (rows, 2F) bf16 activations are 1.6 GB
NO_FOLD_ENV = "HYDRA_NO_FOLD"  # "1": run the heads as stored, without folded weights (for comparison)
FOLD_TAGS = 1024  # tags per step when building folded weights: bounds the float32 temporaries (~60 MB)


def fold_enabled() -> bool:
    """False when the environment turns folding off (`HYDRA_NO_FOLD` set to anything but "" or "0")."""
    return os.environ.get(NO_FOLD_ENV, "") in ("", "0")


def fold_matmul(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b with float32 accumulation and one rounding to `dtype` (folded weights).

    On CPUs a bf16 x bf16 matmul already accumulates in float32 and rounds once (oneDNN / torch's cpublas), and
    is 4-5x faster here than upcasting (0.5 s against 2.4 s for JTP-3's fold); elsewhere (CUDA allows reduced-
    precision bf16 reductions) and for other dtypes the product is taken in float32 and then cast.
    """
    if a.device.type == "cpu" and a.dtype == b.dtype == dtype == torch.bfloat16:
        return a @ b
    return (a.float() @ b.float()).to(dtype)


def stamp(*tensors: Tensor) -> tuple:
    """What identifies the current contents of `tensors` (storage, in-place version, shape, dtype, device)."""
    out = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        out.append((t.data_ptr(), version, tuple(t.shape), t.dtype, t.device))
    return tuple(out)


@dataclass(frozen=True)
class HydraCfg:
    """Head dimensions, all derived from the checkpoint's tensor shapes (`from_state`)."""

    n_tags: int        # T
    n_heads: int       # H
    head_dim: int      # E
    input_dim: int     # D, the backbone width
    ff_dim: int        # F, SwiGLU hidden size (6144 for JTP-3)

    @property
    def attn_dim(self) -> int:  # A
        return self.n_heads * self.head_dim

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str = "attn_pool.") -> HydraCfg:
        h, t, e = state[prefix + "q"].shape
        two_a, d = state[prefix + "kv.weight"].shape
        two_f, a = state[prefix + "ff_in.weight"].shape
        assert two_a == 2 * h * e and a == h * e, (state[prefix + "q"].shape, two_a, a)
        return cls(n_tags=t, n_heads=h, head_dim=e, input_dim=d, ff_dim=two_f // 2)


class BatchLinear(nn.Module):
    """One small (in, out) matrix per tag, no bias: weight (T, in, out)."""

    def __init__(self, n: int, d_in: int, d_out: int, **dd):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out, **dd))

    def forward(self, x: Tensor, tags: Tensor | None = None) -> Tensor:
        return per_tag_matmul(x, self.weight if tags is None else self.weight[tags])


def per_tag_matmul(x: Tensor, w: Tensor) -> Tensor:
    """(B, T, n) x (T, n, 2) -> (B, T, 2): a batched matmul over tags, the batch dimension folded into the rows."""
    return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)


class HydraPool(nn.Module):
    """Per-tag cross-attention pool, SwiGLU feed-forward, per-tag SwiGLU output. Returns logits (B, T)."""

    def __init__(self, cfg: HydraCfg, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        a = cfg.attn_dim
        self.q = nn.Parameter(torch.empty(cfg.n_heads, cfg.n_tags, cfg.head_dim, **dd))  # (H, T, E)
        self.kv = nn.Linear(cfg.input_dim, 2 * a, bias=False, **dd)
        self.ff_norm = nn.LayerNorm(a, eps=1e-5, **dd)
        self.ff_in = nn.Linear(a, 2 * cfg.ff_dim, bias=False, **dd)
        self.ff_out = nn.Linear(cfg.ff_dim, a, bias=False, **dd)
        self.out_proj = BatchLinear(cfg.n_tags, a, 2, **dd)
        # The file stores q already RMS-normalised (upstream's loader sets q_normed=True), so inference
        # uses it as stored. Training a new tag sets this False: q is then normalised on every forward.
        self.q_normed = True
        # Folded ff_out x out_proj (module docstring); loaders turn it on, training heads leave it off.
        self.fold = False
        self._folded: tuple[tuple, Tensor] | None = None  # (stamp of the weights it was built from, G)

    @property
    def n_tags(self) -> int:
        return self.q.shape[1]

    def queries(self, tags: Tensor | slice | None = None) -> Tensor:
        q = self.q if tags is None else self.q[:, tags]  # (H, T, E)
        return q if self.q_normed else F.rms_norm(q, (q.shape[-1],), eps=RMS_EPS)

    def forward(self, x: Tensor, patch_valid: Tensor | None = None, tags: Tensor | None = None) -> Tensor:
        """Logits for every tag, or only for `tags`.

        Args:
            x: (B, S, D) final backbone features (after the final LayerNorm).
            patch_valid: (B, S) bool, False for padding tokens; None when nothing is padded.
            tags: optional (T',) long indices: compute only these tags (same numbers, less work); empty: (B, 0).

        Returns:
            (B, T) or (B, T') logits, in the activation dtype.
        """
        b, s, _ = x.shape
        h, e = self.cfg.n_heads, self.cfg.head_dim
        n = self.n_tags if tags is None else len(tags)
        if n == 0:
            return x.new_zeros((b, 0))
        kv = self.kv(x).view(b, s, 2, h, e)  # (B, S, 2, H, E)
        k = F.rms_norm(kv[:, :, 0], (e,), eps=RMS_EPS).transpose(1, 2)  # (B, H, S, E); normed before the transpose
        v = kv[:, :, 1].transpose(1, 2)  # (B, H, S, E)
        # Key-padding mask only: padded keys are excluded, and every query row is valid (no NaNs).
        mask = None if patch_valid is None else patch_valid[:, None, None, :]  # (B, 1, 1, S)
        g = self.folded_weights()  # (T, 2, F) or None
        step = max(1, (CHUNK_ROWS if x.device.type == "cpu" else GPU_CHUNK_ROWS) // b)  # tags per chunk
        chunks = []
        for i in range(0, n, step):
            sel = slice(i, i + step) if tags is None else tags[i:i + step]  # gathered per chunk: bounded copies
            chunks.append(self._tag_logits(self.queries(sel), self.out_proj.weight[sel],
                                           None if g is None else g[sel], k, v, mask))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)  # (B, T)

    def _tag_logits(self, q: Tensor, w: Tensor, g: Tensor | None, k: Tensor, v: Tensor,
                    mask: Tensor | None) -> Tensor:
        """Logits (B, C) for one chunk of tags: q (H, C, E), w (C, A, 2), g (C, 2, F) or None, k / v (B, H, S, E)."""
        b, h, e = k.shape[0], self.cfg.n_heads, self.cfg.head_dim
        attn = F.scaled_dot_product_attention(q.unsqueeze(0).expand(b, -1, -1, -1), k, v,
                                              attn_mask=mask)  # (B, H, C, E)
        y = attn.transpose(1, 2).reshape(b, -1, h * e)  # (B, C, A), (head, dim) order; no query residual
        hidden = swiglu(self.ff_in(self.ff_norm(y)))  # (B, C, F)
        if g is None:
            z = per_tag_matmul(y + self.ff_out(hidden), w)  # (B, C, 2)
        else:  # folded: the residual through out_proj, the feed-forward through G = ff_out^T out_proj
            z = per_tag_matmul(y, w) + per_tag_matmul(hidden, g.transpose(1, 2))  # (B, C, 2)
        return swiglu(z).squeeze(-1)  # (B, C)

    # -- folded weights ---------------------------------------------------------------------------------

    def folded_weights(self) -> Tensor | None:
        """G (T, 2, F) = per tag out_proj_t^T ff_out.weight, in the weights' dtype; None when `fold` is off.

        Built on first use (loaders call this once at load) and rebuilt when `out_proj` or `ff_out` have changed
        since (new tags, a replaced tag, another device or dtype). Never part of the state dict.
        """
        if not self.fold:
            return None
        key = stamp(self.out_proj.weight, self.ff_out.weight)
        if self._folded is None or self._folded[0] != key:
            self._folded = None  # free the old one before building the new one
            self._folded = (key, self._build_folded())
        return self._folded[1]

    def _build_folded(self) -> Tensor:
        w, wo = self.out_proj.weight, self.ff_out.weight  # (T, A, 2), (A, F)
        t, a, _ = w.shape
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable by the CAM's autograd too
            g = torch.empty(t, 2, wo.shape[1], device=w.device, dtype=w.dtype)  # (T, 2, F)
            for i in range(0, t, FOLD_TAGS):
                wt = w[i:i + FOLD_TAGS].transpose(1, 2).reshape(-1, a)  # (2C, A): rows (tag, output)
                g[i:i + FOLD_TAGS] = fold_matmul(wt, wo, w.dtype).view(-1, 2, wo.shape[1])
        return g

    # -- editing the tag set (extensions, training) -------------------------------------------------

    def append_tags(self, q: Tensor, out_proj: Tensor) -> None:
        """Add tags at the end. q: (H, n, E); out_proj: (n, A, 2)."""
        self.q = nn.Parameter(torch.cat([self.q.data, q.to(self.q)], dim=1), requires_grad=False)
        w = torch.cat([self.out_proj.weight.data, out_proj.to(self.out_proj.weight)], dim=0)
        self.out_proj.weight = nn.Parameter(w, requires_grad=False)
        self.cfg = HydraCfg(**{**self.cfg.__dict__, "n_tags": self.q.shape[1]})
        self._folded = None  # rebuilt for the new tag set on the next forward

    def replace_tag(self, index: int, q: Tensor, out_proj: Tensor) -> None:
        """Overwrite one tag's parameters in place. q: (H, 1, E); out_proj: (1, A, 2)."""
        with torch.no_grad():
            self.q[:, index:index + 1] = q.to(self.q)
            self.out_proj.weight[index:index + 1] = out_proj.to(self.out_proj.weight)
        self._folded = None


def swiglu(z: Tensor) -> Tensor:
    """silu(first half) * second half, over the last dimension."""
    a, g = z.chunk(2, dim=-1)
    return F.silu(a) * g
