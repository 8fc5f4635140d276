"""Atomic, durable writes of files and directories: the one place llmcore writes results to disk.

The guarantee, the same for every function here:

    When a write returns, the target holds the complete new content, and that content and its
    name survive a power cut (file data, the rename and the parent directory are fsynced). When
    the writer raises, or the process is killed at any moment, the target holds its complete old
    content, or stays absent if it was absent: a reader never sees a partial file or directory.

How: the new content is written under a temp name in the target's own directory (same
filesystem, so `os.replace` is an atomic rename), flushed and fsynced, renamed over the target,
and the directory is fsynced. Temp names start with `.NAME.` and end in `.tmp` (files keep the
target's suffix after it, so tools that pick a format by extension, such as matplotlib, still
work); after an exception they are removed, after a kill they may remain and `remove_leftovers`
clears them. Every temp name carries its writer's pid and a short hash of its host name, so
`remove_leftovers` removes only the temps of writers that are dead (a live writer's temp on this
host, or any temp of another host, is left alone). Files and directories created here get the user's umask (0o666 & ~umask for files,
0o777 & ~umask for directories), not mkstemp's 0600.

One limit: replacing an existing *directory* takes two renames (old out of the way, new into
place), so for a moment the target name is absent; a kill in that moment leaves the complete old
directory at `.NAME.old-XXXXXXXX.tmp` beside it. Files never have that gap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmcore.errors import LLMCoreError

__all__ = [
    "atomic_dir",
    "atomic_write",
    "check_out_dir",
    "fsync_dir",
    "install_dir",
    "install_file",
    "read_json",
    "remove_leftovers",
    "sha256_file",
    "write_bytes",
    "write_json",
    "write_text",
]


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is a set-and-get)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so the renames and creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _owner_tag() -> str:
    """`PID-HOST`: who writes a temp (pid, and 6 hex digits of the host name's sha256)."""
    return f"{os.getpid()}-{_host_tag()}"


_OWNER = re.compile(r"(?:^|[-.])(\d+)-([0-9a-f]{6})-")


def _writer_alive(rest: str) -> bool:
    """Whether the writer named in a temp name's tail (after `.NAME.`) may still be running.

    Temps without an owner tag (older llmcore) count as dead; another host's temps count as alive
    (its processes cannot be seen from here)."""
    m = _OWNER.search(rest)
    if m is None:
        return False
    pid, host = int(m.group(1)), m.group(2)
    if host != _host_tag():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _temp_file(path: Path) -> tuple[int, Path]:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}-", suffix=f".tmp{path.suffix}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write `path` atomically through `write(tmp_path)`, for writers that want a file name
    (safetensors' `save_file`, `torch.save`, matplotlib's `savefig`, `shutil.copyfile`).

    `tmp_path` exists (empty) and ends with the target's suffix; `write` replaces its content.
    The parent directory must exist. Returns `path`.
    """
    path = Path(path)
    fd, tmp = _temp_file(path)
    os.close(fd)
    try:
        write(tmp)
        # Writers that recreate the file (safetensors' save_file makes it 0600) lose the mode set on
        # the temp; set it again so every file llmcore writes follows the umask.
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def read_json(path: str | Path, *, object_only: bool = False) -> Any:
    """The JSON value in `path`, else one LLMCoreError line naming the file: `missing`, `corrupt JSON`
    (bad JSON or bad UTF-8, or unreadable), or with `object_only` anything but an object."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        raise LLMCoreError(f"{path}: missing") from None
    except (OSError, ValueError, RecursionError) as err:  # ValueError: bad JSON or bad UTF-8
        raise LLMCoreError(f"{path}: corrupt JSON ({err})") from None
    if object_only and not isinstance(data, dict):
        raise LLMCoreError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (`hashlib.file_digest`; it releases the GIL, so threads hash in
    parallel). The one file hash: checkpoint manifests, shard manifests, LoRA base records."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably; returns `path`."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably (UTF-8 by default); returns `path`."""
    return write_bytes(path, text.encode(encoding))


def write_json(
    path: str | Path, obj: Any, *, indent: int | None = 2, ensure_ascii: bool = False, sort_keys: bool = False
) -> Path:
    """Write `obj` as JSON (indented, UTF-8, trailing newline) atomically and durably; returns `path`."""
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys) + "\n")


def install_file(src: str | Path, dst: str | Path) -> Path:
    """Move a finished file `src` (on the same filesystem, e.g. in a temp dir beside `dst`) to `dst`
    atomically and durably; returns `dst`."""
    dst = Path(dst)
    _fsync_file(src)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                _fsync_file(full)
        fsync_dir(dirpath)


def install_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make the finished directory `tmp` (beside `final`, same filesystem) appear as `final`.

    Every file in `tmp` is fsynced first; an existing `final` is replaced as a whole only after the
    new one is complete (see the module note on the moment between the two renames). Returns `final`.
    """
    tmp, final = Path(tmp), Path(final)
    _fsync_tree(tmp)
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}.tmp"
        os.replace(final, trash)
    try:
        os.replace(tmp, final)
    except BaseException:
        if trash is not None:
            os.replace(trash, final)
        raise
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


def temp_dir_for(final: str | Path) -> Path:
    """A new, empty temp directory beside `final` (user's umask), named `.NAME.tmp-PID-HOST-XXXXXXXX`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o777)  # mkdir applies the umask itself
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Build a directory atomically: ``with atomic_dir(out) as tmp:`` write into `tmp`; on a clean
    exit it is fsynced and renamed to `out` (replacing an old `out` as a whole); on an exception
    `tmp` is removed and `out` is left as it was."""
    tmp = temp_dir_for(final)
    try:
        yield tmp
        install_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(directory: str | Path, name: str) -> list[Path]:
    """Remove the temp files and dirs that killed writes of `directory/name` left behind; returns them.

    Only temps whose writer is dead are removed: a temp names its writer's pid and host, and one
    of a process still running on this host (or of another host) is kept."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        rest = p.name[len(name) + 2 :]
        if p.name.startswith(f".{name}.") and (rest.startswith(("tmp-", "old-")) or ".tmp" in rest):
            if _writer_alive(rest):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_out_dir(
    out: str | Path,
    *,
    overwrite: bool,
    what: str,
    inputs=(),
    replaceable: Callable[[Path], str | None] | None = None,
    flag: str = "--out",
) -> Path:
    """Refuse an output dir that a write would damage; returns `out` as a Path.

    - a path below a regular file, or an existing non-directory, is refused;
    - a dir that holds (or is) one of `inputs` is always refused;
    - an empty or absent dir is fine; a non-empty one needs `overwrite`, and then
      `replaceable(out)` must return None (else the reason it is not `what`, e.g. "a shard dir").
    """
    out = Path(out)
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise LLMCoreError(f"{flag} {out}: {parent} is a file, not a directory")
            break
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise LLMCoreError(f"{flag} {out}: exists and is not a directory")
    if not out.is_dir():
        return out
    real = out.resolve()
    for inp in inputs:
        rp = Path(inp).resolve()
        if rp == real or real in rp.parents:
            raise LLMCoreError(
                f"{flag} {out} holds the input {inp}; writing there would replace it (pick another {flag})"
            )
    if not any(out.iterdir()):
        return out
    if not overwrite:
        raise LLMCoreError(f"{flag} {out}: output dir exists and is not empty (pass --overwrite to replace it)")
    why = replaceable(out) if replaceable is not None else "it is not one llmcore wrote"
    if why:
        raise LLMCoreError(
            f"{flag} {out}: --overwrite replaces only {what}, and {why}; remove it yourself or pick another {flag}"
        )
    return out
