"""Load DCP checkpoints without running what they hold.

A DCP step stores two kinds of pickles: its ``.metadata`` (``FileSystemReader.read_metadata`` is a
plain ``pickle.load``) and every non-tensor entry (``DefaultLoadPlanner.load_bytes`` is
``torch.load(weights_only=False)``); torch 2.13, ``torch/distributed/checkpoint/filesystem.py`` and
``default_planner.py``. Either runs whatever a checkpoint from elsewhere was made to hold. Here the
metadata is unpickled by ``SafeFileSystemReader`` with an allow-list of the classes DCP's metadata
is made of (the ``Metadata`` dataclasses, ``torch.Size``, dtypes, layouts, paths), and the entries
by ``SafeLoadPlanner`` with ``torch.load(weights_only=True)``, as torch loads tensors by default
since 2.6. Anything else is refused before it runs, naming the class: ``UnsafeCheckpointError``.
Every DCP read of the trainer, the converter and evaluation goes through ``load``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from nvfp4_titan.models.llama3.hf import CheckpointError

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # rebuilds torch.strided & co. from their names
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds something other than tensors, plain values and DCP's metadata: a
    pickle that would build ``what`` (e.g. ``posix.system``). Nothing of it was run."""

    def __init__(self, path: Path | str, what: str) -> None:
        super().__init__(
            f"{path} holds a pickled {what}, which no DCP checkpoint needs: loading it could run code, so it was "
            "refused and nothing of it ran. Load only checkpoints you trust; if this one is yours, it was altered"
        )
        self.path, self.what = Path(path), what


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _METADATA_CLASSES.get(module, ())
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(pickle.UnpicklingError):
    """A class outside the allow-list (raised inside the unpickler, named by the reader)."""


class SafeFileSystemReader(dcp.FileSystemReader):
    """``dcp.FileSystemReader`` whose ``.metadata`` is unpickled with the allow-list above.

    Raises:
        UnsafeCheckpointError: the metadata pickle names another class or function.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except _Refused as e:
                raise UnsafeCheckpointError(path, str(e)) from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(path, f"{type(metadata).__name__} instead of DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


_UNSUPPORTED = re.compile(r"unsupported GLOBAL (\S+)", re.IGNORECASE)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor entries are read with ``torch.load(weights_only=True)``.

    Raises:
        UnsafeCheckpointError: an entry's pickle names a class or function that is not allowed.
    """

    def __init__(self, path: Path | str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._path = path

    def load_bytes(self, read_item, value) -> None:
        # Unpickled with the allow-list first; only bytes that passed reach torch's own
        # load_bytes (weights_only=False), so what it builds is tensors and plain values.
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            if m := _UNSUPPORTED.search(str(e)):
                raise UnsafeCheckpointError(self._path, f"{m[1]} (entry {read_item.dest_index.fqn})") from None
            raise
        value.seek(0)
        super().load_bytes(read_item, value)


def load(
    state: dict[str, Any], path: Path | str, reader: dcp.FileSystemReader | None = None, no_dist: bool = False
) -> None:
    """``dcp.load(state, ...)`` from the step folder ``path`` with both pickles read safely (see
    the module docstring); ``reader``: a ``SafeFileSystemReader`` of ``path`` to reuse.

    Raises:
        UnsafeCheckpointError: the step holds a pickle of anything else (nothing of it ran);
            DCP's own errors otherwise (``CheckpointException`` from a process group).
    """
    reader = reader or SafeFileSystemReader(str(path))
    reader.read_metadata()  # raises here: dcp.load would fold the refusal into an AssertionError's text
    try:
        dcp.load(
            state,
            storage_reader=reader,
            planner=SafeLoadPlanner(path),
            no_dist=no_dist,
        )
    except CheckpointException as e:  # DCP wraps each rank's error, even without a process group
        refused = [f[0] for f in e.failures.values() if isinstance(f[0], UnsafeCheckpointError)]
        if refused:
            raise refused[0] from None
        raise


def read_metadata(path: Path | str) -> Metadata:
    """The step folder's ``.metadata``, read with the allow-list (``SafeFileSystemReader``)."""
    return SafeFileSystemReader(str(path)).read_metadata()
