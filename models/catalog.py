"""The explicit list of every model this project knows, and the default ensemble.

Adding a model means writing its torch implementation with a factory
``build(params, device) -> RestorationModel`` and adding one :class:`ModelInfo`
to ``ENTRIES`` below. Importing this module imports no torch.
"""

from __future__ import annotations

from models.psf_spec import check_psf
from models.registry import EnsembleSpec, ModelInfo, ModelSpec, Param, Registry

_PSF_HELP = (
    "point-spread function: gaussian:sigma=S, disk:radius=R or "
    "motion:length=L,angle=DEG"
)

CLASSIC: list[ModelInfo] = [
    ModelInfo(
        name="wiener",
        family="classic",
        license="Apache-2.0",
        summary="Non-blind Wiener deconvolution with a given PSF (FFT, edge-tapered borders).",
        factory="models.classic:build_wiener",
        params=(
            Param("psf", str, "gaussian:sigma=1.2", _PSF_HELP, check=check_psf),
            Param("nsr", float, 0.01, "noise-to-signal power ratio (regularisation)", minimum=1e-6, maximum=10),
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
            Param("psf", str, "gaussian:sigma=1.2", _PSF_HELP, check=check_psf),
            Param("iterations", int, 30, "number of multiplicative updates", minimum=1, maximum=1000),
        ),
        dtypes=("float32",),
    ),
]

# Other families append their entries here (kept as separate lists so each
# family's declarations stay together).
BLIND: list[ModelInfo] = []
LEARNED_SEED: list[ModelInfo] = []
LEARNED_OFFICIAL: list[ModelInfo] = []

ENTRIES: list[ModelInfo] = [*CLASSIC, *BLIND, *LEARNED_SEED, *LEARNED_OFFICIAL]

REGISTRY = Registry(ENTRIES)

# The ensemble used when a job names no model.
DEFAULT_ENSEMBLE_TEXT: tuple[str, ...] = ("wiener:psf=gaussian:sigma=1.2,nsr=0.01",)


def default_ensemble() -> EnsembleSpec:
    return EnsembleSpec(tuple(REGISTRY.parse(t) for t in DEFAULT_ENSEMBLE_TEXT))


def parse_ensemble(texts: list[str] | tuple[str, ...], strength: float = 1.0) -> EnsembleSpec:
    """Parse ``--model`` options into an ensemble; no options → the default ensemble."""
    members: tuple[ModelSpec, ...] = (
        tuple(REGISTRY.parse(t) for t in texts) if texts else default_ensemble().members
    )
    spec = EnsembleSpec(members, strength=strength)
    spec.normalised_weights()  # raises on all-zero weights
    return spec
