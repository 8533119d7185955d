"""``deblur train``: train one of the seeds' architectures (mounted by the main CLI).

Every option also reads an environment variable ``DEBLUR_TRAIN_<OPTION>``
(e.g. ``DEBLUR_TRAIN_STEPS=20000``), for container deployments.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from jobs.errors import InputError
from models.tone import LIGHT_CHOICES

_ENV = "DEBLUR_TRAIN_"


def _env(name: str) -> str:
    return _ENV + name.upper().replace("-", "_")


def _parse_options(pairs: tuple[str, ...]) -> dict[str, object]:
    """``key=value`` architecture options; values are parsed as JSON where possible (``width=48``)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--arch-option")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _finished(output: Path, steps: int, say: Callable[[str], None]) -> bool:
    """Whether the run to resume in ``output`` is already at ``steps`` or beyond, said so: it used to exit 0
    without a word, which looked like a resume that trained."""
    from models.training.loop import existing_run_step

    if not (output / "last.pt").is_file():  # --resume goes on from last.pt only
        return False
    step = existing_run_step(output)
    if step is None or step < steps:
        return False
    say(f"nothing to do: the run in {output} is at step {step} of --steps {steps}; raise --steps to train further")
    return True


@click.command(
    "train",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("arch", envvar=_env("arch"))
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), required=True, envvar=_env("output"),
              help="Run directory: train.log, last.pt (checkpoint for --resume), best.safetensors (best validation) "
                   "and last.safetensors (latest epoch) go here.")
@click.option("--pairs", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar=_env("pairs"),
              help="Folder of real blurred/sharp pairs in GoPro layout (SCENE/blur/X.png next to SCENE/sharp/X.png); "
                   "with two scenes or more, whole scenes are held out for validation.")
@click.option("--blurred-prefix", envvar=_env("blurred_prefix"),
              help="S3 prefix of blurred images (s3://bucket/blur/); pairs with --sharp-prefix by relative key.")
@click.option("--sharp-prefix", envvar=_env("sharp_prefix"), help="S3 prefix of the matching sharp images.")
@click.option("--sharp", "sharp_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), envvar=_env("sharp"),
              help="Folder of sharp images to blur synthetically. Default (no data option): the photographs "
                   "shipped inside installed packages (scikit-image, scikit-learn, matplotlib).")
@click.option("--light", type=click.Choice([*LIGHT_CHOICES, "mixed"]), default="encoded", show_default=True,
              envvar=_env("light"),
              help="Where synthetic blur happens: encoded, the stored values (as synthetic benchmarks blur); "
                   "linear, linear light with the sRGB curve put back after, as a shaking camera blurs (a "
                   "refiner's prior then runs in linear light too, as it will at inference); mixed, half of each.")
@click.option("--grey-share", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              envvar=_env("grey_share"),
              help="Share of synthetic samples made black and white before the blur (the photograph's luminance "
                   "in all three channels), so the model also learns monochrome photographs; the shipped "
                   "refiners and seed002-unet were fine-tuned with 0.3.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.1, show_default=True,
              envvar=_env("val_fraction"),
              help="Share of images, pairs or scenes held out for validation, chosen by a hash of each one's name "
                   "(the same whatever --seed, and adding files moves none of the others); at least one of two or "
                   "more. Without validation no best weights are chosen.")
@click.option("--val-count", type=click.IntRange(1), default=16, show_default=True, envvar=_env("val_count"),
              help="Validation crops drawn from the held-out images (synthetic blur, fixed seed).")
@click.option("--val-size", type=click.IntRange(32), default=192, show_default=True, envvar=_env("val_size"),
              help="Side of each validation crop in pixels.")
@click.option("--steps", type=click.IntRange(1), default=10_000, show_default=True, envvar=_env("steps"),
              help="Optimiser steps in total (a resumed run continues up to this number).")
@click.option("--steps-per-epoch", type=click.IntRange(1), default=500, show_default=True,
              envvar=_env("steps_per_epoch"), help="Steps between validations and checkpoints.")
@click.option("--max-minutes", type=click.FloatRange(0.1), envvar=_env("max_minutes"),
              help="Stop (after validating and checkpointing) once this much wall-clock time has passed.")
@click.option("--batch-size", type=click.IntRange(1), envvar=_env("batch_size"),
              help="Patches per step [default: the seed's, 4 for seed001/seed003, 8 for seed002].")
@click.option("--patch", type=click.IntRange(16), default=128, show_default=True, envvar=_env("patch"),
              help="Side of the square training patches in pixels.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "rmsprop", "sgd"]), envvar=_env("optimizer"),
              help="[default: the seed's: Adam for seed001/seed003, RMSprop (rho 0.9) for seed002]")
@click.option("--lr", type=click.FloatRange(0.0, min_open=True), envvar=_env("lr"),
              help="Learning rate [default: the seed's: 5e-4, 1e-3, 1e-4]. With --resume, a run goes on at its own "
                   "rate; a --lr given replaces it, scaling every rate of its schedule by new/old (said on stderr).")
@click.option("--weight-decay", type=click.FloatRange(0.0), envvar=_env("weight_decay"),
              help="L2 weight decay [default: 5e-4 for seed001, else 0].")
@click.option("--schedule", type=click.Choice(["plateau", "cosine", "constant"]), envvar=_env("schedule"),
              help="Learning-rate schedule [default: plateau (halve after 5 flat epochs) for seed001, else constant].")
@click.option("--loss", type=click.Choice(["seed001", "seed002", "l1", "mse"]), envvar=_env("loss"),
              help="seed001 = MSE + 0.3(1-SSIM) + 0.01 adversarial; seed002 = MAE + Sobel + Fourier "
                   "[default: the architecture's own; l1 for seed003].")
@click.option("--balance", type=click.Choice(["mean", "log"]), default="mean", show_default=True,
              envvar=_env("balance"),
              help="How per-image losses are averaged: mean (the seeds'), or log (every image's relative "
                   "improvement counts the same, like mean PSNR; keeps mild blurs from being over-sharpened).")
@click.option("--adversarial/--no-adversarial", default=None, envvar=_env("adversarial"),
              help="Train a PatchGAN discriminator alongside [default: on for seed001].")
@click.option("--adv-start", type=click.IntRange(0), default=0, show_default=True, envvar=_env("adv_start"),
              help="Step at which the adversarial term is switched on (pixel losses only before).")
@click.option("--disc-width", type=click.IntRange(4), default=64, show_default=True, envvar=_env("disc_width"),
              help="Channels of the discriminator's first layer.")
@click.option("--arch-option", "arch_options", multiple=True, envvar=_env("arch_option"),
              help="Architecture option KEY=VALUE, repeatable (seed001: width, scale; seed002: width; "
                   "seed003: hidden_dim, layers, heads, vit_checkpoint).")
@click.option("--prior", envvar=_env("prior"),
              help="Train a refiner conditioned on this weight-free model's result (e.g. l0-blind, wiener): the "
                   "network sees [blurred, prior] and corrects the prior. A -refine model takes its own prior only; "
                   "for another, train the bare architecture (seed001, seed002) and restore it with weights=. Its "
                   "results on synthetic training patches are computed once into --prior-cache.")
@click.option("--prior-cache", type=click.Path(file_okay=False, path_type=Path), envvar=_env("prior_cache"),
              help="Directory of the prior's cached results [default: OUTPUT/prior-cache]. Start the same "
                   "command in a second shell to fill it on two cores; an interrupted build resumes.")
@click.option("--prior-patches", type=click.IntRange(1), default=1000, show_default=True,
              envvar=_env("prior_patches"), help="Synthetic training patches to run the prior on.")
@click.option("--prior-size", type=click.IntRange(64), default=192, show_default=True, envvar=_env("prior_size"),
              help="Side of those patches (training crops of --patch pixels are cut from them).")
@click.option("--seed", type=int, default=0, show_default=True, envvar=_env("seed"),
              help="Random seed; the same seed, data and thread count give the same run.")
@click.option("--init", "init_weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar=_env("init"), help="Start from these .safetensors weights (fine-tuning) instead of random ones.")
@click.option("--resume/--no-resume", default=False, envvar=_env("resume"),
              help="Continue from OUTPUT/last.pt if it exists. Without it, an OUTPUT holding a run is refused. "
                   "Ctrl-C or SIGTERM saves last.pt at the current step, so a resume goes on from there.")
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path), envvar=_env("export"),
              help="Also copy the best weights (.safetensors) here whenever validation improves (without "
                   "validation data: the latest weights, every epoch).")
@click.option("--device", default="auto", show_default=True, envvar=_env("device"),
              help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True, envvar=_env("threads"),
              help="CPU threads torch may use.")
@click.option("--progress/--no-progress", default=True, envvar=_env("progress"), help="Show a progress bar.")
def train_command(
    arch: str,
    output: Path,
    pairs: Path | None,
    blurred_prefix: str | None,
    sharp_prefix: str | None,
    sharp_dir: Path | None,
    light: str,
    grey_share: float,
    val_fraction: float,
    val_count: int,
    val_size: int,
    steps: int,
    steps_per_epoch: int,
    max_minutes: float | None,
    batch_size: int | None,
    patch: int,
    optimizer: str | None,
    lr: float | None,
    weight_decay: float | None,
    schedule: str | None,
    loss: str | None,
    balance: str,
    adversarial: bool | None,
    adv_start: int,
    disc_width: int,
    arch_options: tuple[str, ...],
    prior: str | None,
    prior_cache: Path | None,
    prior_patches: int,
    prior_size: int,
    seed: int,
    init_weights: Path | None,
    resume: bool,
    export: Path | None,
    device: str,
    threads: int,
    progress: bool,
) -> None:
    """Train ARCH on blurred/sharp pairs and write its weights as .safetensors.

    ARCH is an architecture (seed001, seed002, seed003) or a learned seed model
    from the registry (seed001-gan, seed002-unet, seed001-refine, seed002-refine,
    seed003-vit), whose shipped architecture options are then used. The
    -refine models correct l0-blind's result: they imply --prior l0-blind
    and take no other (train the bare architecture to refine another).

    \b
    Data (choose one; default: synthetic blur of package photographs):
      --pairs DIR                          real pairs in GoPro layout
      --blurred-prefix S3 --sharp-prefix S3  real pairs on S3
      --sharp DIR                          sharp images, blurred on the fly
    Synthetic blur = random camera shake (5-25 px), defocus discs (1-6 px),
    Gaussian, noise (0-2%) and occasional JPEG, in stored values or in
    linear light (--light), on colour or, for a share, black-and-white
    scenes (--grey-share).

    Every option can also be set with an environment variable
    DEBLUR_TRAIN_<OPTION>, e.g. DEBLUR_TRAIN_STEPS=20000.

    \b
    Example:
      deblur train seed002-unet -o runs/unet --steps 20000 --max-minutes 90
      deblur train seed002-unet -o runs/unet --steps 20000 --resume
      deblur train seed002-refine -o runs/refine --prior-cache runs/l0cache --steps 5000
    """
    import numpy as np
    import torch

    from models.learned import default_prior, resolve_arch
    from models.training import data as D
    from models.training.loop import TrainConfig, TrainingInterrupted, check_output, train

    def say(message: str) -> None:
        click.echo(message, err=True)

    torch.set_num_threads(threads)
    try:
        data_options = [name for name, given in (("--pairs", pairs is not None),
                                                 ("--blurred-prefix/--sharp-prefix", bool(blurred_prefix or sharp_prefix)),
                                                 ("--sharp", sharp_dir is not None)) if given]
        if len(data_options) > 1:
            raise InputError(f"{' and '.join(data_options)} are different training data: choose one")
        check_output(output, resume)  # before loading data or running a prior: a finished run is not overwritten
        if resume and _finished(output, steps, say):
            return
        arch_name, arch_kwargs = resolve_arch(arch)
        arch_kwargs = {**arch_kwargs, **_parse_options(arch_options)}
        if prior:
            from models.training.prior import check_prior

            check_prior(arch, prior)
        prior = prior or default_prior(arch)
        if prior and light == "linear":
            from models.catalog import REGISTRY, in_light

            prior = in_light(REGISTRY.parse(prior), "linear").to_text()  # as the refiner will run it
        if int(arch_kwargs.get("in_channels", 3)) == 6 and not prior:  # type: ignore[call-overload]
            raise InputError("a refiner (in_channels=6) needs --prior, e.g. --prior l0-blind")
        validation: list[tuple[np.ndarray, np.ndarray]]
        synthetic_only = [name for name, given in (("--prior", bool(prior)), ("--light", light != "encoded"),
                                                   ("--grey-share", grey_share > 0)) if given]
        if synthetic_only and (pairs is not None or blurred_prefix or sharp_prefix):
            names = " and ".join(synthetic_only)
            raise InputError(
                f"{names} appl{'ies' if len(synthetic_only) == 1 else 'y'} to synthetic blur only; real pairs are "
                f"used as they were recorded: drop {names}, or train on sharp images (--sharp DIR, or no data "
                "option for the package photographs)"
            )
        if pairs is not None or blurred_prefix or sharp_prefix:
            if pairs is not None:
                loaded = D.named_pairs_from_folder(pairs, report=say)
                described = f"pairs from folder {pairs.name}"
            else:
                if not (blurred_prefix and sharp_prefix):
                    raise InputError("give both --blurred-prefix and --sharp-prefix for S3 pairs")
                loaded = D.named_pairs_from_s3(blurred_prefix, sharp_prefix, report=say)
                described = f"pairs from {blurred_prefix} / {sharp_prefix}"
            train_pairs, val_pairs, unit = D.split_pairs(loaded, val_fraction)
            D.check_patch_fits([(p.file, p.blurred) for p in train_pairs], patch)
            source: D.PairSource = D.PairedImages([(p.blurred, p.sharp) for p in train_pairs])
            validation = [(p.blurred[:val_size, :val_size], p.sharp[:val_size, :val_size]) for p in val_pairs]
            split = D.Split(tuple(p.name for p in train_pairs), tuple(p.name for p in val_pairs))
            if unit == "scene":
                scenes = sorted({p.scene for p in val_pairs})
                described += (f"; validation: {len(val_pairs)} pairs of {len(scenes)} unseen "
                              f"scene{'s' if len(scenes) != 1 else ''} ({', '.join(scenes[:5])}"
                              f"{', ...' if len(scenes) > 5 else ''})")
            elif val_pairs:
                described += f"; validation: {len(val_pairs)} of {len(loaded)} pairs of one scene"
        else:
            if sharp_dir is not None:
                files = sorted(p for p in sharp_dir.rglob("*") if p.suffix.lower() in D.IMAGE_SUFFIXES)
                if not files:
                    raise InputError(f"no images ({', '.join(D.IMAGE_SUFFIXES)}) under {str(sharp_dir)!r}")
                photos = {p.relative_to(sharp_dir).as_posix(): D.read_image(p) for p in files}
                train_imgs, val_imgs = D.split_photographs(photos, D.held_out_names(sorted(photos), val_fraction))
                described = f"synthetic blur of {len(train_imgs)} images from {sharp_dir.name}"
            else:
                train_imgs, val_imgs = D.split_photographs(D.package_photographs())
                described = f"synthetic blur of {len(train_imgs)} package photographs"
            split = D.Split(tuple(sorted(train_imgs)), tuple(sorted(val_imgs)))
            synth = D.BlurSynthesizer(linear_prob={"encoded": 0.0, "linear": 1.0, "mixed": 0.5}[light],
                                      grey_prob=grey_share)
            if synth.recipe:
                described += f" ({synth.recipe})"
            source = D.SyntheticPairs(train_imgs, synth)
            validation = D.synthetic_validation_set(val_imgs, val_count, val_size, synth=synth) if val_imgs else []
            if val_imgs:
                described += f"; validation: {', '.join(sorted(val_imgs))}"
            if prior:
                from models.training import prior as P

                if patch > prior_size:
                    raise InputError(f"--patch {patch} is larger than --prior-size {prior_size}")
                cache = prior_cache or output / "prior-cache"
                click.echo(f"running {prior} on {prior_patches} training patches into {cache} "
                           "(cached; reused by later runs)", err=True)
                # the cache does not depend on --seed, so runs with different seeds share it
                P.build_cache(cache, train_imgs, prior, prior_patches, prior_size, progress=progress, synth=synth)
                source = P.PriorPairs(P.load_cache(cache, prior_patches))
                validation = P.validation_triplets(cache, validation, prior)
                arch_kwargs["in_channels"] = 6
                described += f"; refining {prior} ({prior_patches} cached patches of {prior_size} px)"
        config = TrainConfig(
            arch=arch_name, output_dir=output, arch_kwargs=arch_kwargs, steps=steps, steps_per_epoch=steps_per_epoch,
            batch_size=batch_size, patch=patch, optimizer=optimizer, lr=lr, weight_decay=weight_decay,
            schedule=schedule, loss=loss, balance=balance, adversarial=adversarial, adv_start=adv_start, disc_width=disc_width,
            seed=seed, init=init_weights, resume=resume, max_minutes=max_minutes, export=export, device=device, progress=progress,
            data_description=described, prior=prior or "",
        )
        if not validation:
            say(f"warning: nothing is held out for validation ({len(split.training)} training item"
                f"{'s' if len(split.training) != 1 else ''}, --val-fraction {val_fraction:g}): no best weights are "
                f"chosen, only the latest are written (last.safetensors{', and to --export' if export else ''}); "
                "give two images or more and a --val-fraction above 0 to validate")
        say(f"training {arch_name} {arch_kwargs} on {described}; logging to {output / 'train.log'}")
        reports = train(config, source, validation, split)
    except InputError as exc:
        raise click.UsageError(str(exc)) from None
    except TrainingInterrupted as exc:
        say(f"stopped at step {exc.step}: checkpoint saved to {exc.checkpoint}; to go on from there, run the same "
            "command with --resume")
        sys.exit(exc.exit_code)
    if reports:
        last = reports[-1]
        if validation:
            click.echo(
                f"step {last.step}: validation PSNR {last.val_psnr:.2f} dB (blurred input {last.input_psnr:.2f} dB, "
                f"gain {last.gain_db:+.2f} dB), SSIM {last.val_ssim:.4f}; best weights: {output / 'best.safetensors'}, "
                f"latest: {output / 'last.safetensors'}"
            )
        else:
            click.echo(f"step {last.step}: training loss {last.train_loss:.5f}; not validated, so no best weights; "
                       f"latest: {output / 'last.safetensors'}")
