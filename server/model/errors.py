"""Domain errors of model loading.

Every failure to turn a user-given spec (directory, `.gguf` file, "default") into a model is raised
as `ModelLoadError` with one clear line, so the CLI and the server can print it without a traceback.
"""
from __future__ import annotations


class ModelLoadError(Exception):
    """A model spec could not be loaded (missing path, unsupported architecture, corrupt file...)."""
