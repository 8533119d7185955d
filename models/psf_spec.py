"""Parsing of point-spread-function descriptions, without torch.

Forms: ``gaussian:sigma=S``, ``disk:radius=R``, ``motion:length=L,angle=DEG``.
:func:`parse_psf` returns the kind and its numeric parameters; the torch code in
:mod:`models.psf` turns them into a kernel.
"""

from __future__ import annotations

PSF_KINDS: dict[str, dict[str, tuple[float, float, float | None]]] = {
    # kind: {param: (min, max, default or None if required)}
    "gaussian": {"sigma": (0.05, 50.0, None)},
    "disk": {"radius": (0.5, 100.0, None)},
    "motion": {"length": (1.0, 201.0, None), "angle": (-360.0, 360.0, 0.0)},
}


def parse_psf(text: str) -> tuple[str, dict[str, float]]:
    """Parse a PSF description; raises ``ValueError`` naming what is wrong."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in PSF_KINDS:
        raise ValueError(
            f"unknown PSF kind {kind!r} in {text!r}; use gaussian:sigma=S, disk:radius=R "
            "or motion:length=L,angle=DEG"
        )
    allowed = PSF_KINDS[kind]
    values: dict[str, float] = {}
    for piece in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = piece.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"PSF {kind!r} takes {', '.join(allowed)}; got {piece!r} in {text!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"PSF {kind!r}: {key} must be a number, got {value!r}") from None
        if key in values:
            raise ValueError(f"PSF {kind!r}: {key} is given twice in {text!r}")
        low, high, _ = allowed[key]
        if not low <= number <= high:
            raise ValueError(f"PSF {kind!r}: {key} must be within [{low}, {high}], got {number}")
        values[key] = number
    for key, (_, _, default) in allowed.items():
        if key not in values:
            if default is None:
                raise ValueError(f"PSF {kind!r} needs {key}=…, e.g. {kind}:{key}=2 (got {text!r})")
            values[key] = default
    return kind, values


def check_psf(value: object) -> str:
    """Registry check: validate and normalise a PSF description."""
    kind, values = parse_psf(str(value))
    return kind + ":" + ",".join(f"{k}={v:g}" for k, v in values.items())
