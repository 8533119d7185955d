"""PSNR gains of the learned seed models on held-out photographs, alone, averaged, and next to l0-blind.

Test cases: crops of the two photographs held out of training (scikit-image's
``chelsea`` and ``coffee``; or, with ``--photos unseen``, PyWavelets' ``ascent``
and ``aero``, which no model trains on; since 2026-12-04 the choice of which refiner
checkpoints to ship has looked at them too), each
blurred with random camera-shake kernels and defocus discs (reflect borders,
0.5 % Gaussian noise). Prints each model's mean PSNR gain over the blurred
input, the equal-weight average of the learned models, and (with ``--l0``)
the weights that ``models.ensemble.fit_weights`` gives l0-blind and the
learned models, with the gain of a few fixed weightings.

    python bench/bench_learned.py [--l0] [--crops 4] [--size 192] [--photos unseen] \
        [--model seed002-unet --model seed001-gan:weights=PATH ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from models.catalog import REGISTRY, in_light, parse_ensemble
from models.ensemble import fit_weights
from models.loading import load_model
from models.tone import LIGHT_CHOICES
from models.synthetic_blur import (
    black_and_white,
    blur_image,
    disk_kernel,
    random_motion_kernel,
    sample_photographs,
    unseen_photographs,
)


def bench_photographs(which: str) -> dict[str, np.ndarray]:
    """The photographs to crop test cases from, uint8 HxWx3.

    ``held-out``: scikit-image's ``chelsea`` and ``coffee``, kept out of the
    learned models' training but used to pick checkpoints and ensemble
    weights; ``unseen``: PyWavelets' ``ascent`` and ``aero``, which no
    model trains on (shipping decisions have looked at them since 2026-12-04).
    """
    if which == "unseen":
        photos = unseen_photographs()
        if not photos:
            raise SystemExit("--photos unseen needs PyWavelets: pip install PyWavelets, or pip install -e '.[test]'")
        return photos
    photos = sample_photographs()
    return {name: photos[name] for name in ("chelsea", "coffee")}


# how the grey cases are made (see cases()): not at all, a colour scan of a grey print, a grey file
GREY_KINDS: tuple[str, ...] = ("", "scan", "file")


def cases(crops: int, size: int, seed: int = 11, which: str = "held-out", light: str = "encoded",
          grey: str = "") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, blurred, sharp) float64 HxWx3 test cases from the ``which`` photographs (:func:`bench_photographs`).

    ``light`` is where the blur happens (:func:`models.synthetic_blur.blur_image`). ``grey`` (one of
    :data:`GREY_KINDS`) makes each photograph black and white first, its Rec. 601 luminance in all
    three channels: ``"scan"`` keeps the noise added after the blur drawn per channel, as in a colour
    scan of a black-and-white print (and as for the unseen photographs, which are grey); ``"file"``
    then puts the first channel's noise in all three, as in a grey file read as RGB. The two share
    crops, kernels and noise draws, so they differ only in that.
    """
    if grey not in GREY_KINDS:
        raise ValueError(f"unknown grey kind {grey!r}; use one of {GREY_KINDS}")
    rng = np.random.default_rng(seed)
    out = []
    for name, photo in bench_photographs(which).items():
        img = photo.astype(np.float64) / 255
        if grey:
            img = black_and_white(img)
        h, w = img.shape[:2]
        for _ in range(crops):
            y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            sharp = img[y : y + size, x : x + size]
            kernels = [
                ("motion9", random_motion_kernel(9, rng)),
                ("motion15", random_motion_kernel(15, rng)),
                ("motion23", random_motion_kernel(23, rng)),
                ("disk2", disk_kernel(2.0)),
                ("disk4", disk_kernel(4.0)),
            ]
            for label, k in kernels:
                blurred = blur_image(sharp, k, noise_sigma=0.005, rng=rng, light=light)
                if grey == "file":
                    blurred = np.repeat(blurred[..., :1], 3, axis=2)
                out.append((f"{name}:{label}", blurred, sharp))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(np.mean((a - b) ** 2)))


def run_all(specs: list[str], data: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[dict[str, list[np.ndarray]], dict[str, float]]:
    """Every model's outputs and seconds, case by case.

    Case-major order lets refiners reuse l0-blind's result on each case
    (:mod:`models.shared_results`): the first model in ``specs`` that needs
    it pays for it, so list ``l0-blind`` first to time the refiners alone.
    """
    models = {spec: load_model(REGISTRY.parse(spec), torch.device("cpu")) for spec in specs}
    outs: dict[str, list[np.ndarray]] = {spec: [] for spec in specs}
    seconds = dict.fromkeys(specs, 0.0)
    for _, blurred, _ in data:
        x = torch.from_numpy(blurred).permute(2, 0, 1)[None].float()
        for spec, model in models.items():
            t = time.perf_counter()
            outs[spec].append(model(x).image[0].permute(1, 2, 0).double().numpy())
            seconds[spec] += time.perf_counter() - t
    return outs, seconds


def _gains(outs: list[np.ndarray], data: list[tuple[str, np.ndarray, np.ndarray]], base: list[float]) -> list[float]:
    return [psnr(o, s) - b0 for o, (_, _, s), b0 in zip(outs, data, base, strict=True)]


def _print_mix(mix: dict[str, float], outputs: dict[str, list[np.ndarray]],
               data: list[tuple[str, np.ndarray, np.ndarray]], base: list[float]) -> None:
    total = sum(mix.values())
    mixed = [sum(w / total * outputs[n][i] for n, w in mix.items()) for i in range(len(data))]
    gains = _gains(mixed, data, base)  # type: ignore[arg-type]
    label = " + ".join(f"{n}:{w:g}" for n, w in mix.items())
    print(f"  {label}: gain {np.mean(gains):+.3f} dB ({sum(g < 0 for g in gains)} of {len(gains)} worse)")


def parse_mix(text: str) -> dict[str, float]:
    """``'l0-blind=1;seed002-refine=3'`` as {spec: weight}; exits with a usage message when malformed."""
    mix: dict[str, float] = {}
    for part in text.split(";"):
        name, sep, weight = part.strip().rpartition("=")
        try:
            mix[name] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name or mix[name] <= 0:
            raise SystemExit(f"--mix {text!r}: expected MODEL=WEIGHT pairs with positive weights, "
                             "separated by ';' (e.g. 'l0-blind=1;seed002-refine=3')")
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", action="append", default=None,
                        help="learned model spec (repeatable; default: the shipped seed002-unet, seed001-refine, "
                             "seed002-refine)")
    parser.add_argument("--l0", action="store_true", help="also run l0-blind and fit ensemble weights")
    parser.add_argument("--mix", action="append", default=None,
                        help="a weighted average to score, e.g. 'l0-blind=1;seed002-refine=3' (repeatable)")
    parser.add_argument("--crops", type=int, default=4, help="random crops per photograph (5 blurs each)")
    parser.add_argument("--size", type=int, default=192, help="side of the square crops in pixels")
    parser.add_argument("--photos", choices=("held-out", "unseen"), default="held-out",
                        help="held-out: chelsea and coffee, out of training but used to pick checkpoints and "
                             "weights (default); unseen: PyWavelets' ascent and aero, which no model trains on "
                             "(the fairest figures here, though shipping decisions have looked at them)")
    parser.add_argument("--light", choices=LIGHT_CHOICES, default="encoded",
                        help="where the blur happens: encoded, the stored values (default); linear, linear light "
                             "as a shaking camera blurs; every model with a 'light' parameter is then run with "
                             "light=linear unless its spec sets it")
    greys = parser.add_mutually_exclusive_group()
    greys.add_argument("--grey", action="store_true",
                        help="make the photographs black and white first (luminance in all three channels), as "
                             "in a colour scan of monochrome prints (noise drawn per channel); the unseen "
                             "photographs already are")
    greys.add_argument("--grey-file", action="store_true",
                        help="as --grey, with the same noise in all three channels, as in a grey file read as "
                             "RGB (the same crops, kernels and noise draws as --grey)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = args.model or ["seed002-unet", "seed001-refine", "seed002-refine"]
    specs = [in_light(REGISTRY.parse(s), args.light).to_text() if args.light != "encoded" else s for s in specs]
    l0 = in_light(REGISTRY.parse("l0-blind"), args.light).to_text()
    names = [l0, *specs] if args.l0 else specs
    mixes = [parse_mix(text) for text in args.mix or []]  # checked before minutes of restoring
    for mix in mixes:
        missing = [n for n in mix if n not in names]
        if missing:
            raise SystemExit(f"--mix names {missing}, which this run does not restore; add them with --model "
                             "(or --l0 for l0-blind)")
    grey = "file" if args.grey_file else "scan" if args.grey else ""
    data = cases(args.crops, args.size, which=args.photos, light=args.light, grey=grey)
    base = [psnr(b, s) for _, b, s in data]
    kind = {"": "", "scan": " grey", "file": " grey file"}[grey]
    print(f"{len(data)} cases ({args.crops} crops of {args.size}px per {args.photos}{kind} photo x 5 blurs); "
          f"blurred input mean PSNR {np.mean(base):.3f} dB")
    outputs, seconds = run_all(names, data)
    for spec in names:
        gains = _gains(outputs[spec], data, base)
        by_kind = ", ".join(
            f"{kind} {np.mean([g for g, (lab, _, _) in zip(gains, data, strict=True) if kind in lab]):+.3f}"
            for kind in ("motion", "disk")
        )
        print(f"{spec:>28}: gain {np.mean(gains):+.3f} dB (median {np.median(gains):+.3f}; {by_kind}; "
              f"{sum(g < 0 for g in gains)} of {len(gains)} worse)  [{seconds[spec]:.1f} s]")
    if len(specs) > 1:
        avg = [np.mean([outputs[s][i] for s in specs], axis=0) for i in range(len(data))]
        print(f"{'equal average':>28}: gain {np.mean(_gains(avg, data, base)):+.3f} dB")
        learned_stacks = [np.stack([outputs[s][i] for s in specs]) for i in range(len(data))]
        fitted, lrep = fit_weights(learned_stacks, [s for _, _, s in data])
        print("  learned-only weights fitted on these cases (in-sample): "
              + ", ".join(f"{n}={w:.3f}" for n, w in zip(specs, fitted, strict=True))
              + f" -> gain {lrep.psnr_fitted - np.mean(base):+.3f} dB")
    if args.l0:
        stacks = [np.stack([outputs[n][i] for n in names]) for i in range(len(data))]
        targets = [s for _, _, s in data]
        weights, report = fit_weights(stacks, targets)
        print("fitted weights: " + ", ".join(f"{n}={w:.3f}" for n, w in zip(names, weights, strict=True))
              + f" -> gain {report.psnr_fitted - np.mean(base):+.3f} dB")
        default = parse_ensemble([], light=args.light).members
        by_name: dict[str, str] = {}
        for n in names:  # the plain spec of a model if it runs, else its first variant
            name = REGISTRY.parse(n).name
            if name not in by_name or n == in_light(REGISTRY.parse(name), args.light).to_text():
                by_name[name] = n
        if all(m.name in by_name for m in default):
            print("  shipped default ensemble:", end="")
            _print_mix({by_name[m.name]: m.weight for m in default}, outputs, data, base)
    for mix in mixes:
        _print_mix(mix, outputs, data, base)
    if args.l0:
        for lw in (0.0, 0.25, 0.5, 1.0):
            w = np.array([1.0] + [lw] * len(specs))
            mixed = [np.tensordot(w / w.sum(), st, axes=1) for st in stacks]
            print(f"  l0-blind:1 + each learned:{lw}: gain {np.mean(_gains(mixed, data, base)):+.3f} dB")


if __name__ == "__main__":
    main()
