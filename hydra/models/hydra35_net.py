"""Hydra 3.5 (`naflexvit_so400m_patch16_siglip+rr_hydra2`): the network, and strict loading of its file.

RedRocket's successor to JTP-3 keeps the SigLIP2 So400m/16 NaFlex backbone (timm key names, LayerNorm eps
1e-5 instead of timm's 1e-6) and changes the head:

- `Hydra2Pool` (`attn_pool.*`): per-tag queries cross-attend to the image tokens as in JTP-3, then a
  SpGLU feed-forward (softplus gate, non-affine LayerNorm) with a residual, then `mid_blocks` refinement
  blocks: each projects the pooled vectors to new RMS-normed queries, attends again over the *same* K and
  V, adds an output projection, and applies a second feed-forward. Output: one A-vector per tag.
- `LinearHead` (`head.weight`): logit = dot product of a tag's pooled vector with its own weight row.

The file also carries the label table (tag, category, direct implications) and the per-tag validation
counts, so no side files are needed. Everything that is not in the file (eps values, activation,
layouts) follows the released model's code: K and the mid-block queries are RMS-normed (eps 1e-5, no
weight), the stored q is used as is, the FF LayerNorms have no weight or bias, SpGLU(z) = softplus(first
half) * second half. Upstream applies a float32 sigmoid inside the model; `Hydra35Model.logits` returns
the logits in the run dtype and callers apply the same float32 sigmoid, which gives the same numbers.

Loading mirrors `hydra/models/jtp3_net.py`: the network is built on the meta device and the file's tensors
(copy-on-write memory maps in the stored dtype) are assigned into it after a strict key/shape check.

Shape legend: B = images, S = tokens (padded), P = 768 patch values, D = backbone width, T = tags (T' a
selected subset), H = attention heads, E = head dim, A = H * E (attention width), F = feed-forward hidden
size, C = tags in one chunk, n = validation thresholds per tag.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from hydra.models import head as jtp3_head
from hydra.models.backbone import create_backbone
from hydra.models.checkpoint import ARCHITECTURE as JTP3_ARCHITECTURE
from hydra.models.checkpoint import (
    HYDRA35_ARCHITECTURE,
    KEY_ARCHITECTURE,
    KEY_LABELS,
    CheckpointError,
    check_state,
    load_tensors,
    parse_backbone_overrides,
    read_metadata,
)
from hydra.models.naflex import NaFlexTagModel

if TYPE_CHECKING:
    from hydra.models.extensions import Extension
    from hydra.models.extensions_v2 import ExtensionV2
    from hydra.tags.rules import TagMetadata

ARCHITECTURE = HYDRA35_ARCHITECTURE
KEY_TITLE = "modelspec.title"           # required: v2 extensions name their base model by it
KEY_BACKGROUND = "classifier.background"
KEY_RESIZE = "classifier.resize"
KEY_VALIDATION = "validation"           # the one tensor that is not a parameter
BACKGROUNDS = {"black": 0, "grey": 127, "white": 255}  # alpha is flattened onto this grey level
RESIZES = ("lanczos", "mks2013-linear")  # LANCZOS3 in sRGB / Magic Kernel Sharp 2013 in linear light
LN_EPS = 1e-5                          # every LayerNorm, backbone and pool: torch's default, as upstream
RMS_EPS = jtp3_head.RMS_EPS            # RMSNorm on K and on the mid-block queries, no weight
# Tags are independent once K and V exist, so they run in chunks of (image, tag) rows; this bounds the
# (rows, 2F) feed-forward activations (T x 10240 bf16 is 182 MB per image in one pass). JTP-3's sizes:
# its head has the same structure and a similar width (2F = 12288 there, 10240 here).
CHUNK_ROWS = jtp3_head.CHUNK_ROWS
GPU_CHUNK_ROWS = jtp3_head.GPU_CHUNK_ROWS
_MID_BLOCK_KEY = re.compile(r"mid_blocks\.(\d+)\.")


OWN_CATEGORY_IDS = 100  # category ids for the names a file uses beyond e621's (e621's are 0..8)

@dataclass(frozen=True)
class Hydra2Cfg:
    """Pool dimensions, all derived from the file's tensor shapes (`from_state`)."""

    # per-tag queries
    n_tags: int       # T
    n_heads: int      # H (32 in Hydra 3.5)
    head_dim: int     # E (64)
    # widths
    input_dim: int    # D, the backbone width (1152)
    ff_dim: int       # F, SpGLU hidden size (5120)
    # depth
    mid_blocks: int   # refinement blocks after the first feed-forward (1); 0 would be JTP-3's variant

    @property
    def attn_dim(self) -> int:  # A
        return self.n_heads * self.head_dim

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str = "attn_pool.") -> Hydra2Cfg:
        """Read the dimensions from a state dict with the file's key names.

        Raises:
            KeyError: a required pool tensor is missing.
            AssertionError: the shapes do not fit together (the message shows them).
        """
        q, kv = state[prefix + "q"].shape, state[prefix + "kv.weight"].shape
        ff_in, ff_out = state[prefix + "ff.proj_in.weight"].shape, state[prefix + "ff.proj_out.weight"].shape
        assert len(q) == 3 and len(kv) == 2 and len(ff_in) == 2 and len(ff_out) == 2, (q, kv, ff_in, ff_out)
        h, t, e = q
        a = h * e
        assert kv[0] == 2 * a, f"kv.weight {tuple(kv)} must have 2 * H * E rows for q {tuple(q)}"
        assert ff_in[1] == a and ff_in[0] % 2 == 0, f"ff.proj_in.weight {tuple(ff_in)} must be (2F, {a})"
        assert tuple(ff_out) == (a, ff_in[0] // 2), f"ff.proj_out.weight {tuple(ff_out)} must be ({a}, F) " \
                                                    f"for ff.proj_in.weight {tuple(ff_in)}"
        found = {int(m.group(1)) for k in state if k.startswith(prefix) and (m := _MID_BLOCK_KEY.match(k, len(prefix)))}
        assert found == set(range(len(found))), f"mid_blocks indices {sorted(found)} are not 0..n-1"
        return cls(n_tags=t, n_heads=h, head_dim=e, input_dim=kv[1], ff_dim=ff_in[0] // 2, mid_blocks=len(found))


def spglu(z: Tensor) -> Tensor:
    """softplus(first half) * second half, over the last dimension (torch softplus: beta 1, threshold 20)."""
    a, g = z.chunk(2, dim=-1)
    return F.softplus(a) * g


class SpGLUFF(nn.Module):
    """`proj_out(SpGLU(proj_in(LayerNorm(x))))`: LayerNorm without weight or bias, no biases anywhere."""

    def __init__(self, dim: int, ff_dim: int, **dd):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=False, **dd)  # no tensors in the file
        self.proj_in = nn.Linear(dim, 2 * ff_dim, bias=False, **dd)  # rows: softplus half, then linear half
        self.proj_out = nn.Linear(ff_dim, dim, bias=False, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj_out(spglu(self.proj_in(self.norm(x))))  # (..., 2F) -> (..., F) -> (..., A)


class MidBlock(nn.Module):
    """Refine the pooled vectors: new queries from them, a second look at the image, a second FF."""

    def __init__(self, cfg: Hydra2Cfg, **dd):
        super().__init__()
        self.cfg = cfg
        a = cfg.attn_dim
        self.q_proj = nn.Linear(a, a, bias=False, **dd)
        self.o_proj = nn.Linear(a, a, bias=False, **dd)
        self.ff = SpGLUFF(a, cfg.ff_dim, **dd)

    def forward(self, y: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """y: (B, C, A) pooled vectors; k / v: (B, H, S, E); mask: (B, 1, 1, S) or None. Returns (B, C, A)."""
        y = self.attend(y, k, v, mask)  # (B, C, A)
        return y + self.ff(y)  # (B, C, A)

    def attend(self, y: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """The block up to its feed-forward: y + o_proj(attention of the new queries). Returns (B, C, A)."""
        b, c, _ = y.shape
        h, e = self.cfg.n_heads, self.cfg.head_dim
        # RMS-normed over E before the transpose: the same numbers, in one contiguous pass (5x faster on CPU)
        q = F.rms_norm(self.q_proj(y).view(b, c, h, e), (e,), eps=RMS_EPS).transpose(1, 2)  # (B, H, C, E)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, C, E)
        return y + self.o_proj(o.transpose(1, 2).reshape(b, c, h * e))  # (B, C, A)


class Hydra2Pool(nn.Module):
    """Per-tag cross-attention pool with SpGLU feed-forwards and mid-blocks. Returns (B, T, A) vectors.

    Why per-tag queries: one pooled vector would have to serve ~9k tags at once; a learned query per tag
    (and attention head) lets each tag look at the patches that matter to it. The mid-blocks then let a
    tag re-query the image with what its first look found.
    """

    def __init__(self, cfg: Hydra2Cfg, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        assert cfg.mid_blocks >= 1, f"mid_blocks = {cfg.mid_blocks}: that is JTP-3's pool (SwiGLU, affine LN)"
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        a = cfg.attn_dim
        self.q = nn.Parameter(torch.empty(cfg.n_heads, cfg.n_tags, cfg.head_dim, **dd))  # (H, T, E), as stored
        self.kv = nn.Linear(cfg.input_dim, 2 * a, bias=False, **dd)  # rows: K (head-major), then V
        self.ff = SpGLUFF(a, cfg.ff_dim, **dd)
        self.mid_blocks = nn.ModuleList(MidBlock(cfg, **dd) for _ in range(cfg.mid_blocks))

    @property
    def n_tags(self) -> int:
        return self.q.shape[1]

    def forward(self, x: Tensor, patch_valid: Tensor | None = None, tags: Tensor | None = None) -> Tensor:
        """Pooled vectors for every tag, or only for `tags` (training and the tests; inference runs `logits`).

        Args:
            x: (B, S, D) final backbone features (after the final LayerNorm).
            patch_valid: (B, S) bool, False for padding tokens; None when nothing is padded.
            tags: optional (T',) long indices: compute only these tags (same numbers, less work).

        Returns:
            (B, T, A) or (B, T', A) in the activation dtype.
        """
        k, v, mask = self.keys_values(x, patch_valid)
        chunks = [self._pool_chunk(self.q[:, sel], k, v, mask) for sel in self._chunks(x, tags)]
        if not chunks:
            return x.new_zeros((x.shape[0], 0, self.cfg.attn_dim))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)  # (B, T', A)

    def logits(self, x: Tensor, patch_valid: Tensor | None, head_weight: Tensor, folded: Tensor | None = None,
               tags: Tensor | None = None) -> Tensor:
        """Logits (B, T) or (B, T') straight from backbone features, chunk by chunk: the (B, T, A) pooled vectors
        never exist at once (8 images x 8,886 tags x 2048 in bf16 would be 291 MB, and twice that in a cat).

        Args:
            head_weight: (T, A), the LinearHead's rows.
            folded: (T, F) = head_weight @ the last mid-block's ff.proj_out.weight (`Hydra35Model.folded_head`),
                or None to run that feed-forward's output projection as stored.
            tags: optional (T',) long indices; empty gives (B, 0).
        """
        k, v, mask = self.keys_values(x, patch_valid)
        out = []
        for sel in self._chunks(x, tags):
            y = self._pool_chunk(self.q[:, sel], k, v, mask, last_ff=folded is None)  # (B, C, A)
            logit = torch.linalg.vecdot(y, head_weight[sel])  # (B, C): the residual term, as upstream's head
            if folded is not None:  # + w_t . proj_out(SpGLU(...)) = SpGLU(...) . g_t
                last = self.mid_blocks[-1].ff
                hidden = spglu(last.proj_in(last.norm(y)))  # (B, C, F)
                logit = logit + torch.bmm(hidden.transpose(0, 1), folded[sel].unsqueeze(-1)).squeeze(-1).T
            out.append(logit)
        if not out:
            return x.new_zeros((x.shape[0], 0))
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)  # (B, T')

    def keys_values(self, x: Tensor, patch_valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """K (RMS-normed) and V (B, H, S, E) of the image tokens, and the key-padding mask (B, 1, 1, S) or None."""
        b, s, _ = x.shape
        h, e = self.cfg.n_heads, self.cfg.head_dim
        kv = self.kv(x).view(b, s, 2, h, e)  # (B, S, 2, H, E)
        k = F.rms_norm(kv[:, :, 0], (e,), eps=RMS_EPS).transpose(1, 2)  # (B, H, S, E); normed before the transpose
        # Key-padding mask only: padded keys are excluded; every query is a tag, so no row is empty.
        mask = None if patch_valid is None else patch_valid[:, None, None, :]  # (B, 1, 1, S)
        return k, kv[:, :, 1].transpose(1, 2), mask

    def _chunks(self, x: Tensor, tags: Tensor | None) -> list[slice | Tensor]:
        """The tag selection of each chunk: slices of all tags, or pieces of `tags` (gathered chunk by chunk)."""
        step = max(1, (CHUNK_ROWS if x.device.type == "cpu" else GPU_CHUNK_ROWS) // x.shape[0])  # tags per chunk
        n = self.n_tags if tags is None else len(tags)
        return [slice(i, i + step) if tags is None else tags[i:i + step] for i in range(0, n, step)]

    def _pool_chunk(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, last_ff: bool = True) -> Tensor:
        """Pooled vectors (B, C, A) for one chunk of tags: q (H, C, E), k / v (B, H, S, E). Without `last_ff` the
        last mid-block stops before its feed-forward (the folded head adds that term)."""
        b, h, e = k.shape[0], self.cfg.n_heads, self.cfg.head_dim
        attn = F.scaled_dot_product_attention(q.unsqueeze(0).expand(b, -1, -1, -1), k, v,
                                              attn_mask=mask)  # (B, H, C, E), scale 1/sqrt(E)
        y = attn.transpose(1, 2).reshape(b, -1, h * e)  # (B, C, A), (head, dim) order; no query residual
        y = y + self.ff(y)  # (B, C, A)
        last = len(self.mid_blocks) - 1
        for i, block in enumerate(self.mid_blocks):
            y = block(y, k, v, mask) if last_ff or i < last else block.attend(y, k, v, mask)  # (B, C, A)
        return y

    # -- editing the tag set (extensions, training) -------------------------------------------------

    def append_tags(self, q: Tensor) -> None:
        """Add tags at the end. q: (H, n, E)."""
        self.q = nn.Parameter(torch.cat([self.q.data, q.to(self.q)], dim=1), requires_grad=False)
        self.cfg = Hydra2Cfg(**{**self.cfg.__dict__, "n_tags": self.q.shape[1]})

    def replace_tag(self, index: int, q: Tensor) -> None:
        """Overwrite one tag's query in place. q: (H, 1, E)."""
        with torch.no_grad():
            self.q[:, index:index + 1] = q.to(self.q)


class LinearHead(nn.Module):
    """One weight row per tag; logit = dot product with the tag's pooled vector, no bias."""

    def __init__(self, n_tags: int, dim: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_tags, dim, device=device, dtype=dtype))  # (T, A)

    def forward(self, y: Tensor, tags: Tensor | None = None) -> Tensor:
        """Logits (B, T') from pooled vectors y (B, T', A); `tags` selects the rows y was computed for."""
        w = self.weight if tags is None else self.weight[tags]  # (T', A)
        return torch.linalg.vecdot(y, w)  # (B, T'), in the activation dtype as upstream

    def append_tags(self, weight: Tensor) -> None:
        """Add tags at the end. weight: (n, A)."""
        self.weight = nn.Parameter(torch.cat([self.weight.data, weight.to(self.weight)], dim=0), requires_grad=False)

    def replace_tag(self, index: int, weight: Tensor) -> None:
        """Overwrite one tag's row in place. weight: (1, A)."""
        with torch.no_grad():
            self.weight[index:index + 1] = weight.to(self.weight)


def build_hydra35_net(cfg: Hydra2Cfg, backbone: dict | None = None, device: str | torch.device = "meta",
                      dtype: torch.dtype | None = None) -> NaFlexVit:
    """An uninitialised Hydra 3.5 network (default: on the meta device): timm's NaFlexVit with upstream's
    LayerNorm eps, `attn_pool` = Hydra2Pool and `head` = LinearHead, so its state-dict keys are the file's.

    Use `Hydra35Model.logits`, not `net(...)`: timm's own forward would call the pool with its own
    arguments.

    Args:
        cfg: pool dimensions (`Hydra2Cfg.from_state` for a file).
        backbone: timm overrides for small test models (`hydra.backbone` metadata); None = the real size.
    """
    net = create_backbone(backbone, device=device, dtype=dtype)
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    # norm1 and norm2 of every block, and the final norm: upstream's own ViT keeps torch's 1e-5 (JTP-3, and
    # so create_backbone, keeps timm's 1e-6). Counted so a timm change cannot leave one behind silently.
    assert len(norms) == 2 * len(net.blocks) + 1, (len(norms), len(net.blocks))
    for m in norms:
        m.eps = LN_EPS
    net.attn_pool = Hydra2Pool(cfg, device=device, dtype=dtype)
    net.head = LinearHead(cfg.n_tags, cfg.attn_dim, device=device, dtype=dtype)
    return net


@dataclass(kw_only=True)
class Hydra35Model(NaFlexTagModel):
    """A loaded Hydra 3.5 network with its label table (model order) and validation counts.

    Batches, features, `logits` and `sample_logits` come from `NaFlexTagModel` (shared with JTP-3); this
    class adds the part after the backbone (`head_logits`) and the file's tag data.
    """

    # inherited: net (`attn_pool` = Hydra2Pool, `head` = LinearHead), labels, path, metadata, extensions
    categories: list[str]               # category name per label ("general", "species", ...)
    implies: list[tuple[str, ...]]      # direct implications per label, as in the file (may name non-labels)
    validation: np.ndarray              # (T, n, 4) [tp, fp, tn, fn] at thresholds (i + 1) / (n + 1)
    background: str = "black"           # a key of BACKGROUNDS: alpha is flattened onto this colour
    resize: str = "lanczos"             # one of RESIZES
    fold: bool = False                  # run the head with `folded_head` (loaders: on unless HYDRA_NO_FOLD=1)
    _folded: tuple | None = field(default=None, repr=False, compare=False)  # (weights' stamp, (T, F) tensor)

    @property
    def tag_metadata(self) -> TagMetadata:
        """Categories (e621 ids; any other name the file uses gets an id of its own, in `names`) and direct
        implications, as the file lists them."""
        from hydra.models.vocab import E621_CATEGORY_NAMES, UNASSIGNED
        from hydra.tags.rules import TagMetadata

        ids = {name: i for i, name in E621_CATEGORY_NAMES.items() if i != UNASSIGNED}
        meta = TagMetadata()
        for tag, category, implied in zip(self.labels, self.categories, self.implies):
            if category not in ids:  # upstream accepts any string as a category; -B and -C match it by name
                ids[category] = OWN_CATEGORY_IDS + len(meta.names)
                meta.names[ids[category]] = category
            meta.add(tag, ids[category], implied)
        return meta

    @property
    def title(self) -> str:
        """modelspec.title (required by the loader): v2 extensions must name it in classifier.model."""
        return self.metadata[KEY_TITLE]

    @property
    def pool(self) -> Hydra2Pool:
        return self.net.attn_pool

    def head_logits(self, x: Tensor, patch_valid: Tensor | None, tags: Tensor | None = None) -> Tensor:
        """Logits from backbone features; differentiable w.r.t. `x` outside inference mode (the CAM).

        The float32 sigmoid of these is upstream's output (it applies the sigmoid inside the model).

        Args:
            x: (B, S, D) final-LayerNorm features (or any block's output, for the CAM).
            patch_valid: (B, S) bool, or None when nothing is padded.
            tags: optional (T',) long indices.

        Returns:
            (B, T) or (B, T') logits in the activation dtype.
        """
        return self.pool.logits(x, patch_valid, self.net.head.weight, self.folded_head(), tags)

    def folded_head(self) -> Tensor | None:
        """(T, F) = head.weight @ the last mid-block's ff.proj_out.weight, or None when `fold` is off.

        logit_t = w_t . (y_t + proj_out(h_t)) = w_t . y_t + h_t . g_t: the 5120 -> 2048 projection of every tag's
        last feed-forward (2 T F A = 0.19 TFLOP per image) becomes one 5120-vector per tag (91 MB in bf16), and
        the residual term still goes through the stored head row. Built once at load and rebuilt when the head
        or the projection change (extensions, another device); never in the state dict.
        """
        if not self.fold:
            return None
        w, proj = self.net.head.weight, self.pool.mid_blocks[-1].ff.proj_out.weight  # (T, A), (A, F)
        key = jtp3_head.stamp(w, proj)
        if self._folded is None or self._folded[0] != key:
            self._folded = None  # free the old one first
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: the CAM's autograd may use it
                g = torch.empty(w.shape[0], proj.shape[1], device=w.device, dtype=w.dtype)
                for i in range(0, w.shape[0], jtp3_head.FOLD_TAGS):
                    g[i:i + jtp3_head.FOLD_TAGS] = jtp3_head.fold_matmul(w[i:i + jtp3_head.FOLD_TAGS], proj, w.dtype)
            self._folded = (key, g)
        return self._folded[1]

    # -- editing the tag set (extensions, training) -------------------------------------------------

    def append_tags(self, labels: Sequence[str], categories: Sequence[str], implies: Sequence[tuple[str, ...]],
                    q: Tensor, head_weight: Tensor, validation: np.ndarray) -> None:
        """Add n tags at the end. q: (H, n, E); head_weight: (n, A); validation: (n, n_thresholds, 4)."""
        assert len(labels) == len(categories) == len(implies) == q.shape[1] == head_weight.shape[0] \
            == validation.shape[0], (len(labels), len(categories), len(implies), q.shape, head_weight.shape,
                                     validation.shape)
        self.pool.append_tags(q)
        self.net.head.append_tags(head_weight)
        self.labels += labels
        self.categories += categories
        self.implies += [tuple(i) for i in implies]
        self.validation = np.concatenate([self.validation, validation.astype(self.validation.dtype)])

    def replace_tag(self, index: int, q: Tensor, head_weight: Tensor, validation: np.ndarray,
                    category: str | None = None, implies: tuple[str, ...] | None = None) -> None:
        """Overwrite one tag's parameters and validation rows (and category / implications if given).

        q: (H, 1, E); head_weight: (1, A); validation: (n_thresholds, 4).
        """
        self.pool.replace_tag(index, q)
        self.net.head.replace_tag(index, head_weight)
        self.validation[index] = validation
        if category is not None:
            self.categories[index] = category
        if implies is not None:
            self.implies[index] = tuple(implies)


def parse_labels(path: str | os.PathLike, text: str) -> tuple[list[str], list[str], list[tuple[str, ...]]]:
    """Split `classifier.labels`: rows joined by "\\n", fields by single spaces: `tag category implied...`.

    Returns:
        (labels, categories, implies), in row order.

    Raises:
        CheckpointError: an empty row (e.g. a trailing newline), an empty field (two spaces), a row without
            a category, or a repeated tag; the message gives the 1-based row number.
    """
    labels: list[str] = []
    categories: list[str] = []
    implies: list[tuple[str, ...]] = []
    rows: dict[str, int] = {}
    for n, row in enumerate(text.split("\n"), 1):
        fields = row.split(" ")
        if not row:
            raise CheckpointError(f"{path}: metadata {KEY_LABELS} row {n} is empty (trailing newline?)")
        if "" in fields:
            raise CheckpointError(f"{path}: metadata {KEY_LABELS} row {n} {row!r} has an empty field "
                                  f"(fields are separated by single spaces)")
        if len(fields) < 2:
            raise CheckpointError(f"{path}: metadata {KEY_LABELS} row {n} {row!r} has no category "
                                  f"(expected 'tag category [implied ...]')")
        if fields[0] in rows:
            raise CheckpointError(f"{path}: metadata {KEY_LABELS} rows {rows[fields[0]]} and {n} both define "
                                  f"tag {fields[0]!r}")
        rows[fields[0]] = n
        labels.append(fields[0])
        categories.append(fields[1])
        implies.append(tuple(fields[2:]))
    return labels, categories, implies


def _choice(path: str | os.PathLike, meta: dict[str, str], key: str, choices: Sequence[str]) -> str:
    value = meta.get(key, choices[0])
    if value not in choices:
        raise CheckpointError(f"{path}: metadata {key} = {value!r}; valid values: {', '.join(choices)}")
    return value


def _check_header(path: str | os.PathLike, meta: dict[str, str]) -> None:
    """Architecture and title checks, before any tensor is read."""
    arch = meta.get(KEY_ARCHITECTURE)
    if arch is None:
        raise CheckpointError(f"{path}: missing metadata {KEY_ARCHITECTURE!r} (is this a Hydra 3.5 model file?)")
    if arch != ARCHITECTURE:
        hint = " (a JTP-3 file: load it with load_jtp3)" if arch == JTP3_ARCHITECTURE else ""
        raise CheckpointError(f"{path}: unsupported architecture {arch!r}{hint}; this loader reads {ARCHITECTURE!r}")
    title = meta.get(KEY_TITLE)
    if not title:
        raise CheckpointError(f"{path}: missing metadata {KEY_TITLE!r} (required: extensions name their model by it)")


def _read_validation(path: str | os.PathLike, n_tags: int) -> np.ndarray:
    """The (T, n, 4) counts, read in their stored dtype (a float32 table must not go through a bf16 cast)."""
    tensors, _ = load_tensors(path, keep=lambda k: k == KEY_VALIDATION)
    if KEY_VALIDATION not in tensors:
        raise CheckpointError(f"{path}: missing tensor {KEY_VALIDATION!r} (per-tag [tp, fp, tn, fn] counts)")
    v = tensors[KEY_VALIDATION]
    if v.dtype not in (torch.int32, torch.float32):
        raise CheckpointError(f"{path}: tensor {KEY_VALIDATION!r} is {v.dtype}; expected int32 or float32")
    if v.ndim != 3 or v.shape[0] != n_tags or v.shape[1] < 1 or v.shape[2] != 4:
        raise CheckpointError(f"{path}: tensor {KEY_VALIDATION!r} has shape {tuple(v.shape)}; expected "
                              f"({n_tags}, n_thresholds, 4)")
    return v.numpy().copy()  # owned and writable (extensions replace rows); 14 MB for the real file


def load_hydra35(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 extensions: Sequence[ExtensionV2 | Extension | str | os.PathLike] = ()) -> Hydra35Model:
    """Load a Hydra 3.5 model file strictly, merge v2 extensions, and move it to `device` in eval mode.

    Args:
        dtype: run dtype of the weights (the file is bf16; other dtypes are cast while reading).
        extensions: v2 extensions, read (`read_extension_v2`) or as paths; merged in the given order.

    Raises:
        CheckpointError: wrong architecture, missing title, bad metadata, bad validation table, or
            missing / extra / mis-shaped tensors.
        ExtensionError: an extension is unusable or does not belong to this model.
    """
    meta = read_metadata(path)
    _check_header(path, meta)
    background = _choice(path, meta, KEY_BACKGROUND, tuple(BACKGROUNDS))
    resize = _choice(path, meta, KEY_RESIZE, RESIZES)
    if not meta.get(KEY_LABELS):
        raise CheckpointError(f"{path}: missing metadata {KEY_LABELS!r}")
    labels, categories, implies = parse_labels(path, meta[KEY_LABELS])

    tensors, _ = load_tensors(path, dtype=dtype, keep=lambda k: k != KEY_VALIDATION)
    try:
        cfg = Hydra2Cfg.from_state(tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e} (not a Hydra 3.5 model?)") from None
    except AssertionError as e:
        raise CheckpointError(f"{path}: pool tensors are inconsistent ({e})") from None
    if cfg.mid_blocks == 0:
        raise CheckpointError(f"{path}: no attn_pool.mid_blocks.* tensors; a {ARCHITECTURE} pool has at least one")
    if len(labels) != cfg.n_tags:
        raise CheckpointError(f"{path}: metadata {KEY_LABELS} has {len(labels)} rows but attn_pool.q has "
                              f"{cfg.n_tags} tags")
    validation = _read_validation(path, cfg.n_tags)

    try:
        net = build_hydra35_net(cfg, parse_backbone_overrides(path, meta), device="meta", dtype=dtype)
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{path}: bad backbone settings in metadata ({e})") from None
    check_state(path, tensors, {k: tuple(v.shape) for k, v in net.state_dict().items()}, what="Hydra 3.5 model")
    net.load_state_dict(tensors, strict=True, assign=True)
    del tensors
    net.requires_grad_(False).eval()

    model = Hydra35Model(net=net, labels=labels, categories=categories, implies=implies, validation=validation,
                         path=os.fspath(path), metadata=meta, background=background, resize=resize)
    if extensions:
        from hydra.models.extensions_v2 import merge_extensions_v2, read_extension_v2  # it imports this module

        merge_extensions_v2(model, [read_extension_v2(e) if isinstance(e, (str, os.PathLike)) else e
                                    for e in extensions])
    net.to(device)
    model.fold = jtp3_head.fold_enabled()
    model.folded_head()  # once, on the device, with the extensions' tags (~0.3 s on a 2-core CPU)
    return model
