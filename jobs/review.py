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
    NOT_RESTORED: "blur was detected but no kernel estimate held: the blind model returned the image as it came",
    JUDGED_SHARP: "the blind model found no blur worth removing and returned the image as it came",
}
NO_BLUR_EXTENT = 2  # px; models.l0_blind.NO_BLUR_EXTENT: a kernel this small is no blur worth removing


def review_reason(metrics: Iterable[tuple[str, str, float | None]]) -> str | None:
    """The reason to review an image, from its ``(model, name, value)`` metrics, or None.

    ``not_restored`` when any member's estimate fell back (``kernel_fallback``); else ``judged_sharp`` when a
    member reports no blur (``blur_detected`` 0) or a kernel of at most :data:`NO_BLUR_EXTENT` px.
    """
    fallback = sharp = False
    for _model, name, value in metrics:
        if value is None:
            continue
        if name == "kernel_fallback" and value >= 0.5:
            fallback = True
        elif (name == "blur_detected" and value < 0.5) or (name == "kernel_size" and value <= NO_BLUR_EXTENT):
            sharp = True
    if fallback:
        return NOT_RESTORED
    return JUDGED_SHARP if sharp else None
