"""Which restored images a person should look at: the blind model left them as they came.

An image can be ``done`` and still not restored: ``l0-blind`` (alone, or as the
prior of the refiners) returns its input unchanged when it finds no blur worth
removing, and when blur is there but every kernel estimate it tried was rejected
(a collapsed or moved estimate). At archive scale those are the images an
archivist must find among millions, so the worker records the reason on the
image row (``images.review``) from the metrics the model reports, and
``deblur results JOB --review``, ``deblur status JOB`` and the API show them.

Models without a blind estimate (``wiener``, the official networks) report no
such metrics, so their images are never flagged.
"""

from __future__ import annotations

from collections.abc import Iterable

NOT_RESTORED = "not_restored"
JUDGED_SHARP = "judged_sharp"
REVIEW_REASONS = {
    NOT_RESTORED: "blur was detected but no kernel estimate held: the blind model left the image as it came (a "
                  "refiner on top of it may have changed it a little)",
    JUDGED_SHARP: "the blind model found no blur worth removing (or the image was too small to look for it) and "
                  "left it as it came",
}
NO_BLUR_EXTENT = 2  # px; models.l0_blind.NO_BLUR_EXTENT: a kernel this small is no blur worth removing
NOT_MEMBERS = ("input", "ensemble")  # db.schema.INPUT_MODEL and ENSEMBLE_MODEL: metrics rows that are no member's


def _unchanged(figures: dict[str, float | None]) -> str | None:
    """Why one member left the image as it came, or None when it restored it (or cannot say)."""
    if (figures.get("kernel_fallback") or 0.0) >= 0.5:
        return NOT_RESTORED
    detected, size = figures.get("blur_detected"), figures.get("kernel_size")
    if (detected is not None and detected < 0.5) or (size is not None and size <= NO_BLUR_EXTENT):
        return JUDGED_SHARP
    return None


def review_reason(metrics: Iterable[tuple[str, str, float | None]]) -> str | None:
    """The reason to review an image, from its ``(model, name, value)`` metrics, or None.

    Only when every member of the job is a blind one (it reports ``blur_detected``: ``l0-blind`` and the refiners
    built on it) and every one of them left the image as it came: ``not_restored`` when one of their estimates
    fell back (``kernel_fallback``), else ``judged_sharp`` (no blur detected, or a kernel of at most
    :data:`NO_BLUR_EXTENT` px). A member of another kind (``wiener``, a network) restores the image its own way,
    so an ensemble with one is never flagged.
    """
    members: dict[str, dict[str, float | None]] = {}
    for model, name, value in metrics:
        if model not in NOT_MEMBERS:
            members.setdefault(model, {})[name] = value
    reasons = []
    for figures in members.values():
        if "blur_detected" not in figures:
            return None
        reason = _unchanged(figures)
        if reason is None:
            return None
        reasons.append(reason)
    if not reasons:
        return None
    return NOT_RESTORED if NOT_RESTORED in reasons else JUDGED_SHARP
