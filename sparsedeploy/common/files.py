"""Files sparsedeploy writes: atomic outputs, the output marker, and the failures of writing them.

Rule: sparsedeploy deletes only what it wrote. Every output directory it creates carries
``MARKER``; ``--overwrite`` replaces only a directory carrying it and refuses anything else.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sparsedeploy.common.errors import UserError

log = logging.getLogger(__name__)

MARKER = ".sparsedeploy-output"
# What an interrupted run left for --resume (said by the CLI's Ctrl-C/SIGTERM message).
KEPT_FOR_RESUME: dict[str, str] = {}
# The stage running now (prune, eval_dense, export, ...), named by an out-of-memory message.
RUN_STAGE: dict[str, str] = {}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_marker(folder: Path, kind: str = "output") -> None:
    """Mark `folder` as written by sparsedeploy, so that a later --overwrite may replace it."""
    from sparsedeploy import __version__

    info = {"written_by": "sparsedeploy", "version": __version__, "kind": kind}
    (Path(folder) / MARKER).write_text(json.dumps(info) + "\n")


def has_marker(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, what: str = "output") -> None:
    """Fail before any work when `path` (or the directory it will be created in) cannot be written."""
    path = Path(path)
    base = _nearest_existing(path if path.is_dir() else path.parent)
    if not base.is_dir():
        raise UserError(f"{what} {path}: {base} is a file, not a directory: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparsedeploy-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"{what} {path} is not writable ({exc.strerror or exc} in {base}): "
            "choose a writable directory or fix its permissions"
        ) from None


def refuse_unmarked(path: Path, flag: str = "--overwrite") -> None:
    """An existing non-empty directory that sparsedeploy did not write is never replaced."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not has_marker(path))):
        raise UserError(
            f"refusing to replace {path} with {flag}: it was not written by sparsedeploy "
            f"(no {MARKER} in it); move it away or choose another output"
        )


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless --overwrite was given and sparsedeploy wrote it; check writability."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise UserError(f"output {path} already exists: choose another --output or pass --overwrite")
        refuse_unmarked(path)
    check_writable(path)


_STALE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` directories that earlier (dead) runs left beside `final`."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = _STALE.match(entry.name)
        if not match or match["name"] != final.name or not entry.is_dir() or _pid_alive(int(match["pid"])):
            continue
        if not has_marker(entry):  # only what sparsedeploy wrote
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.info("removed %s left by an earlier interrupted run", entry)
    return removed


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, device) of the file system holding `path`."""
    path = _nearest_existing(Path(path))
    best = ("/", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2:
                point = fields[1].replace("\\040", " ")
                if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                    best = (point, fields[0])
    except OSError:
        pass
    return best


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def _write_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def dir_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def write_failed(target: Path, exc: BaseException, need_bytes: int | None = None, written: int = 0) -> UserError:
    """One line for a failed write: a full disk names the device and the space needed."""
    if _is_disk_full(exc):
        point, device = _mount_of(target)
        try:
            free = shutil.disk_usage(point).free
        except OSError:
            free = 0
        need = (
            f"about {need_bytes / 2**20:.1f} MiB"
            if need_bytes
            else f"more than the {written / 2**20:.1f} MiB written so far"
        )
        return UserError(
            f"writing {target} failed: No space left on device {device} (mounted at {point}): "
            f"{free / 2**20:.1f} MiB free, {need} needed; free space there or choose another output; "
            "nothing was written"
        )
    message = (
        exc.strerror
        if isinstance(exc, OSError) and exc.strerror
        else (str(exc).splitlines() or [type(exc).__name__])[0]
    )
    return UserError(
        f"could not write {target}: {message} (check free disk space and permissions); nothing was written"
    )


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends, so a few steps that must all happen (a file renamed
    into place and recorded for --resume) are not cut between them; the first signal that came meanwhile is
    handed to the handler that was installed before, on exit. Python runs signal handlers in the main thread
    whichever thread the OS delivered to, so a handler swap (not a thread signal mask) is what holds them.
    A no-op off the main thread (where handlers cannot be changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if got:
            handler = previous[got[0]]
            if callable(handler):
                handler(got[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), got[0])


@contextmanager
def writing(target: Path, need_bytes: int | None = None) -> Iterator[None]:
    """Turn a failed write (OSError, or safetensors' SafetensorError on a full disk) into one clear line."""
    try:
        yield
    except _write_errors() as exc:
        raise write_failed(Path(target), exc, need_bytes) from None


@contextmanager
def atomic_dir(final: Path, overwrite: bool = True, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds.

    The result carries MARKER; an existing `final` is replaced only when it carries MARKER too (or is empty).
    """
    final = Path(final)
    if not overwrite:
        check_output_dir(final, overwrite)
    refuse_unmarked(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        write_marker(tmp)
        yield tmp
        if final.exists():
            refuse_unmarked(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except _write_errors() as exc:
        written = dir_size(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failed(final, exc, need_bytes, written) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder renamed over it: a reader sees the old
    file or the whole new one, never a part; the temporary file is removed if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def safe_external_data(model_file: Path, proto=None) -> list[str]:
    """The external-data files an ONNX model refers to, each checked to stay inside the model's directory.

    A `location` such as ``../../x`` (or a symlink leading out) would make a reader or a copier touch files
    outside the model: such a model is refused with one line.
    """
    import onnx
    from google.protobuf.message import DecodeError

    model_file = Path(model_file)
    try:
        if proto is None:  # `proto`: the model already read without its external data
            proto = onnx.load(str(model_file), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise UserError(
            f"cannot read ONNX model {model_file}: the file is truncated or corrupt "
            f"({type(exc).__name__}); export it again"
        ) from None
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:  # Constant nodes may hold external tensors too
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    root = model_file.parent.resolve()
    files = set()
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            target = (model_file.parent / entry.value).resolve()
            if os.path.isabs(entry.value) or not target.is_relative_to(root):
                raise UserError(
                    f"ONNX model {model_file} refers to external data {entry.value!r} outside its "
                    "directory: refused (a model's external data must lie beside it); re-export the model"
                )
            files.add(entry.value)
    return sorted(files)
