"""Atomic file writes: a reader never sees a half-written file under its final name."""
import contextlib
import json
import os
import shutil
import uuid


def fsync(path: str) -> None:
    """Flush a file's, or a folder's entries', content to disk. Some filesystems refuse to fsync a folder;
    that is not an error (there is nothing more to be done for it), a file that cannot be flushed is."""
    is_dir = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(top: str) -> None:
    """fsync every file under `top`, then each folder (so their entries are durable too)."""
    for root, _, files in os.walk(top):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)


def link_or_copy(src: str, dst: str) -> bool:
    """Put src's content at dst (replacing what is there) as a hard link where the filesystem allows, else a
    copy; a symlink is followed (hub caches hold symlinks to blobs: the blob is linked). True when linked."""
    if os.path.abspath(src) == os.path.abspath(dst):
        return True
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst, follow_symlinks=True)
        return True
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(src, dst)
        return False


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
        fsync(os.path.dirname(os.path.abspath(path)))
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
