"""DCP checkpoints in ``step-N`` folders: atomic saves, keep-latest-k, resume, initial loads.

A save goes to ``step-N.tmp`` and is renamed once every rank has finished, so a crash in
the middle leaves the previous checkpoint as the latest complete one. The LR schedule is a
function of the step, so the step restores it.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from nvfp4_titan.models.llama3.hf import CheckpointError
from nvfp4_titan.training import safe_dcp
from nvfp4_titan.training.safe_dcp import UnsafeCheckpointError

_STEP = re.compile(r"step-(\d+)")
log = logging.getLogger("nvfp4_titan")


class CheckpointSaveError(RuntimeError):
    """A save that could not be written (e.g. a full disk); the partial folder is removed and the
    previous checkpoints are untouched."""


class DamagedCheckpointError(CheckpointError):
    """A step whose files are all there but which cannot be resumed: its data does not deserialize
    (bytes changed on disk) or it holds another step than its name says. Found only when loading,
    so the trainer then resumes from the step before (``reason`` says why)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is damaged: {reason}")
        self.path, self.reason = path, reason


def step_number(path: Path) -> int | None:
    """N of a ``step-N`` folder, None for any other name."""
    m = _STEP.fullmatch(path.name)
    return int(m[1]) if m else None


# Written by train.py into every step beside the DCP files: the resume checks and the converter
# read them, so a step without them is incomplete.
RUN_FILES = ("config.toml", "model_args.json")


def damage(path: Path, run_step: bool = True) -> str | None:
    """Why the ``step-N`` folder ``path`` cannot be loaded (a missing or unreadable ``.metadata``,
    a data file that it names missing or shorter than the bytes it indexes, and for a step of a
    run, ``run_step``, a missing ``RUN_FILES`` file), or None when every file is there whole.
    Reads only the metadata and file sizes: bytes changed inside a whole-sized file are found only
    when they fail to load (DCP stores no checksums), or not at all when they still decode (e.g.
    zeroed tensor data). ``run_step=False`` for a DCP folder of weights from elsewhere."""
    for name in RUN_FILES if run_step else ():
        if not (path / name).is_file():
            return f"its {name} is missing (train.py writes one into every step)"
    try:
        meta = safe_dcp.read_metadata(path)
    except FileNotFoundError:
        return "it has no .metadata (an interrupted save or deletion)"
    except UnsafeCheckpointError:  # not damage: refused, whatever step it is
        raise
    except Exception as e:  # a truncated or corrupt pickle
        return f"its .metadata is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if (have := f.stat().st_size) < size:
            return f"{name} is truncated ({have} of {size} bytes)"
    return None


def step_folders(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step-N`` folder in ``folder``, complete or not, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((n, p) for p in folder.iterdir() if (n := step_number(p)) is not None and p.is_dir())


def complete_steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in ``folder`` whose every file is there whole, oldest first."""
    return [(n, p) for n, p in step_folders(folder) if damage(p) is None]


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, None when there is no ``step-N`` folder.
    Newer damaged ones are named in a warning and left in place (nothing is deleted).

    Raises CheckpointError when every ``step-N`` folder is damaged: starting over would
    silently drop the run's training."""
    damaged = []
    for _, p in reversed(step_folders(folder)):
        if (why := damage(p)) is None:
            for bad, reason in damaged:
                log.warning(f"checkpoint {bad} cannot be loaded: {reason}; using {p.name} (it stays on disk)")
            return p
        damaged.append((p, why))
    if damaged:
        what = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise CheckpointError(
            f"every checkpoint in {folder} is damaged ({what}); restore them, move them away to start "
            f"over, or use another job.dump_folder"
        )
    return None


def previous_complete(step: Path) -> Path | None:
    """The newest complete checkpoint older than ``step`` in its folder, or None."""
    n = step_number(step)
    older = [p for m, p in complete_steps(step.parent) if n is None or m < n]
    return older[-1] if older else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep_latest_k: int,
    files: dict[str, str],
    rank: int,
) -> Path:
    """Save model, optimizer and ``extra`` (data-loader state, step, RNG) as ``step-N``,
    with ``files`` (name -> text: the resolved recipe, the model args) beside them."""
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd, **extra}, checkpoint_id=str(tmp))
        _barrier()
        if rank == 0:
            for name, text in files.items():  # the converter reads the recipe and model args here
                (tmp / name).write_text(text)
    except (Exception, CheckpointException) as e:  # DCP wraps rank failures in a BaseException
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial save would only hold the space
        try:
            free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB"
        except OSError:
            free = "unknown space"
        try:
            previous = latest(folder)
        except CheckpointError:
            previous = None
        cause = _cause(e)
        if "enforce fail at inline_container" in cause:  # torch.save's words for a failed write
            cause += " - a write failed: a full disk, a quota or a file-size limit"
        raise CheckpointSaveError(
            f"could not save checkpoint {final} ({cause}); {free} free on its disk. The partial "
            f"save was removed; the latest checkpoint is {previous or 'none'}. Free space (or set "
            f"checkpoint.keep_latest_k) and run the same command to resume"
        ) from None
    if rank == 0:
        # A step-N already here is one the run could not resume from (missing or truncated files,
        # or bytes that no longer load): kept aside, never deleted.
        if final.exists():
            set_aside(final)
        tmp.rename(final)
        if keep_latest_k:
            for _, old in complete_steps(folder)[:-keep_latest_k]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def set_aside(step: Path) -> Path:
    """Rename a damaged ``step-N`` to ``step-N.damaged`` (or ``-2``, ``-3``, ...): out of the way of
    resume and pruning, never deleted."""
    aside = _free_name(step.with_name(f"{step.name}.damaged"))
    step.rename(aside)
    return aside


def _free_name(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... whichever does not exist yet."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    """Load everything saved by ``save`` into the live objects (resharding as needed)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, **extra}
    _dcp_load(state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return {k: state[k] for k in extra}


def load_extra(path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Only the entries of ``extra`` (e.g. ``{"dataloader": loader.state_dict()}``, as a
    template) from a ``step-N`` folder; needs no model, so it runs before any work."""
    state = copy.deepcopy(extra)
    _dcp_load(state, path)
    return state


def load_model(path: Path, model: nn.Module) -> None:
    """Load only the model weights of a ``step-N`` folder (fine-tuning from it).

    QAT calibration buffers (``input_amax``) are not weights: a float checkpoint lacks them.
    """
    weights = {k: v for k, v in get_model_state_dict(model).items() if not k.endswith("input_amax")}
    state = {"model": weights}
    _dcp_load(state, path)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))


def _cause(e: BaseException) -> str:
    """The first line of the error behind ``e``."""
    e = _root(e)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _root(e: BaseException) -> BaseException:
    """The error behind ``e``: DCP wraps each rank's in a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        safe_dcp.load(state, path)
    except UnsafeCheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps rank failures in a BaseException
        root = _root(e)
        # Bytes of a whole-sized file changed on disk (a zeroed header, a bad copy): its pickled
        # or zipped items no longer deserialize. Other failures mean this run cannot take it.
        if isinstance(root, (pickle.UnpicklingError, EOFError)) or "PytorchStreamReader" in str(root):
            raise DamagedCheckpointError(path, f"its data cannot be read ({_cause(e)})") from None
        raise CheckpointError(f"{path}: cannot load this checkpoint into this run ({_cause(e)})") from None


def check_model_shapes(path: Path, expected: dict[str, torch.Size]) -> None:
    """Compare a DCP checkpoint's model tensor shapes with this model's, before any work."""
    try:
        meta = safe_dcp.read_metadata(path).state_dict_metadata
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: not a DCP checkpoint folder ({e})") from None
    for name, shape in expected.items():
        entry = meta.get(f"model.{name}")
        if entry is None:
            raise CheckpointError(f"{path}: has no tensor model.{name}; is it a checkpoint of this model?")
        if tuple(entry.size) != tuple(shape):
            raise CheckpointError(
                f"{path}: model.{name} has shape {tuple(entry.size)}, this model needs {tuple(shape)} "
                "(a checkpoint of another model size or flavor): use the model.flavor it was trained with "
                "(its model_args.json), or another job.dump_folder"
            )


def load_full_tensors(model: nn.Module, tensors) -> None:
    """Load (name, full tensor) pairs one at a time into a possibly sharded model."""
    opts = StateDictOptions(full_state_dict=True, strict=False)
    for name, t in tensors:
        set_model_state_dict(model, {name: t}, options=opts)
