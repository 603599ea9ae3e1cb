"""The exceptions kvsnap raises. Every error names the value at fault."""

from __future__ import annotations


class KvsnapError(Exception):
    """Base class of every kvsnap error."""


class InvalidArgumentError(KvsnapError, ValueError):
    """An argument has a wrong type, dtype, shape or value.

    ``argument`` names the parameter at fault.
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class ArenaError(KvsnapError):
    """A block arena operation failed."""


class ArenaFullError(ArenaError):
    """No free slot is left in the arena."""


class SlotError(ArenaError):
    """A slot index is out of range or not allocated (double free, use after free)."""


class DeviceUnsupportedError(KvsnapError):
    """The operation has no kernel for the requested device."""


class UnsupportedModelError(KvsnapError):
    """The model's architecture or attention code cannot be served by kvsnap."""


class ModelLoadError(KvsnapError):
    """A model could not be found, downloaded, converted or loaded.

    The message names the model name, path or file at fault.
    """
