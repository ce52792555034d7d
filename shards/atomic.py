"""Atomic file writes: a reader never sees a half-written file under its final name."""
import contextlib
import json
import os
import uuid


def fsync_dir(path: str) -> None:
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


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Write to a temp file beside `path`, fsync, then rename onto `path`; on error the temp file is removed.

    The temp name is unique to the process, so parts writing the same file at once never collide."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write or fsync (a full disk) names no file
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def write_json(path: str, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)
