"""The explicit list of every model this project knows, and the default ensemble.

Adding a model means writing its torch implementation with a factory
``build(params, device) -> RestorationModel`` and adding one :class:`ModelInfo`
to ``ENTRIES`` below. Importing this module imports no torch.
"""

from __future__ import annotations

from dataclasses import replace

from jobs.errors import InvalidModelSpecError, WeightsError
from models.psf_spec import check_psf
from models.registry import EnsembleSpec, ModelInfo, ModelSpec, Param, Registry, WeightsFile
from models.tone import LIGHT_CHOICES

_PSF_HELP = (
    "point-spread function: gaussian:sigma=S, disk:radius=R or "
    "motion:length=L,angle=DEG"
)
_PSF = Param("psf", str, "gaussian:sigma=1.2", _PSF_HELP, check=check_psf, compound=True)
# Clipped highlights break the blur model; deconvolutions leave them out of the data term.
_SATURATION = Param(
    "saturation", float, 0.985,
    "values at least this bright (share of the full range) are clipped highlights and treated as "
    "unknown data, channel by channel (0 = off)",
    minimum=0.0, maximum=1.0,
)

_LIGHT = Param(
    "light", str, "encoded", "where the blur is undone: 'encoded', the stored values as they are (how synthetic "
    "benchmarks blur); 'linear', in linear light, the sRGB tone curve taken off first and put back after, as a "
    "shaking camera blurs light before its tone curve: use it on real camera-shake photographs (on blur made in "
    "linear light l0-blind gains 1.7-2.7 dB more this way; on blur made in stored values, 2.7-3.5 dB less)",
    choices=LIGHT_CHOICES,
)
_PRIOR_LIGHT = Param(
    "light", str, "encoded", "where the l0-blind run inside undoes the blur (see l0-blind's 'light'): 'linear' "
    "for real camera-shake photographs, with the network's weights fine-tuned on blur made in linear light",
    choices=LIGHT_CHOICES,
)

CLASSIC: list[ModelInfo] = [
    ModelInfo(
        name="wiener",
        family="classic",
        license="Apache-2.0",
        summary="Non-blind Wiener deconvolution with a given PSF (FFT, edge-tapered borders).",
        factory="models.classic:build_wiener",
        params=(
            _PSF,
            Param("nsr", float, 0.01, "noise-to-signal power ratio (regularisation)", minimum=1e-6, maximum=10),
            _SATURATION,
            _LIGHT,
        ),
        dtypes=("float32",),
    ),
    ModelInfo(
        name="richardson-lucy",
        family="classic",
        license="Apache-2.0",
        summary="Non-blind Richardson-Lucy deconvolution with a given PSF.",
        factory="models.classic:build_richardson_lucy",
        params=(
            _PSF,
            Param("iterations", int, 30, "number of multiplicative updates", minimum=1, maximum=1000),
            _SATURATION,
            _LIGHT,
        ),
        dtypes=("float32",),
    ),
]

# Other families append their entries here (kept as separate lists so each
# family's declarations stay together).
def _kernel_side(value: object) -> object:
    """``l0-blind``'s kernel side: 0 (automatic) or at least 3 (a 1-pixel kernel is no blur to estimate)."""
    if value not in (0,) and int(value) < 3:  # type: ignore[call-overload]
        raise ValueError(f"kernel={value}: use 0 (automatic) or a side of at least 3 pixels")
    return value


BLIND: list[ModelInfo] = [
    ModelInfo(
        name="l0-blind",
        family="classic",
        license="Apache-2.0",
        summary=(
            "Blind deblurring: coarse-to-fine kernel estimation with the L0 gradient prior "
            "(Pan et al. 2014, Anger et al. 2019), then TV or hyper-Laplacian deconvolution; "
            "returns the estimated kernel and falls back to a gentle result when the estimate collapses."
        ),
        factory="models.l0_blind:build_l0_blind",
        params=(
            Param("kernel", int, 0, "odd kernel side in pixels, at least 3 (an even one is rounded up); 0 = "
                  "automatic (35, wider when a quick estimate at reduced resolution measures a wider blur; less on "
                  "small images)",
                  minimum=0, maximum=101, check=_kernel_side),
            Param("lambda", float, 2e-3, "initial L0 gradient-prior weight at each pyramid level (decays x0.9)",
                  minimum=1e-5, maximum=1.0),
            Param("iterations", int, 6, "kernel/latent alternations per pyramid level", minimum=1, maximum=50),
            Param("final", str, "tv", "final non-blind deconvolution prior", choices=("hyper", "tv", "wiener")),
            Param("final_lambda", float, 0.0, "prior weight (or Wiener NSR) of the final deconvolution; "
                  "0 = proportional to the measured noise level", minimum=0.0, maximum=1.0),
            Param("guard", bool, True, "detect collapsed kernel estimates and fall back to a gentle result"),
            Param("candidates", int, 3, "kernel estimator variants tried per image; the one whose restoration "
                  "best explains the input wins (1 = fastest, about 3x less time)", minimum=1, maximum=3),
            Param("polish", int, 8, "extra kernel/latent alternations at full resolution with a weak prior, "
                  "which undo the pyramid's bias towards small round kernels (0 = off, faster)",
                  minimum=0, maximum=30),
            Param("softness", float, 0.4, "edge softness in pixels the polish assumes a photograph's own edges "
                  "have, so the kernel does not take it up as width (in full at noise up to 0.2 %, fading to none "
                  "at 0.5 %; 0 = off)", minimum=0.0, maximum=2.0),
            Param("refit", int, 4, "rounds refitting the kernel to its own TV restoration after the polish, "
                  "which removes the width the L0 latent's ideal edges add to it on nearly clean photographs "
                  "(0 = off, faster)",
                  minimum=0, maximum=20),
            Param("defocus", bool, True, "replace an estimate that looks like a defocus disc by the disc whose "
                  "radius best explains the image's spectrum (sharper than the free-form estimate), and restore "
                  "with such a disc images that look sharp to the blur measure but defocused to the spectrum "
                  "(textures, smooth scenes); 0 = off"),
            _SATURATION,
            _LIGHT,
        ),
        dtypes=("float32",),
        produces_kernel=True,
        shared_results=True,
        # the day its computation last changed (a featureless image judged sharp, each image's own Wiener weight):
        # recorded in every image's model_versions, so results of an earlier computation can be told apart
        version="2026-12-07",
    ),
]


def _learned_seed(name: str, summary: str, factory: str, size_multiple: int, dtypes: tuple[str, ...],
                  weights: str | None = None, sha256: str | None = None, produces_kernel: bool = False,
                  option_defaults: tuple[tuple[str, object], ...] = (), extra_params: tuple[Param, ...] = ()
                  ) -> ModelInfo:
    """A learned seed model: its weights ship in models/weights/ (or come from weights=PATH)."""
    return ModelInfo(
        name=name,
        family="learned-seed",
        license="Apache-2.0",
        summary=summary,
        factory=factory,
        params=(Param("weights", str, "", "path to a .safetensors file from 'deblur train' "
                      "(default: the registered weights)"), *extra_params),
        weights=WeightsFile(filename=weights, sha256=sha256, shipped=True) if weights else None,
        size_multiple=size_multiple,
        min_size=size_multiple,
        tile_size=512,
        dtypes=dtypes,
        produces_kernel=produces_kernel,
        option_defaults=option_defaults,
    )


LEARNED_SEED: list[ModelInfo] = [
    _learned_seed(
        "seed001-gan",
        "Seed 001's CNN generator (t1/t2/t4 blocks, skip concatenations, tanh residual output) on the blurred "
        "image alone; no weights ship (trained here it gained only +0.55 dB, below the +1 dB bar for shipped "
        "models; seed001-refine ships instead): train it with 'deblur train seed001-gan' and pass weights=PATH.",
        "models.learned:build_seed001", 2, ("float32", "bfloat16", "float16"),
    ),
    _learned_seed(
        "seed002-unet",
        "Seed 002's U-Net/ResNet hybrid (0.96 M parameters), trained here on synthetic camera shake and defocus; "
        "averages its answers over the 8 flips and rotations by default (+0.08 dB; self_ensemble=false is 8x "
        "faster).",
        "models.learned:build_seed002", 4, ("float32", "bfloat16", "float16"),
        weights="seed002-unet.safetensors", sha256="b50992cb6b46ef7da0d7973393e5c635252705892fa2a072de76cd6ca65dcc37",
        option_defaults=(("self_ensemble", True),),
    ),
    *(
        _learned_seed(
            name,
            f"{network} as a refiner of l0-blind: it sees the blurred image and l0-blind's result and "
            "corrects the latter (ringing, noise, missed blur); runs l0-blind first and stores its kernel. "
            "With light=linear it loads weights fine-tuned on blur made in linear light.",
            f"models.learned:build_{name.replace('-', '_')}", multiple, ("float32", "bfloat16", "float16"),
            weights=f"{name}.safetensors", sha256=sha256, produces_kernel=True,
            extra_params=(_PRIOR_LIGHT,),
        )
        for name, network, multiple, sha256 in (
            ("seed001-refine", "Seed 001's generator (leaky reductions, PatchGAN loss)", 2,
             "68843bbc838cda3c54047ecc6a83029da4f7ffd6911ab9963b1f1ab3c213b159"),
            ("seed002-refine", "Seed 002's U-Net/ResNet hybrid", 4,
             "6d548715574661acbed4654eadc908ebe34b0b496870a98a913a517088662ad5"),
        )
    ),
    _learned_seed(
        "seed003-vit",
        "Seed 003's ViTDeblur (ViT encoder + CNN decoder); no weights ship: train it with "
        "'deblur train seed003-vit' and pass weights=PATH.",
        "models.learned:build_seed003", 16, ("float32", "bfloat16"),
    ),
]

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")


def _check_checkpoint_path(value: object) -> object:
    text = str(value).strip()
    if not text.lower().endswith(_CHECKPOINT_SUFFIXES):
        raise ValueError(
            f"expected a checkpoint file ending in {', '.join(_CHECKPOINT_SUFFIXES)}, got {text!r}"
        )
    return text


def _path_param(default_help: str) -> Param:
    return Param("path", str, "", default_help, check=_check_checkpoint_path)


_OFFICIAL_DTYPES = ("float32", "bfloat16")
# spandrel's id of the network each builder of models/official.py loads (it refuses any other)
_ARCHITECTURES = {
    "build_nafnet": "NAFNet",
    "build_restormer": "Restormer",
    "build_mprnet": "MPRNet",
    "build_fftformer": "FFTformer",
    "build_uformer": "Uformer",
}
_ACADEMIC = "Academic Public License (non-commercial)"


def _official(
    name: str, builder: str, summary: str, licence: str, filename: str, url: str, size_multiple: int
) -> ModelInfo:
    """A published checkpoint loaded through spandrel, default tile 512 px; ``build_X`` loads architecture X."""
    return ModelInfo(
        name=name,
        family="learned-official",
        license=licence,
        noncommercial=licence == _ACADEMIC,
        summary=summary,
        factory=f"models.official:{builder}",
        params=(_path_param(f"checkpoint file; default: {filename} in DEBLUR_WEIGHTS_DIR"),),
        weights=WeightsFile(filename, url=url),
        architecture=_ARCHITECTURES[builder],
        size_multiple=size_multiple,
        tile_size=512,
        dtypes=_OFFICIAL_DTYPES,
    )


# Official checkpoints, loaded through spandrel (models/official.py). No
# sha256 is recorded because the upstream projects publish none; 'deblur
# models pull' then prints the checksum it computed (trust on first use).
# NAFNet and MPRNet are the authors' Google Drive files (by file id, through
# Drive's direct-download host); Uformer's is a SharePoint share link that
# answers scripts with an HTML page, which pull detects: download it in a
# browser into DEBLUR_WEIGHTS_DIR instead.
LEARNED_OFFICIAL: list[ModelInfo] = [
    _official(
        "nafnet-gopro",
        "build_nafnet",
        "NAFNet width 64 trained on GoPro (Chen et al. 2022; 33.71 dB on GoPro).",
        "MIT",
        "NAFNet-GoPro-width64.pth",
        "https://drive.usercontent.google.com/download?id=1S0PVRbyTakYY9a82kujgZLbMihfNBLfC&export=download&confirm=t",
        size_multiple=1,  # the network zero-pads itself to a multiple of 16, as the official code does
    ),
    _official(
        "restormer-gopro",
        "build_restormer",
        "Restormer motion deblurring, trained on GoPro (Zamir et al. 2022; 32.92 dB on GoPro).",
        _ACADEMIC,
        "restormer_motion_deblurring.pth",
        "https://github.com/swz30/Restormer/releases/download/v1.0/motion_deblurring.pth",
        size_multiple=8,
    ),
    _official(
        "mprnet-gopro",
        "build_mprnet",
        "MPRNet deblurring, trained on GoPro (Zamir et al. 2021; 32.66 dB on GoPro).",
        _ACADEMIC,
        "MPRNet_model_deblurring.pth",
        "https://drive.usercontent.google.com/download?id=1QwQUVbk6YVOJViCsOKYNykCsdJSVGRtb&export=download&confirm=t",
        size_multiple=8,
    ),
    _official(
        "fftformer-gopro",
        "build_fftformer",
        "FFTformer trained on GoPro (Kong et al. 2023; 34.21 dB on GoPro).",
        "MIT",
        "fftformer_GoPro.pth",
        "https://github.com/kkkls/FFTformer/releases/download/pretrain_model/fftformer_GoPro.pth",
        size_multiple=32,
    ),
    _official(
        "uformer-gopro",
        "build_uformer",
        "Uformer-B trained on GoPro (Wang et al. 2022; 33.06 dB on GoPro); square inputs.",
        "MIT",
        "Uformer_B_GoPro.pth",
        "https://mailustceducn-my.sharepoint.com/:u:/g/personal/zhendongwang_mail_ustc_edu_cn/"
        "EfCPoTSEKJRAshoE6EAC_3YB7oNkbLUX6AUgWSCwoJe0oA?e=jai90x",
        size_multiple=128,
    ),
    ModelInfo(
        name="spandrel",
        family="learned-official",
        license="per detected architecture (non-commercial ones need DEBLUR_ALLOW_NONCOMMERCIAL=1)",
        summary="Any same-size restoration checkpoint spandrel recognises, e.g. spandrel:path=/models/x.pth.",
        factory="models.official:build_any",
        params=(_path_param("checkpoint file to load (required)"),),
        tile_size=512,
        dtypes=_OFFICIAL_DTYPES,
    ),
]

ENTRIES: list[ModelInfo] = [*CLASSIC, *BLIND, *LEARNED_SEED, *LEARNED_OFFICIAL]

REGISTRY = Registry(ENTRIES)

# The ensemble used when a job names no model. Measured with bench/bench_learned.py --l0 on
# camera shake and defocus at 0.5% noise (bench/RESULTS.md, 2026-12-05), mean gain in dB on the
# held-out photographs (30 crops of 256 px / 20 of 288 px), on which checkpoints and weights are
# picked, and on two photographs no model was trained on (unseen, the same sizes):
#   l0-blind alone                  +4.04 / +4.24   unseen +4.56 / +4.56
#   these weights                   +4.18 / +4.37   unseen +4.62 / +4.57
# With l0-blind's softened polish and refit and both refiners fine-tuned on it (2026-12-06, one run
# per set on one machine; the estimator's rounding moves l0-blind by up to 0.09 dB between machines):
#   l0-blind alone                  +4.38 / +4.41   unseen +4.70 / +4.79
#   these weights, refiners then    +4.49 / +4.52   unseen +4.77 / +4.81
# With the refiners fine-tuned again with 30 % black-and-white scenes (2026-12-06, eleventh session;
# the unseen photographs are grey, and so is a third set, chelsea and coffee made grey):
#   l0-blind alone                  +4.42 / +4.50   unseen +4.68 / +4.75   grey +4.54
#   these weights                   +4.55 / +4.61   unseen +4.82 / +4.83   grey +4.59
# Each refiner alone is within about 0.1 dB of l0-blind (below it on the grey set); what the ensemble
# gains comes from averaging three answers whose errors differ, and its smallest lead is +0.05 dB
# (grey). The refiners run l0-blind inside, and its result is shared with the l0-blind member.
DEFAULT_ENSEMBLE_TEXT: tuple[str, ...] = ("l0-blind:1", "seed001-refine:1", "seed002-refine:2")


def default_ensemble() -> EnsembleSpec:
    return EnsembleSpec(tuple(REGISTRY.parse(t) for t in DEFAULT_ENSEMBLE_TEXT))


def in_light(spec: ModelSpec, light: str) -> ModelSpec:
    """``spec`` set to undo its blur in ``light`` ("encoded" or "linear"; see ``l0-blind``'s ``light``).

    Only models with a ``light`` parameter change, and only where the spec
    leaves it unset and ``light`` is not already the default: a plain
    ``l0-blind`` stays the same spec as the refiners' prior, so an ensemble
    still runs it once.
    """
    if light not in LIGHT_CHOICES:
        raise InvalidModelSpecError(f"light must be one of {', '.join(LIGHT_CHOICES)}; got {light!r}")
    param = REGISTRY.get(spec.name).param("light")
    if param is None or "light" in spec.param_dict or light == param.default:
        return spec
    return replace(spec, params=(*spec.params, ("light", light)))


def _check_weights_named(spec: ModelSpec) -> None:
    """Refuse a seed architecture that ships no weights when the spec names none: every image would fail.

    Checked where jobs and local runs are planned, not in :meth:`Registry.parse`, which training also uses to
    build the untrained architecture. Official models are not checked: their weights may sit on the workers.
    """
    info = REGISTRY.get(spec.name)
    if spec.name == "spandrel" and not str(spec.param_dict.get("path") or "").strip():
        # an official model's file may sit on the workers, but this one names none at all
        raise InvalidModelSpecError("model 'spandrel' needs the checkpoint to load, so every image would fail: "
                                    "spandrel:path=/path/to/model.pth, a file the workers can read")
    if info.family == "learned-seed" and info.weights is None and not spec.param_dict.get("weights"):
        raise WeightsError(
            f"model {spec.name!r} ships no weights, so every image would fail: pass weights=PATH, a .safetensors "
            f"file the workers can read (train one with 'deblur train {spec.name} -o RUN_DIR'), or choose another "
            "model ('deblur models list')")


MAX_ENSEMBLE_MEMBERS = 8  # models in one ensemble


def parse_ensemble(texts: list[str] | tuple[str, ...], strength: float = 1.0, light: str | None = None
                   ) -> EnsembleSpec:
    """Parse ``--model`` options into an ensemble; no options → the default ensemble.

    ``light`` sets every member that has a ``light`` parameter and does not
    set it itself (:func:`in_light`).
    """
    if len(texts) > MAX_ENSEMBLE_MEMBERS:
        raise InvalidModelSpecError(f"an ensemble of {len(texts)} models: at most {MAX_ENSEMBLE_MEMBERS} members "
                                    "(every member runs on every image, so each one adds its whole restoration time)")
    members: tuple[ModelSpec, ...] = (
        tuple(REGISTRY.parse(t) for t in texts) if texts else default_ensemble().members
    )
    seen: set[str] = set()
    for member in members:
        if member.key() in seen:
            # its metrics are stored under its key, and two equal members would only weigh it twice
            raise InvalidModelSpecError(f"model {member.key()!r} is named twice in the ensemble: name it once, with a "
                                        f"weight (NAME[:PARAMS]:WEIGHT, e.g. {member.key()}:2) if it should count more")
        seen.add(member.key())
        _check_weights_named(member)
    if light is not None:
        members = tuple(in_light(m, light) for m in members)
    spec = EnsembleSpec(members, strength=strength)
    spec.normalised_weights()  # raises on all-zero weights
    return spec
