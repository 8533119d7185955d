"""Submitting and tracking jobs: Python client, CLI, HTTP API, S3 listing."""
