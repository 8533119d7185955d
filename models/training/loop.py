"""The training loop behind ``deblur train``.

One :class:`TrainConfig` describes a run: the architecture and its options,
the optimiser and schedule (each seed's own by default, see :data:`RECIPES`),
patches and batches, how long to train, and where to write. :func:`train`
then repeats: draw a batch of (blurred, sharp) patches (flips/rotations are
applied by the data source), take one optimiser step (plus a discriminator
step for seed 001's GAN), and every ``steps_per_epoch`` steps validate
(PSNR/SSIM of the restored validation crops and of their blurred inputs),
step the schedule, write ``last.pt`` and ``last.safetensors`` (the latest
weights, with their validation figures in the metadata) and, when validation
PSNR improved, ``best.safetensors`` (and the ``export`` copy; both replaced
atomically). Without validation data there is no "best": only the latest
weights are written (and copied to ``export``). ``resume=True`` continues
from ``last.pt`` exactly where it stopped: model, optimiser, schedule, random
generators, the data source's kernel bank and the epoch's running loss are all
restored, so a resumed run matches an uninterrupted one. A resume into other
architecture options than the checkpoint's is refused; a learning rate given
on resume replaces the run's, scaling its schedule (:func:`_resume_lr`). A run
into a folder that already holds one is refused unless it resumes
(:func:`check_output`). Weight files are byte-for-byte the same for the same
tensors and metadata (their sha256 is their provenance) and get the umask's
mode like any new file (:func:`_write_atomically`).

Ctrl-C (SIGINT) or SIGTERM stops the run after the step under way: ``last.pt``
is written at that step, without counting an epoch or stepping a per-epoch
schedule, and :class:`TrainingInterrupted` is raised (the CLI exits 130 or
143). Resuming from it gives the same weights as a run never stopped. A
second Ctrl-C quits at once, keeping the checkpoint of the last epoch.

Runs are deterministic for a given seed on a given machine and thread count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from jobs.errors import InputError
from models.archs import ARCHITECTURES, build_network, run_network, value_range
from models.training.data import PairSource, Split
from models.training.losses import (
    BALANCES,
    Seed001Loss,
    Seed002Loss,
    discriminator_loss,
    psnr,
    ssim,
)

log = logging.getLogger("deblur.train")

OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
SCHEDULES = ("plateau", "cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """A seed's own training defaults."""

    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    batch_size: int
    loss: str  # "seed001" (MSE + SSIM + adversarial), "seed002" (MAE + Sobel + Fourier), "l1"
    adversarial: bool = False


RECIPES: dict[str, Recipe] = {
    # Adam 5e-4, weight decay 5e-4, ReduceLROnPlateau(×0.5, patience 5), batch 4, GAN.
    "seed001": Recipe("adam", 5e-4, 5e-4, "plateau", 4, "seed001", adversarial=True),
    # RMSprop (ρ = 0.9) at 1e-3, found by the seed's grid search; no schedule given.
    "seed002": Recipe("rmsprop", 1e-3, 0.0, "constant", 8, "seed002"),
    # L1 loss with Adam (the seed's first variant).
    "seed003": Recipe("adam", 1e-4, 0.0, "constant", 4, "l1"),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run; ``None`` means the seed's recipe value."""

    arch: str
    output_dir: Path
    arch_kwargs: dict[str, object] = field(default_factory=dict)
    steps: int = 10_000
    steps_per_epoch: int = 500
    batch_size: int | None = None
    patch: int = 128
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    loss: str | None = None
    balance: str = "mean"
    adversarial: bool | None = None
    adv_start: int = 0
    disc_width: int = 64
    seed: int = 0
    init: Path | None = None
    resume: bool = False
    max_minutes: float | None = None
    export: Path | None = None
    device: str = "auto"
    progress: bool = True
    data_description: str = ""
    prior: str = ""  # the blind model a refiner is conditioned on (stored in the weights' metadata)
    # whether ``lr`` was given rather than the recipe's: only a given one replaces a resumed run's rate
    lr_given: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}")
        recipe = RECIPES[self.arch]
        self.lr_given = self.lr is not None
        self.batch_size = self.batch_size or recipe.batch_size
        self.optimizer = (self.optimizer or recipe.optimizer).lower()
        self.lr = recipe.lr if self.lr is None else self.lr
        self.weight_decay = recipe.weight_decay if self.weight_decay is None else self.weight_decay
        self.schedule = (self.schedule or recipe.schedule).lower()
        self.loss = (self.loss or recipe.loss).lower()
        self.adversarial = recipe.adversarial if self.adversarial is None else self.adversarial
        self.output_dir = Path(self.output_dir)
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.loss not in ("seed001", "seed002", "l1", "mse"):
            raise InputError(f"unknown loss {self.loss!r}; choose seed001, seed002, l1 or mse")
        if self.balance not in BALANCES:
            raise InputError(f"unknown loss balance {self.balance!r}; choose one of {', '.join(BALANCES)}")
        if self.steps < 1 or self.steps_per_epoch < 1:
            raise InputError(f"steps ({self.steps}) and steps per epoch ({self.steps_per_epoch}) must be >= 1")
        if self.patch < 16:
            raise InputError(f"patch must be at least 16 pixels, got {self.patch}")
        if self.adversarial and self.patch < 64:
            raise InputError(f"adversarial training needs patches of at least 64 pixels, got {self.patch}")

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}, sort_keys=True)


@dataclass
class EpochReport:
    """Validation figures after one epoch."""

    epoch: int
    step: int
    train_loss: float
    val_psnr: float
    val_ssim: float
    input_psnr: float
    input_ssim: float
    lr: float
    seconds: float

    @property
    def gain_db(self) -> float:
        return self.val_psnr - self.input_psnr


def _to_net(x: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """``x`` in [0, 1] mapped to the network's value range (what the discriminator sees)."""
    lo, hi = value_range(net)
    return x if (lo, hi) == (0.0, 1.0) else x * (hi - lo) + lo


def _make_optimizer(name: str, params: Sequence[nn.Parameter] | object, lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)  # type: ignore[arg-type]
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, weight_decay=wd)  # type: ignore[arg-type]
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)  # type: ignore[arg-type]


def _make_schedule(name: str, opt: torch.optim.Optimizer, total_steps: int) -> object:
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5)
    if name == "cosine":
        warmup = min(200, max(1, total_steps // 20))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _loss_fn(name: str, balance: str) -> object:
    if name == "seed001":
        return Seed001Loss(balance=balance)
    if name == "seed002":
        return Seed002Loss(balance=balance)
    if name == "l1":
        return lambda r, s, fake=None: {"total": torch.nn.functional.l1_loss(r, s)}
    return lambda r, s, fake=None: {"total": torch.nn.functional.mse_loss(r, s)}


def _nchw(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous().to(device)


def validate(
    net: nn.Module, pairs: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device, size_multiple: int = 1
) -> tuple[float, float, float, float]:
    """Mean (restored PSNR, restored SSIM, blurred PSNR, blurred SSIM) over ``pairs`` (HxWx3 arrays).

    Inputs are reflect-padded to ``size_multiple`` and cropped back. A
    refiner's inputs (HxWx6, blurred then prior) are scored against their
    first three channels, the blurred image.
    """
    was_training = net.training
    net.eval()
    rp, rs, bp, bs = [], [], [], []
    with torch.inference_mode():
        for blurred, sharp in pairs:
            b = _nchw(blurred[None], device)
            s = _nchw(sharp[None], device)
            h, w = b.shape[-2:]
            ph, pw = (-h) % size_multiple, (-w) % size_multiple
            padded = torch.nn.functional.pad(b, (0, pw, 0, ph), mode="reflect") if (ph or pw) else b
            out = run_network(net, padded)[..., :h, :w].clamp(0, 1)
            rp.append(float(psnr(out, s)[0]))
            rs.append(float(ssim(out, s)[0]))
            # a refiner's input is [blurred, prior]: the figures are against the blurred image
            bp.append(float(psnr(b[:, :3], s)[0]))
            bs.append(float(ssim(b[:, :3], s)[0]))
    net.train(was_training)
    return float(np.mean(rp)), float(np.mean(rs)), float(np.mean(bp)), float(np.mean(bs))


def export_weights(net: nn.Module, path: Path, arch: str, arch_kwargs: dict[str, object], info: dict[str, object]) -> None:
    """Write the network's state dict to a ``.safetensors`` file with the architecture in its metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    rebuild = getattr(net, "rebuild_kwargs", None)
    if "vit_checkpoint" in arch_kwargs and callable(rebuild):  # the file it started from is not needed to load it
        arch_kwargs = {**{k: v for k, v in arch_kwargs.items() if k != "vit_checkpoint"}, **rebuild()}
    meta = {"arch": arch, "arch_kwargs": json.dumps(arch_kwargs, sort_keys=True)}
    meta.update({k: str(v) for k, v in info.items()})
    data = deterministic_safetensors(state, meta)
    _write_atomically(path, lambda fh: fh.write(data))


def deterministic_safetensors(state: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """``state`` and ``meta`` as the bytes of a ``.safetensors`` file, the same bytes for the same input.

    safetensors writes its metadata map in a random key order, so two identical runs gave files with
    different sha256 -- and a weights file's sha256 is its provenance (registry, job records). The
    format is an 8-byte little-endian header length, a JSON header, then the tensors' data, whose
    offsets count from the end of the header: the header is written again with sorted keys (the
    same length, as only the order changes) and padded with spaces to a multiple of 8 bytes as the
    library pads it, so the data after it is untouched.
    """
    raw = safetensors_bytes(state, metadata=meta)
    length = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + length:]


def _init_from(net: nn.Module, path: Path, arch: str) -> None:
    """Start from the weights in a ``.safetensors`` file (fine-tuning); they must fit ``net`` exactly."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            found = (fh.metadata() or {}).get("arch")
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(
            f"cannot read initial weights {str(path)!r} as safetensors ({exc}): --init takes a .safetensors file, "
            "e.g. a run's best.safetensors or last.safetensors (its last.pt is a checkpoint for --resume, and "
            ".pt/.pth files from elsewhere are not read: they may run code when loaded)"
        ) from None
    if found not in (None, arch):
        raise InputError(f"initial weights {str(path)!r} are for {found!r}, not {arch!r}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"initial weights {str(path)!r} do not fit this {arch} network: {exc}") from None
    log.info("initialised from %s", path)


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by a signal after a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {checkpoint}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
        return 128 + self.signum


def existing_run_step(out: Path) -> int | None:
    """The step of the run ``out`` holds (its ``last.pt``, else its weights' metadata), or None if it holds none.

    -1 when there are weights or a checkpoint whose step cannot be read.
    """
    ckpt = out / "last.pt"
    if ckpt.is_file():
        try:
            return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])
        except Exception:  # noqa: BLE001 - a damaged checkpoint still marks a run
            return -1
    for name in ("last.safetensors", "best.safetensors"):
        if (out / name).is_file():
            from safetensors import safe_open

            try:
                with safe_open(str(out / name), framework="pt") as fh:
                    return int((fh.metadata() or {})["step"])
            except Exception:  # noqa: BLE001
                return -1
    return None


def check_output(out: Path, resume: bool) -> None:
    """Refuse to start a new run in a folder that holds one: it would overwrite its weights and checkpoint."""
    if resume:
        return
    step = existing_run_step(Path(out))
    if step is not None:
        at = f" at step {step}" if step >= 0 else ""
        raise InputError(f"{out} holds a run{at}; pass --resume to go on, or choose another --output")


def _replace_with_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` atomically (:func:`_write_atomically`)."""
    with open(source, "rb") as src:
        _write_atomically(target, lambda dst: shutil.copyfileobj(src, dst))


def _write_atomically(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` with ``write`` through a temporary file in its folder and an atomic rename, so that
    ``target`` is always either the old file or the whole new one.

    The temporary file is created afresh (a stale one is removed first), so every file training writes
    gets the mode ``open()`` gives a new file, 0666 less the umask -- what ``deblur models pull`` gives
    downloaded weights (:mod:`models.weights_store`): workers often run as another user than the one who
    trained, and safetensors' own writer made owner-only (0600) files.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        with open(tmp, "xb") as dst:
            write(dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT and SIGTERM into requests (the list of signals received) honoured between steps.

    A second SIGINT raises KeyboardInterrupt at once. Outside the main thread
    (where handlers cannot be installed) signals keep their usual effect.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not received:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint"
                             f"{' (Ctrl-C again to quit without it)' if signum == signal.SIGINT else ''}\n")
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# tqdm's default bar without its "<remaining" estimate, for runs with a time limit (see _eta_text)
_BAR_WITH_TIME_LIMIT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _eta_text(done: int, left: int, now: float, start: float, deadline: float) -> str:
    """Time until the run stops: the steps ``left`` at this call's rate, or the time limit, whichever comes first.

    ``done`` steps were taken since ``start``; with none yet, only the time limit is known (shown as ``<=``).
    """
    from tqdm import tqdm

    time_left = max(0.0, deadline - now)
    if done <= 0:
        return f"<={tqdm.format_interval(time_left)}"
    return tqdm.format_interval(min(time_left, (now - start) / done * left))


def _setup_logging(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def train(
    config: TrainConfig,
    source: PairSource,
    validation: Sequence[tuple[np.ndarray, np.ndarray]],
    split: Split | None = None,
) -> list[EpochReport]:
    """Run (or resume) the training described by ``config``; returns this call's epoch reports.

    ``split`` names the items trained on and held out; it is stored in the
    checkpoint, and a resume whose split would train on a held-out item (or
    validate on a trained one) is refused.

    Raises:
        InputError: bad settings, ``config.output_dir`` holding a run while
            ``config.resume`` is off, or a resume with another split.
        TrainingInterrupted: SIGINT or SIGTERM stopped the run (a checkpoint of the step was saved).
    """
    from models.base import pick_device

    out = config.output_dir
    check_output(out, config.resume)
    device = pick_device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(out / "train.log")
    try:
        with _stop_requests() as stop:
            return _train(config, source, validation, device, out, split, stop)
    finally:
        log.removeHandler(handler)
        handler.close()


def _check_split(ckpt: dict[str, object], split: Split | None, ckpt_path: Path) -> None:
    """Refuse a resume that would train on what the run held out, or validate on what it trained on."""
    if split is None or "split" not in ckpt:
        return
    before = json.loads(str(ckpt["split"]))
    leaked = sorted(set(before["validation"]) & set(split.training))
    tainted = sorted(set(before["training"]) & set(split.validation))
    if leaked or tainted:
        problems = []
        if leaked:
            problems.append(f"train on {len(leaked)} item(s) it held out for validation ({', '.join(leaked[:3])})")
        if tainted:
            problems.append(f"validate on {len(tainted)} item(s) it trained on ({', '.join(tainted[:3])})")
        raise InputError(
            f"resuming from {ckpt_path} would {' and '.join(problems)}: the data's train/validation split differs "
            "from the run's; resume with the same data, or start a new run with another --output"
        )


def _check_network(ckpt: dict[str, object], config: TrainConfig, ckpt_path: Path) -> None:
    """Refuse a resume into another network than the checkpoint's: its tensors would not fit (or, worse, a
    change of an option that keeps the shapes would go unnoticed), which surfaced as a raw size-mismatch
    traceback from ``load_state_dict``."""
    if ckpt["arch"] != config.arch:
        raise InputError(f"checkpoint {str(ckpt_path)!r} is for {ckpt['arch']!r}, not {config.arch!r}")
    if "arch_kwargs" not in ckpt:
        return
    recorded = json.loads(str(ckpt["arch_kwargs"]))
    asked = json.loads(json.dumps(config.arch_kwargs, sort_keys=True))  # as it would be recorded
    if recorded != asked:
        raise InputError(
            f"checkpoint {str(ckpt_path)!r} is a {config.arch} network with the options "
            f"{json.dumps(recorded, sort_keys=True)}, but {json.dumps(asked, sort_keys=True)} were asked for: "
            "resume with the same options (--arch-option, --prior), or start a new run with another --output"
        )


def _notice(message: str) -> None:
    """Say ``message`` on stderr and in train.log: something the run does differently than asked or expected."""
    log.info("%s", message)
    sys.stderr.write(f"{message}\n")


def _resume_lr(
    ckpt: dict[str, object], config: TrainConfig, schedules: Sequence[tuple[torch.optim.Optimizer, object]], step: int
) -> None:
    """Apply a ``--lr`` given on resume; without one keep the run's own rate (and set ``config.lr`` to it).

    The optimisers' and schedules' states restored from the checkpoint carry the run's rates, so a new
    ``--lr`` used to be ignored without a word. Someone who passes one on resume means it (typically a
    lower rate to go on from a plateau), so every rate of the schedule is scaled by new / old: the
    schedule goes on from where it was (a cosine keeps its shape, a plateau schedule its halvings).
    """
    groups = ckpt["optimizer"]["param_groups"]  # type: ignore[index]
    run_lr = float(ckpt.get("lr", groups[0].get("initial_lr", groups[0]["lr"])))  # older checkpoints: no "lr"
    new_lr = float(config.lr or 0.0)
    if not config.lr_given:
        config.lr = run_lr
        return
    if math.isclose(new_lr, run_lr, rel_tol=1e-9):
        return
    ratio = new_lr / run_lr
    for opt, sched in schedules:
        for group in opt.param_groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        for name in ("base_lrs", "_last_lr"):
            if isinstance(getattr(sched, name, None), list):
                setattr(sched, name, [float(v) * ratio for v in getattr(sched, name)])
    _notice(f"resuming with --lr {new_lr:g} instead of the run's {run_lr:g}: the {config.schedule} schedule goes on "
            f"from step {step} with its rates scaled by {ratio:g} (now {schedules[0][0].param_groups[0]['lr']:.3g})")


def _train(
    config: TrainConfig,
    source: PairSource,
    validation: Sequence[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
    out: Path,
    split: Split | None = None,
    stop: Sequence[int] = (),
) -> list[EpochReport]:
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(config.seed)
    net = build_network(config.arch, **config.arch_kwargs).to(device)
    if config.init is not None and not config.resume:
        _init_from(net, Path(config.init), config.arch)
    multiple = int(getattr(net, "size_multiple", 1))
    if config.patch % multiple:
        raise InputError(f"patch {config.patch} must be a multiple of {multiple} for {config.arch}")
    opt_name, sched_name = str(config.optimizer), str(config.schedule)
    lr, wd = float(config.lr or 0.0), float(config.weight_decay or 0.0)
    opt = _make_optimizer(opt_name, net.parameters(), lr, wd)
    sched = _make_schedule(sched_name, opt, config.steps)
    loss_fn = _loss_fn(str(config.loss), config.balance)
    disc: nn.Module | None = None
    d_opt = d_sched = None
    if config.adversarial:
        from models.archs.seed001 import PatchDiscriminator

        disc = PatchDiscriminator(config.disc_width).to(device)
        d_opt = _make_optimizer(opt_name, disc.parameters(), lr, wd)
        d_sched = _make_schedule(sched_name, d_opt, config.steps)

    step, epoch, best = 0, 0, -math.inf
    running, count = 0.0, 0  # the epoch's loss so far (a checkpoint between epochs keeps it)
    ckpt_path = out / "last.pt"
    if config.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        _check_network(ckpt, config, ckpt_path)
        _check_split(ckpt, split, ckpt_path)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["schedule"])  # type: ignore[attr-defined]
        schedules = [(opt, sched)]
        if disc is not None and "disc" in ckpt:
            disc.load_state_dict(ckpt["disc"])
            d_opt.load_state_dict(ckpt["disc_optimizer"])  # type: ignore[union-attr]
            d_sched.load_state_dict(ckpt["disc_schedule"])  # type: ignore[union-attr]
            schedules.append((d_opt, d_sched))  # type: ignore[arg-type]
        step, epoch, best = int(ckpt["step"]), int(ckpt["epoch"]), float(ckpt["best_psnr"])
        _resume_lr(ckpt, config, schedules, step)
        running, count = float(ckpt.get("running_loss", 0.0)), int(ckpt.get("running_count", 0))
        rng.bit_generator.state = json.loads(ckpt["numpy_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if hasattr(source, "load_state_dict") and "source" in ckpt:
            source.load_state_dict(ckpt["source"])
        log.info("resumed from %s at step %d (epoch %d, best PSNR %.3f dB)", ckpt_path, step, epoch, best)
    else:
        log.info("start %s", config.to_json())
        log.info("parameters: %d", sum(p.numel() for p in net.parameters()))
        if config.prior and validation:
            prior_psnr = np.mean([float(psnr(_nchw(b[None, ..., 3:], device), _nchw(s[None], device))[0])
                                  for b, s in validation])
            log.info("validation: the prior %s alone reaches %.3f dB", config.prior, prior_psnr)
        if not validation:
            log.info("no validation data: no best weights are chosen; last.safetensors holds the latest")
    if split is not None:
        log.info("split: %d item(s) for training, %d held out for validation", len(split.training),
                 len(split.validation))

    def save(step: int, epoch: int, best: float, running: float, count: int) -> None:
        _save_checkpoint(ckpt_path, config, net, opt, sched, disc, d_opt, d_sched, step, epoch, best, rng, source,
                         split, running, count)

    reports: list[EpochReport] = []
    start = time.monotonic()
    deadline = start + 60 * config.max_minutes if config.max_minutes else math.inf
    net.train()
    bar = None
    if config.progress:
        from tqdm import tqdm

        # with a time limit, tqdm's own estimate (from --steps alone) would promise hours for a run that stops in
        # minutes: the bar shows an "eta" bounded by the time left instead (_eta_text)
        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.arch}", unit="step", mininterval=5.0,
                   bar_format=_BAR_WITH_TIME_LIMIT if config.max_minutes else None)
    first_step = step
    try:
        while step < config.steps:
            if stop:  # SIGINT/SIGTERM arrived: save this step (between steps, so the state is consistent)
                save(step, epoch, best, running, count)
                log.info("stopped by %s at step %d (epoch %d + %d steps); checkpoint %s", signal.Signals(stop[0]).name,
                         step, epoch, count, ckpt_path)
                raise TrainingInterrupted(stop[0], step, ckpt_path)
            blurred, sharp = source.batch(int(config.batch_size or 1), config.patch, rng)
            b, s = _nchw(blurred, device), _nchw(sharp, device)
            restored = run_network(net, b)
            fake_logits = None
            use_adv = disc is not None and step >= config.adv_start
            if use_adv and disc is not None and d_opt is not None:
                d_opt.zero_grad(set_to_none=True)
                d_loss = discriminator_loss(disc.logits(_to_net(s, net)), disc.logits(_to_net(restored.detach(), net)))
                d_loss.backward()
                d_opt.step()
                fake_logits = disc.logits(_to_net(restored, net))
            terms = loss_fn(restored, s, fake_logits)  # type: ignore[operator]
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            step += 1
            if config.schedule != "plateau":
                sched.step()  # type: ignore[attr-defined]
                if d_sched is not None:
                    with warnings.catch_warnings():
                        # before --adv-start the discriminator's schedule advances without optimiser
                        # steps, so that both networks share one learning-rate curve
                        warnings.simplefilter("ignore", UserWarning)
                        d_sched.step()  # type: ignore[attr-defined]
            value = float(terms["total"].detach())
            if not math.isfinite(value):
                raise RuntimeError(f"training diverged at step {step}: loss {value}; lower --lr")
            running += value
            count += 1
            if bar is not None:
                bar.update(1)
                eta: dict[str, str] = {} if math.isinf(deadline) else {
                    "eta": _eta_text(step - first_step, config.steps - step, time.monotonic(), start, deadline)}
                bar.set_postfix(loss=f"{value:.4f}", best=f"{best:.2f}dB", **eta, refresh=False)
            out_of_time = time.monotonic() > deadline
            if step % config.steps_per_epoch == 0 or step == config.steps or out_of_time:
                epoch += 1
                vp, vs, ip, is_ = validate(net, validation, device, multiple) if validation else (math.nan,) * 4
                report = EpochReport(
                    epoch, step, running / max(1, count), vp, vs, ip, is_, opt.param_groups[0]["lr"],
                    time.monotonic() - start,
                )
                reports.append(report)
                running, count = 0.0, 0
                if config.schedule == "plateau":
                    sched.step(-vp if validation else report.train_loss)  # type: ignore[attr-defined]
                    if d_sched is not None:
                        d_sched.step(-vp if validation else report.train_loss)  # type: ignore[attr-defined]
                log.info(
                    "epoch %d step %d loss %.5f val PSNR %.3f dB (input %.3f, gain %+.3f) SSIM %.4f (input %.4f) lr %.2e",
                    epoch, step, report.train_loss, vp, ip, report.gain_db, vs, is_, report.lr,
                )
                info = {"step": step, "epoch": epoch, "val_psnr": f"{vp:.4f}", "val_input_psnr": f"{ip:.4f}",
                        "val_ssim": f"{vs:.4f}", "val_input_ssim": f"{is_:.4f}", "data": config.data_description}
                if config.prior:
                    info["prior"] = config.prior
                # the latest weights too: with a decaying rate they can beat the best-validation ones
                export_weights(net, out / "last.safetensors", config.arch, config.arch_kwargs, info)
                if validation and vp > best:
                    best = vp
                    _replace_with_copy(out / "last.safetensors", out / "best.safetensors")
                    if config.export is not None:
                        _replace_with_copy(out / "best.safetensors", Path(config.export))
                    log.info("new best %.3f dB at step %d → %s", vp, step, out / "best.safetensors")
                elif not validation and config.export is not None:  # nothing to choose a best by: the latest
                    _replace_with_copy(out / "last.safetensors", Path(config.export))
                save(step, epoch, best, 0.0, 0)
                if out_of_time:
                    log.info("stopping at step %d: the %.1f-minute limit was reached", step, config.max_minutes)
                    break
    finally:
        if bar is not None:
            bar.close()
    return reports


def _save_checkpoint(
    path: Path,
    config: TrainConfig,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: object,
    disc: nn.Module | None,
    d_opt: torch.optim.Optimizer | None,
    d_sched: object,
    step: int,
    epoch: int,
    best: float,
    rng: np.random.Generator,
    source: PairSource,
    split: Split | None = None,
    running: float = 0.0,
    count: int = 0,
) -> None:
    ckpt: dict[str, object] = {
        "arch": config.arch,
        "arch_kwargs": json.dumps(config.arch_kwargs, sort_keys=True),
        "lr": float(config.lr or 0.0),  # the base rate, which a --lr given on resume replaces (_resume_lr)
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),  # type: ignore[attr-defined]
        "step": step,
        "epoch": epoch,
        "best_psnr": best,
        "numpy_rng": json.dumps(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
        "running_loss": running,
        "running_count": count,
    }
    if split is not None:
        ckpt["split"] = json.dumps({"training": sorted(split.training), "validation": sorted(split.validation)})
    if disc is not None and d_opt is not None:
        ckpt["disc"] = disc.state_dict()
        ckpt["disc_optimizer"] = d_opt.state_dict()
        ckpt["disc_schedule"] = d_sched.state_dict()  # type: ignore[attr-defined]
    if hasattr(source, "state_dict"):
        ckpt["source"] = source.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
