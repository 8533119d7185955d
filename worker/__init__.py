"""Celery worker: tasks, the per-process runtime (model cache, batching) and image I/O."""
