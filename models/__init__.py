"""Restoration models: a torch-free registry of named methods (``models.registry``)
and, behind it, torch implementations loaded only by workers."""
