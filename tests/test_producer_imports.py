"""The producer side (CLI, client, API, task definitions) must import without torch,
so a producer-only install (no worker extra) works and Celery's prefork parent
never initialises torch before forking."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_producer_and_task_modules_import_no_torch_opencv_or_scipy() -> None:
    code = (
        "import sys\n"
        "import producer.cli, producer.submit, producer.tracking, producer.client, producer.api\n"
        "import worker.tasks, jobs.celery_app, models.catalog\n"
        "heavy = sorted(m for m in ('torch', 'cv2', 'scipy', 'torchvision', 'spandrel') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"heavy modules imported: {result.stdout.strip()}"
