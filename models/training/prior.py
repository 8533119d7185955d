"""Training data for refiners: networks conditioned on a blind method's result.

A refiner sees the blurred image *and* what a weight-free blind method (by
default ``l0-blind``) made of it, and learns to correct that result: ringing
from a slightly wrong kernel, noise the deconvolution amplified, blur the
kernel estimate missed. Running the blind method costs seconds per patch, far
more than a training step, so its results are computed once into a cache
directory and training then samples patches from the cache:

* :func:`build_cache` fills ``DIR/chunk-NNNNN.npz`` files, each holding
  ``chunk_size`` (blurred, prior, sharp) triplets of synthetic blur made by
  :class:`~models.training.data.SyntheticPairs` with a generator seeded by
  (seed, chunk index) — so chunks are reproducible and independent. Several
  processes may fill the same directory at once (each claims a chunk with a
  lock file naming its host and process), which is how both cores of a
  machine are used; a chunk whose claimant on this host has died (killed,
  out of memory) is claimed again.
* :func:`validation_triplets` does the same for the fixed validation crops.
* :class:`PriorPairs` samples random crops of the cached triplets (with the
  same flip/rotation on all three) as 6-channel inputs ``[blurred, prior]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from jobs.errors import InputError
from models.training.data import BlurSynthesizer, SyntheticPairs, augment_pair

Triplet = tuple[np.ndarray, np.ndarray, np.ndarray]


def prior_runner(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping a float32 HxWx3 image in [0, 1] to the result of the model ``spec`` (CPU)."""
    import torch

    from models.catalog import REGISTRY
    from models.loading import load_model

    model = load_model(REGISTRY.parse(spec), torch.device("cpu"))

    def run(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        return model(x).image[0].permute(1, 2, 0).numpy().astype(np.float32)

    return run


def check_prior(model: str, prior: str) -> None:
    """Refuse, before anything runs, a ``--prior`` whose refiner could not be used or trained as asked.

    The prior must be weight-free (a classic model such as ``l0-blind`` or ``wiener``): the refiner's
    weights name it in their metadata and it is rebuilt from that name alone at inference. A registered
    refiner (``seed002-refine``) loads only weights refining its own prior (:mod:`models.learned`), so
    training it on another prior gave weights that ``deblur restore`` refused after the whole run; the
    bare architecture (``seed002``), restored as its plain model with ``weights=``, takes any prior.
    """
    from models.catalog import REGISTRY
    from models.learned import SEED_MODELS, resolve_arch

    info = REGISTRY.get(REGISTRY.parse(prior).name)
    if info.family != "classic":
        raise InputError(f"--prior {prior}: {info.name!r} is a learned model ({info.family}); a refiner's prior must "
                         "be weight-free, one of: " + ", ".join(i.name for i in REGISTRY if i.family == "classic"))
    own = SEED_MODELS[model].prior if model in SEED_MODELS else ""
    if own and REGISTRY.parse(own).name != info.name:
        arch, options = resolve_arch(model)
        plain = next(name for name, m in SEED_MODELS.items() if m.arch == arch and not m.prior)
        command = ["deblur train", arch, f"--prior '{prior}'",  # the shipped model's options, as JSON values
                   *(f"--arch-option {k}={json.dumps(v)}" for k, v in options.items() if k != "in_channels")]
        raise InputError(
            f"{model!r} refines {own}: its weights load only as a refiner of {own}, so one trained on --prior "
            f"{prior} could not be used as {model!r}. To refine {info.name}, train the bare architecture: "
            f"{' '.join(command)} -o RUN_DIR, then restore with -m {plain}:weights=RUN_DIR/best.safetensors; "
            f"or drop --prior to train {model!r} on {own}"
        )


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}.npz"


def _complete_chunks(folder: Path) -> list[Path]:
    """The finished chunk files (a chunk being written is ``chunk-N.tmp.npz``)."""
    return [p for p in sorted(folder.glob("chunk-*.npz")) if ".tmp" not in p.name]


def _stored_shape(path: Path, name: str = "sharp") -> tuple[int, ...]:
    """Shape of one array in an ``.npz`` file, read from its header without loading the data."""
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
        version = np.lib.format.read_magic(member)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read(member)
    return tuple(shape)


def _save(path: Path, triplets: Sequence[Triplet], spec: str, recipe: str = "") -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        blurred=np.stack([t[0] for t in triplets]).astype(np.float16),
        prior=np.stack([t[1] for t in triplets]).astype(np.float16),
        sharp=np.stack([t[2] for t in triplets]).astype(np.float16),
        spec=np.array(spec),
        recipe=np.array(recipe),
    )
    tmp.replace(path)


def build_cache(
    folder: Path,
    images: dict[str, np.ndarray],
    spec: str,
    patches: int,
    size: int = 192,
    chunk_size: int = 25,
    seed: int = 0,
    progress: bool = True,
    synth: BlurSynthesizer | None = None,
) -> int:
    """Fill ``folder`` with chunks until it holds ``patches`` triplets of ``size`` pixels; returns the count.

    Chunks already present (or claimed by another process, see the module
    docstring) are skipped, so an interrupted build resumes where it stopped.
    The patches are blurred by ``synth`` (default: :class:`BlurSynthesizer`'s
    defaults). A cache made with another prior spec, patch size or blur recipe (light, grey share) is refused.
    """
    synth = synth or BlurSynthesizer()
    folder.mkdir(parents=True, exist_ok=True)
    chunks = -(-patches // chunk_size)
    todo = [i for i in range(chunks) if not _chunk_path(folder, i).exists()]
    _check_cache(folder, spec, size, synth.recipe)
    runner = prior_runner(spec) if todo else None
    source = SyntheticPairs(images, synth, kernel_bank=0, augment=False) if todo else None
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * chunk_size, desc=f"{spec} on training patches", unit="patch", mininterval=5.0)
    try:
        for index in todo:
            lock = folder / f"chunk-{index:05d}.lock"
            if not claim(lock):
                continue  # another live process is making this chunk
            try:
                if _chunk_path(folder, index).exists():
                    continue
                rng = np.random.default_rng([seed, index])  # stateless source: a chunk depends on its index only
                assert runner is not None and source is not None  # both exist whenever there is work to do
                triplets = []
                for _ in range(chunk_size):
                    blurred, sharp = source.pair(size, rng)
                    triplets.append((blurred, runner(blurred), sharp))
                    if bar is not None:
                        bar.update(1)
                _save(_chunk_path(folder, index), triplets, spec, synth.recipe)
            finally:
                lock.unlink(missing_ok=True)
    finally:
        if bar is not None:
            bar.close()
    return sum(_stored_shape(p)[0] for p in _complete_chunks(folder))


def claim(lock: Path) -> bool:
    """Create ``lock`` (holding ``host pid``) unless a live process holds it; True if this process now does.

    A lock left by a process of this host that no longer runs is taken over;
    one from another host is respected, since its process cannot be checked.
    """
    mine = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _stale(lock):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(mine)
        return True
    return False


def _stale(lock: Path) -> bool:
    """Whether ``lock`` was written by a process of this host that is gone."""
    try:
        host, _, pid = lock.read_text().strip().rpartition(" ")
    except OSError:
        return False
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False


def _check_cache(folder: Path, spec: str, size: int, recipe: str = "") -> None:
    """Refuse a cache made with another prior spec, patch size or blur recipe (the first chunk tells)."""
    for path in _complete_chunks(folder)[:1]:
        with np.load(path) as data:
            found = str(data["spec"])
            # caches from before the grey share stored only the light ("" for stored values)
            key = "recipe" if "recipe" in data.files else "light" if "light" in data.files else None
            found_recipe = str(data[key]) if key else ""
        side = _stored_shape(path)[1]
        if found != spec or side != size or found_recipe != recipe:
            raise InputError(
                f"prior cache {str(folder)!r} holds {side}-pixel patches made with {found!r}"
                f"{' (' + found_recipe + ')' if found_recipe else ''}, not {size}-pixel patches of {spec!r}"
                f"{' (' + recipe + ')' if recipe else ''}; give another --prior-cache directory"
            )


def load_cache(folder: Path, limit: int | None = None) -> list[Triplet]:
    """The (blurred, prior, sharp) float32 triplets of every complete chunk in ``folder``."""
    out: list[Triplet] = []
    for path in _complete_chunks(folder):
        with np.load(path) as data:
            for b, p, s in zip(data["blurred"], data["prior"], data["sharp"], strict=True):
                out.append((b.astype(np.float32), p.astype(np.float32), s.astype(np.float32)))
    if not out:
        raise InputError(f"prior cache {str(folder)!r} holds no complete chunks; build it first")
    return out[:limit]


def validation_triplets(
    folder: Path, pairs: Sequence[tuple[np.ndarray, np.ndarray]], spec: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation pairs ``(concat[blurred, prior], sharp)``, the prior's results cached in ``folder``."""
    if not pairs:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"validation-{len(pairs)}-{pairs[0][0].shape[0]}x{pairs[0][0].shape[1]}.npz"
    inputs = _digest(b for b, _ in pairs)
    priors: list[np.ndarray] = []
    if path.exists():
        with np.load(path) as data:
            # the same prior on the same crops (other photographs or another light make other crops)
            if str(data["spec"]) == spec and "inputs" in data.files and str(data["inputs"]) == inputs:
                priors = [p.astype(np.float32) for p in data["prior"]]
    if not priors:
        runner = prior_runner(spec)
        # rounded as stored, so a run validates the same whether the cache existed or not
        priors = [runner(b).astype(np.float16).astype(np.float32) for b, _ in pairs]
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, prior=np.stack(priors).astype(np.float16), spec=np.array(spec), inputs=np.array(inputs))
        tmp.replace(path)
    return [(np.concatenate([b, p], axis=2), s) for (b, s), p in zip(pairs, priors, strict=True)]


def _digest(images: Iterable[np.ndarray]) -> str:
    """A digest of the images' shapes and bytes: which validation crops a cached prior belongs to."""
    digest = hashlib.blake2b(digest_size=16)
    for image in images:
        data = np.ascontiguousarray(image, dtype=np.float32)
        digest.update(str(data.shape).encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


class PriorPairs:
    """Random crops of cached (blurred, prior, sharp) triplets as ``([blurred, prior], sharp)`` pairs."""

    def __init__(self, triplets: Sequence[Triplet], augment: bool = True) -> None:
        if not triplets:
            raise InputError("no cached prior triplets to train on")
        self.triplets = list(triplets)
        self.augment = augment

    def batch(self, size: int, patch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = [], []
        for _ in range(size):
            b, p, s = self.triplets[int(rng.integers(0, len(self.triplets)))]
            h, w = s.shape[:2]
            if h < patch or w < patch:
                raise InputError(f"cached patches of {w}x{h} pixels are smaller than the {patch}-pixel training patch")
            y, x = int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))
            both = np.concatenate([b[y : y + patch, x : x + patch], p[y : y + patch, x : x + patch]], axis=2)
            target = s[y : y + patch, x : x + patch]
            if self.augment:
                both, target = augment_pair(both, target, rng)
            inputs.append(both)
            targets.append(np.ascontiguousarray(target))
        return np.stack(inputs), np.stack(targets)
