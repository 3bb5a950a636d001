"""Train a new tag (an extension) for JTP-3 or Hydra 3.5 from example images, on a GPU or on the CPU.

Put images with the tag in train/<tag>/positive and images without it in train/<tag>/negative, then:

    python train_extension.py -e 100 -c 10 my_tag_(custom)        # 100 epochs, a checkpoint every 10
    python train_extension.py my_tag_(custom)                     # until Ctrl-C (saves at the epoch's end)
    python train_extension.py -r 20260101-120000_e40.pt -e 80 my_tag_(custom)   # resume to epoch 80
    python train_extension.py --no-train -W 4 my_tag_(custom)     # only build the feature cache
    python train_extension.py -M models/hydra-3.5.safetensors -e 60 my_tag_(custom)   # a Hydra 3.5 tag

Then pick an epoch from the EPOCH lines and turn its checkpoint into an extension with build_extension.py.
The model family is recognised from the model file; its own preprocessing feeds the feature cache.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import TYPE_CHECKING

from hydra.cli import natural, positive_int, resolve_model, worker_count
from hydra.common import default_device, log
from hydra.hub import DownloadError
from hydra.models.checkpoint import CheckpointError
from hydra.models.family import Family
from hydra.models.resources import DEFAULT_MODEL, short_model_names

# torch, the model and the training code are imported where they are used: --help and argument errors do not
# wait for them.
if TYPE_CHECKING:
    import torch

    from hydra.tagger import Tagger
    from hydra.train import features
    from hydra.train.optim import AdamWScheduleFree

# Optimizer flags: default None so that "given" can be told apart (they conflict with --resume).
HYPER = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "beta1_c": 200.0, "weight_decay": 1e-2, "warmup_steps": 20}
SEED = 3407


class _FamilyName(str):
    """The `--cache-tag` default: equal to upstream's "jtp3", but told apart from a given value by identity,
    so that each family's features get their own namespace (they differ for the same image)."""


CACHE_TAG_DEFAULT = _FamilyName("jtp3")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Hydra Extension Trainer (JTP-3, Hydra 3.5)", allow_abbrev=False)
    p.add_argument("tag", metavar="TAG", help="The tag to train, e.g. my_tag_(custom). Its images are in "
                   "DIR/TAG/positive and DIR/TAG/negative (spaces, '/' and '.' in the folder name become '_').")
    g = p.add_argument_group("run")
    g.add_argument("-D", "--dir", metavar="PATH", default="train", help="Working directory. (Default: train)")
    g.add_argument("-M", "--model", metavar="PATH",
                   help="Path to model file: JTP-3 or Hydra 3.5, recognised from the file; a published model's "
                        f"short name ({', '.join(short_model_names())}) downloads it on first use. "
                        f"(Default: {DEFAULT_MODEL})")
    g.add_argument("-d", "--device", metavar="TORCH_DEVICE",
                   help="Torch device. (Default: cuda if available, else cpu; CPU training works)")
    g.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="Compute dtype. (Default: auto = bf16 on GPUs and on CPUs with native bf16, else fp32)")
    g.add_argument("-r", "--resume", metavar="CHECKPOINT",
                   help="Resume from this checkpoint (a file name in DIR/TAG/checkpoints, or a path).")
    g.add_argument("-s", "--seed", type=int, help=f"Seed for the split and sampling. (Default: {SEED})")
    g.add_argument("-i", "--init-from-tag", metavar="TAG",
                   help="Start from an existing tag of the model (exact e621 name). (Default: random init)")
    g = p.add_argument_group("training")
    g.add_argument("-b", "--batch", type=positive_int, default=16, help="Batch size. (Default: 16)")
    g.add_argument("-a", "--accumulate", type=positive_int, default=1,
                   help="Gradient accumulation steps. (Default: 1)")
    g.add_argument("-e", "--max-epochs", type=natural, default=0, help="Stop after this epoch. (0 = until Ctrl-C)")
    g.add_argument("-c", "--checkpoint-interval", type=natural, default=0,
                   help="Also save a checkpoint every N epochs. (0 = only at the end)")
    g.add_argument("-v", "--validation-samples", type=natural, default=20,
                   help="Positive and negative examples held out for validation, each. (Default: 20)")
    g.add_argument("-T", "--validation-thresholds", type=positive_int, default=99,
                   help="Number of validation thresholds. (Default: 99; Hydra 3.5 needs its model's own count, 99)")
    g.add_argument("--force", action="store_true", help="Train even if the dataset looks too small or imbalanced.")
    g = p.add_argument_group("optimizer (only for a new run, not with --resume)")
    g.add_argument("--lr", type=float, help=f"Learning rate. (Default: {HYPER['lr']:g})")
    g.add_argument("--beta1", type=float, help=f"Schedule-free beta1. (Default: {HYPER['beta1']:g})")
    g.add_argument("--beta2", type=float, help=f"Second-moment decay. (Default: {HYPER['beta2']:g})")
    g.add_argument("--beta1-c", type=float, help=f"beta1 decoupling constant C. (Default: {HYPER['beta1_c']:g})")
    g.add_argument("--weight-decay", type=float, help=f"Weight decay. (Default: {HYPER['weight_decay']:g})")
    g.add_argument("--warmup-steps", type=int, help=f"Linear warmup steps. (Default: {HYPER['warmup_steps']})")
    g = p.add_argument_group("feature cache")
    g.add_argument("-B", "--cache-batch", type=positive_int, default=4, help="Batch size for caching. (Default: 4)")
    g.add_argument("-W", "--cache-workers", type=int, default=-1,
                   help="Image loading processes for caching. (Default: -1 = all cores; 0 = main process)")
    g.add_argument("--cache-tag", metavar="ID", default=CACHE_TAG_DEFAULT,
                   help="Namespace of cache files. (Default: the model family: jtp3 for JTP-3, hydra35 for Hydra 3.5)")
    g.add_argument("--rebuild-cache", action="store_true", help="Recompute every cache file.")
    g.add_argument("--no-train", action="store_true", help="Only build the feature cache.")
    g.add_argument("--no-shm", action="store_true", help="Disable shared memory in caching workers.")
    g.add_argument("--no-mtime", action="store_true",
                   help="A cache file is valid if it exists, even when older than its image.")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express (upstream's resume check read a missing `args.c`)."""
    fixed = ["seed", "init_from_tag", *HYPER]
    given = [f"--{k.replace('_', '-')}" for k in fixed if getattr(args, k) is not None]
    if args.resume and given:
        raise ValueError(f"--resume continues with the checkpoint's settings; remove {', '.join(given)}")
    from hydra.train import features

    features.check_tag(args.tag)
    features.check_cache_tag(args.cache_tag)


def setup_device(name: str | None) -> torch.device:
    import torch

    device = torch.device(name or default_device())
    if device.type == "cuda":  # upstream's CUDA settings (the allocator reads its config at the first allocation)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def make_optimizer(head, args, ckpt) -> AdamWScheduleFree:
    from hydra.train.optim import AdamWScheduleFree

    hp = {k: HYPER[k] if getattr(args, k, None) is None else getattr(args, k) for k in HYPER}
    opt = AdamWScheduleFree(head.named_trainable(), lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"],
                            c=hp["beta1_c"], weight_decay=hp["weight_decay"], warmup_steps=hp["warmup_steps"],
                            seed=args.seed)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    log(f"Optimizer: schedule-free AdamW ({opt.impl}: {opt.impl_reason})")
    return opt


def find_checkpoint(ws: features.Workspace, name: str) -> str:
    """`-r NAME`: a file in the tag's checkpoints folder (as upstream), or else a path as given."""
    for path in (os.path.join(ws.checkpoints, name), name):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"checkpoint '{name}' not found in '{ws.checkpoints}' (nor as a path)")


def resume_checkpoint(args: argparse.Namespace, ws: features.Workspace, family: Family) -> dict:
    """`-r`: the checkpoint, checked against the model family and -e; its seed becomes the run's."""
    from hydra.train import loop as training

    ckpt = training.load_checkpoint(find_checkpoint(ws, args.resume))
    trained_for = training.checkpoint_family(ckpt)
    if trained_for is not family:
        raise ValueError(f"{args.resume} is a {trained_for.title} checkpoint, but the model is {family.title}")
    if 0 < args.max_epochs <= ckpt["epoch"]:
        raise ValueError(f"the checkpoint is at epoch {ckpt['epoch']}; -e {args.max_epochs} leaves nothing to train")
    args.seed = ckpt["seed"]
    return ckpt


def load_model(args: argparse.Namespace, model_path: str) -> Tagger:
    """The base model (no extensions), with its family's preprocessing at the default size."""
    from hydra.tagger import Tagger

    device = setup_device(args.device)
    log(f"Loading '{model_path}' ...", end="")
    tagger = Tagger(model_path, device=str(device), dtype=args.dtype)
    log(f" {len(tagger.labels)} tags ({tagger.device}, {tagger.dtype_reason})")
    return tagger


def check_caption_name(tag: str, family: Family, labels: list[str], model_path: str) -> None:
    """Refuse a new tag that the family's caption rename makes equal to a model tag (`big_vulva` beside JTP-3's
    `big_pussy` would give two CSV columns and caption tags of one name), before any work is done."""
    from hydra.models.extensions import caption_name_conflict

    rename = family.rename(False)
    if (other := caption_name_conflict(tag, labels, rename)) is not None:
        raise ValueError(f"TAG {tag!r} is written {rename(tag)!r} in captions and CSV columns (the "
                         f"{' / '.join(f'{a} -> {b}' for a, b in family.caption.renames)} rename), as is the tag "
                         f"{other!r} of '{model_path}'; train {rename(tag)!r} to replace that tag, or another name")


def make_head(args: argparse.Namespace, tagger: Tagger, ckpt: dict | None) -> tuple[torch.nn.Module, dict]:
    """The trainable head (fresh, from -i, or from -r) and what checkpoints record about the model."""
    import torch

    from hydra.train import loop as training

    family, model = tagger.family, tagger.model
    init = None
    if args.init_from_tag is not None:
        if args.init_from_tag not in model.labels:
            raise ValueError(f"-i: tag {args.init_from_tag!r} is not in the model (use the exact e621 name)")
        init = model.labels.index(args.init_from_tag)
    args.validation_thresholds = family.validation_thresholds(model, args.validation_thresholds)
    info = training.checkpoint_info(family, model)
    if ckpt is not None:
        training.check_resume(ckpt, info, args.resume)
    head = family.train_head(model, init, torch.Generator().manual_seed(args.seed))
    if ckpt is not None:
        head.load_checkpoint_state(ckpt, args.resume)
    return head, info


def main(args: argparse.Namespace) -> int:
    try:
        check_args(args)
        from hydra.train import features

        ws = features.Workspace.for_tag(args.dir, args.tag)
        model_path, family = resolve_model(args.model)
        family.require_training()
        ckpt = resume_checkpoint(args, ws, family) if args.resume else None
        args.seed = SEED if args.seed is None else args.seed
        tagger = load_model(args, model_path)
        check_caption_name(args.tag, family, tagger.model.labels, model_path)
        cache_tag = family.name if args.cache_tag is CACHE_TAG_DEFAULT else args.cache_tag
        workers = worker_count(args.cache_workers, 1 << 30)  # build_feature_cache caps it to the images to do
        cache = features.build_feature_cache(
            tagger.model, ws.images(), cache_tag, preprocess=tagger.preprocess, batch_size=args.cache_batch,
            workers=workers, share_memory=not args.no_shm, rebuild=args.rebuild_cache, check_mtime=not args.no_mtime)
        log(f"Feature cache: {len(cache.items)} images ready, {cache.computed} computed"
            + (f" ({cache.computed / cache.seconds:.2f} images/s)" if cache.computed else "")
            + f", failed={cache.failed}.")
        if args.no_train:
            return 1 if cache.failed else 0
        head, info = make_head(args, tagger, ckpt)
        del tagger  # frees the backbone; the head keeps the shared pool weights alive
        return train(args, ws, head, info, cache.items, ckpt)
    except (CheckpointError, DownloadError, OSError, ValueError) as e:
        log(f"error: {e}")
        return 2


def train(args: argparse.Namespace, ws: features.Workspace, head: torch.nn.Module, info: dict, items,
          ckpt: dict | None) -> int:
    """Split, check, build the optimizer (fresh or from -r), and run the epoch loop."""
    from hydra.train import loop as training

    rng = random.Random(args.seed)
    train_set, val_set = training.split_dataset(items, args.validation_samples, rng)
    problems = training.sanity_problems(items, train_set, val_set, args.batch, args.accumulate)
    if problems and not args.force:
        raise ValueError(" ".join(problems) + " Use --force to train anyway.")
    for problem in problems:
        log(f"warning: {problem}")
    if ckpt is not None:
        state = ckpt["rng_state"]
        rng.setstate((state[0], tuple(state[1]), state[2]))
    opt = make_optimizer(head, args, ckpt)
    log(f"Training on {len(train_set)} images, validating on {len(val_set)}; "
        f"{training.optimizer_steps(len(train_set), args.batch, args.accumulate)} optimizer steps per epoch.")
    settings = training.LoopSettings(args.batch, args.accumulate, args.max_epochs, args.checkpoint_interval,
                                     args.validation_thresholds)
    with training.StopFlag() as stop:
        training.fit(head, opt, train_set, val_set, rng, seed=args.seed, settings=settings,
                     checkpoint_dir=ws.checkpoints, start_epoch=0 if ckpt is None else ckpt["epoch"], stop=stop,
                     info=info)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(build_parser().parse_args()))
    except KeyboardInterrupt:
        log("Interrupted.")
        sys.exit(130)
