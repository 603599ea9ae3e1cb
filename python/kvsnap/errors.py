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


class BudgetExceededError(ArenaFullError):
    """A request needs more KV memory than the budget can give it.

    ``need`` and ``budget`` are in bytes.
    """

    def __init__(self, message: str, need: int = 0, budget: int = 0):
        super().__init__(message)
        self.need, self.budget = need, budget


class AgentBusyError(KvsnapError):
    """The agent is serving another request (raised instead of waiting with ``wait=False``)."""

    def __init__(self, message: str, agent_id: str = ""):
        super().__init__(message)
        self.agent_id = agent_id


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


class InvalidAgentIdError(InvalidArgumentError):
    """An agent id is not a plain name (path separators, ``..``, empty, too long)."""

    def __init__(self, message: str):
        super().__init__(message, "agent_id")


class StoreError(KvsnapError):
    """A snapshot file or store could not be read or written.

    ``path`` names the file or folder at fault.
    """

    def __init__(self, message: str, path=None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class StoreWriteError(StoreError):
    """The operating system refused a write, fsync or rename of a snapshot file.

    ``errno`` is the OS error number (``errno.ENOSPC``, ``errno.EIO``, ...);
    the previous snapshot of every agent is untouched.
    """

    def __init__(self, message: str, path=None, errno: int | None = None):
        super().__init__(message, path)
        self.errno = errno


class StoreFullError(StoreWriteError):
    """The disk holding the store is full (ENOSPC) or the user's quota is spent (EDQUOT)."""


class CorruptSnapshotError(StoreError):
    """A snapshot file is truncated, malformed or fails its checksums."""


class MissingBlockError(StoreError):
    """An agent manifest names a block file that is not in the store."""


class AgentNotFoundError(StoreError, KeyError):
    """The store has no agent of that id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelMismatchError(StoreError):
    """A snapshot was made with another model or tokenizer (fingerprints differ)."""


class FormatMismatchError(StoreError):
    """A snapshot's quantization format or geometry differs from the one asked for."""


class UnsupportedVersionError(StoreError):
    """A snapshot or store has a format version this kvsnap cannot read."""
