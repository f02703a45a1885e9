"""The converter's output folder: refused when it is, holds or lies inside the source, and written
atomically (a temporary folder beside it, renamed into place; removed on failure or SIGTERM)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from nvfp4_titan.convert.source import ConvertError


def _is_write_failure(e: BaseException) -> bool:
    """A full disk, a quota, a read-only or forbidden output (not a source that cannot be read)."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)
    return any(s in str(e) for s in ("No space left", "Disk quota", "Read-only file system", "File too large"))


def _unwritable(output: Path, e: BaseException) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
    return (
        f"cannot write {output} ({type(e).__name__}: {reason}); nothing was written. Choose an output "
        "folder that is writable and has room for the checkpoint"
    )


_TMP_MARK = ".nvfp4-convert-temporary"  # in every temporary folder: only those are ever removed


def check_output(source: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside the source (--overwrite would delete the
    checkpoint or the whole run; keep_latest_k deletes a step with what lies inside it), that is
    a link or a file, or that --overwrite would replace though it is no converted checkpoint."""
    src, out = source.resolve(), output.resolve()
    if out == src or src.is_relative_to(out) or out.is_relative_to(src):
        raise ConvertError(
            f"output {output} {'is' if out == src else 'holds' if src.is_relative_to(out) else 'lies inside'} "
            f"the checkpoint {source}; write the NVFP4 checkpoint to a folder outside it"
        )
    if output.is_symlink():
        raise ConvertError(f"output {output} is a symbolic link; name a real folder")
    for p in (output, *output.parents):
        if p.exists() and not p.is_dir():
            raise ConvertError(f"output {output}: {p} is a file, not a folder; name a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConvertError(f"{output} exists and is not empty; pass --overwrite to replace it")
        if not _written_by_us(output):
            raise ConvertError(
                f"{output} is not a checkpoint this converter wrote (no {MARKER}), and --overwrite replaces "
                "only those; choose a new or empty folder"
            )


MARKER = "nvfp4_titan.json"  # in every converted checkpoint: what --overwrite may replace


def _written_by_us(folder: Path) -> bool:
    """Our marker, or (converted before it existed) our section of an NVFP4 config.json."""
    if (folder / MARKER).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
        return "nvfp4_titan" in (config.get("quantization_config") or {})
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_temporaries(output: Path, source: Path) -> None:
    """Our temporary folders for ``output`` whose process is gone (SIGKILL, power loss)."""
    for tmp in output.parent.glob(f".{output.name}.convert-*-*"):
        pid = tmp.name.removeprefix(f".{output.name}.convert-").split("-")[0]
        ours = (tmp / _TMP_MARK).is_file() and not source.resolve().is_relative_to(tmp.resolve())
        if ours and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through convert's cleanup


def _umask_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 folders: give the output the permissions the user's umask gives."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_folder(output: Path, source: Path) -> Iterator[Path]:
    """A new temporary folder beside ``output`` for the block to write into, renamed to ``output``
    (replacing it) when the block ends; removed, with nothing written, when the block raises or the
    process gets SIGTERM. A write that fails for want of room or rights becomes one ``ConvertError``.
    Leftovers of killed conversions of ``output`` are removed first (never those of a live one)."""
    # The handler first: a SIGTERM between making the folder and installing it would leave it.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    tmp = None
    try:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(output, source)
            tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.convert-{os.getpid()}-", dir=output.parent))
            (tmp / _TMP_MARK).touch()
        except OSError as e:
            raise ConvertError(_unwritable(output, e)) from None
        try:
            yield tmp
        except (OSError, SafetensorError) as e:
            if not _is_write_failure(e):
                raise
            raise ConvertError(_unwritable(output, e)) from None
        (tmp / _TMP_MARK).unlink()
        _umask_permissions(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
