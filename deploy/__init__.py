"""Deployment: the embedded local stack (``deblur stack``), Docker Compose, Kubernetes and Prometheus files."""
