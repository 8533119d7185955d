"""The states of jobs and images, in one light module (the command line's choices import no SQL).

A job is ``submitting`` while its producer lists and enqueues it, then
``queued``, ``running`` once an image started, ``paused`` when held back
(``deblur pause``), and at last ``done``, ``failed`` (every image failed, or
its submission broke off) or ``cancelled``. An image is ``pending`` until a
worker claims it, ``running``, then ``done``, ``failed`` or ``cancelled``.
"""

JOB_STATUSES = ("submitting", "queued", "running", "paused", "done", "failed", "cancelled")
IMAGE_STATUSES = ("pending", "running", "done", "failed", "cancelled")
TERMINAL_IMAGE_STATUSES = ("done", "failed", "cancelled")
FINISHED_JOB_STATUSES = ("done", "failed", "cancelled")
