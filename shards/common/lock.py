"""One writer per output folder: an exclusive lock file that names its holder.

The lock is a kernel `flock` on a small file: the kernel drops it when its process dies, even by SIGKILL,
so a crashed run never leaves a folder locked. The file's content (pid, host, stage, start time) is only
for the message a second writer gets. On filesystems without `flock` the file itself is the lock, and a
lock whose process is gone from this host is taken over as stale.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator, List, Optional

from .errors import UsageError

LOCK_NAME = ".shardtune.lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_info(stage: str) -> dict:
    return {"stage": stage, "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}


def read_holder(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_is_gone(info: Optional[dict]) -> bool:
    """A holder recorded on this host whose process no longer runs (on another host nobody can tell)."""
    return bool(info) and info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)))


def _describe(info: Optional[dict]) -> str:
    if not info:
        return "another process"
    return f"{info.get('stage', 'a shardtune stage')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('started')})"


def _refuse(what: str, path: str, info: Optional[dict], stale_hint: bool) -> UsageError:
    hint = (f"; if it is no longer running, delete {path}" if stale_hint else "")
    return UsageError(f"{what} is in use by {_describe(info)}: wait for it to finish or stop it, "
                      f"or choose another out.dir{hint}")


def _write_info(fd: int, info: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _flock_or_none(fd: int, tries: int = 5) -> Optional[bool]:
    """True: locked; False: held by someone else; None: this filesystem has no flock.

    A few quick retries: another part's `live_holders` probe holds a shared lock for an instant, which must
    not read as a holder."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
        except OSError as e:
            if e.errno in _NO_FLOCK:
                return None
            raise
    return False


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive(path: str, stage: str, what: str) -> Iterator[dict]:
    """Hold the lock at `path` for the body; `what` names the guarded folder in the refusal."""
    info = _holder_info(stage)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"cannot create {what} (its lock file {path}: {e.strerror})") from None
        got = _flock_or_none(fd)
        if got is None:
            os.close(fd)
            yield from _pid_file_lock(path, info, what)
            return
        if not got:
            holder = read_holder(path)
            os.close(fd)
            raise _refuse(what, path, holder, stale_hint=False)
        if _same_file(fd, path):  # not a file the previous holder unlinked while we waited to lock it
            break
        os.close(fd)
    try:
        _write_info(fd, info)
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # unlinked while still locked, so a waiting opener sees another file and retries
        os.close(fd)


def _pid_file_lock(path: str, info: dict, what: str):
    """The lock file's existence is the lock (no flock here); a holder gone from this host is stale."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_holder(path)
            if holder_is_gone(holder):
                # Renamed away before removal: of two runs that both saw the stale file, only the one whose
                # rename succeeds goes on, so neither removes the lock the other has just made.
                aside = f"{path}.stale.{os.getpid()}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                if read_holder(aside) != holder:  # another run's fresh lock got renamed: put it back
                    os.rename(aside, path)
                    raise _refuse(what, path, read_holder(path), stale_hint=True) from None
                os.unlink(aside)
                continue
            raise _refuse(what, path, holder, stale_hint=True) from None
        try:
            _write_info(fd, info)
            yield info
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return
    raise _refuse(what, path, read_holder(path), stale_hint=True)


def out_dir_lock(out_dir: str, stage: str, name: str = LOCK_NAME):
    """The lock for a stage writing inside `out_dir` (created if missing)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"config key 'out.dir': cannot create {out_dir} ({e.strerror})") from None
    return exclusive(os.path.join(out_dir, name), stage, f"out.dir {out_dir}")


def sibling_lock(out_dir: str, stage: str):
    """The lock for a stage that replaces `out_dir` as a whole (it cannot live inside): a hidden file beside it."""
    full = os.path.realpath(out_dir)  # one lock however the folder is reached (symlinks, relative paths)
    parent = os.path.dirname(full)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create out.dir '{out_dir}': {e.filename}: {e.strerror}") from None
    return exclusive(os.path.join(parent, f".{os.path.basename(full)}{LOCK_NAME}"), stage, f"out.dir '{out_dir}'")


def live_holders(folder: str, prefix: str) -> List[dict]:
    """Holders of the locks named `prefix*` in `folder` that are held right now (probed without waiting)."""
    found = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return found
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
            except BlockingIOError:
                held = True
            except OSError:
                held = not holder_is_gone(read_holder(path))
            if held:
                found.append({**(read_holder(path) or {}), "path": path})
        finally:
            os.close(fd)
    return found
