"""One exception tree for the whole project.

``InputError`` and its children are the user's fault: they are reported with a
message that names the bad value and are never retried. ``TransientError`` and
its children are the environment's fault (storage or broker hiccups) and are
retried by the worker.
"""

from __future__ import annotations


class DeblurError(Exception):
    """Root of every error this project raises on purpose."""


class InputError(DeblurError):
    """Bad input from the user: not retried, reported as is."""


class ConfigurationError(InputError):
    """A setting (environment variable or option) is missing or malformed."""


class InvalidURIError(InputError):
    """A storage URI is malformed or points somewhere it may not."""


class StorageNotFoundError(InputError):
    """A bucket, key or prefix does not exist."""


class UnknownModelError(InputError):
    """A model name is not in the registry."""


class InvalidModelSpecError(InputError):
    """A model spec (``NAME[:PARAMS][:WEIGHT]``) is malformed or has bad parameters."""


class LicenseError(InputError):
    """A model's licence forbids its use unless the operator opts in."""


class WeightsError(InputError):
    """Model weights are missing, corrupt or fail their checksum."""


class ImageDecodeError(InputError):
    """An input file is not a readable image."""


class UnknownJobError(InputError):
    """No job has the given id."""


class AmbiguousJobIdError(InputError):
    """A shortened job id is the start of more than one job's id."""


class JobKeyReusedError(InputError):
    """A job key (idempotency key) sent again with a different request than the job it first made."""


class OutputsBusyError(InputError):
    """A job's output is one an unfinished job has still to write; ``other_job`` is that job, ``output`` the key."""

    def __init__(self, message: str, other_job: str, output: str) -> None:
        super().__init__(message)
        self.other_job, self.output = other_job, output


class JobFinishedError(InputError):
    """An operation that needs an unfinished job (cancelling, pausing) was asked of one that finished."""


class TransientError(DeblurError):
    """A temporary failure (storage, broker, database): the task is retried."""


class DeviceFailure(DeblurError):
    """The worker's accelerator failed (a lost or poisoned CUDA context, an ECC error): no image is to blame,
    and this process can restore nothing more, so its batch goes back to the queue and it stops taking work.

    ``counts`` is what the batch got through before (images done, failed and handed over), when known.
    """

    counts: dict[str, int] | None = None


def describe_failure(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it), for a one-line 'why it is down'."""
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
