"""Every error the service raises on purpose, in one place and free of HTTP.

The layers that meet a problem raise these; the layers that talk to clients translate them (the HTTP
package maps each to a status in ``service/http/errors.py``, the stream worker to an error entry, the
command line to exit status 2). Each message names the problem for the person who has to fix it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Configuration that cannot be served; the message names the field."""


class ModelLoadError(RuntimeError):
    """A model that cannot be built or loaded; the message names the model and the cause."""


class InvalidInput(ValueError):
    """Input the model cannot take; the message says what is wrong."""


class ImageTooLarge(InvalidInput):
    """An image with more pixels than ``max_image_pixels``."""


class UnknownModel(KeyError):
    """A model name that is not served."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; served models: {self.known}"


class UnknownRequestIds(KeyError):
    """Feedback for request ids the engine does not remember."""

    def __init__(self, ids: list[str]) -> None:
        super().__init__(ids)
        self.ids = ids


class SnapshotNotFound(KeyError):
    """A snapshot name with nothing saved under it."""


class SnapshotIncompatible(ValueError):
    """A snapshot saved under another method, model, optimiser or options; the message names the difference."""

    def __init__(self, name: str, model: str, reason: str) -> None:
        super().__init__(f"snapshot {name!r} cannot be restored into model {model!r}: {reason}")


class StoreUnavailable(RuntimeError):
    """The shared state store (Redis) cannot be reached right now."""
