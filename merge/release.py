"""Writing the release folder: unchanged components linked or copied, published atomically."""
import os
import shutil
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from shards.errors import DataError, UsageError

PIPELINE_MARKER = "model_index.json"  # what makes a folder a diffusers pipeline, i.e. an earlier release


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def is_release(out_dir: str, entries: Sequence[str]) -> bool:
    """A diffusers pipeline folder, or a folder holding only a single file that merge wrote (out.format=single_file),
    with its model card and samples."""
    if PIPELINE_MARKER in entries:
        return True
    from .card import CARD_NAME, SAMPLES_DIR
    from .single_file import is_single_file_release

    files = [e for e in entries if e not in (CARD_NAME, SAMPLES_DIR)]
    return len(files) == 1 and is_single_file_release(os.path.join(out_dir, files[0]))


def check_out_dir(out_dir: str, overwrite: bool, inputs: Sequence[str] = ()) -> None:
    """Refuse before any work an out.dir that would lose data or nest releases inside an input."""
    for p in inputs:
        if _inside(p, out_dir) or _inside(out_dir, p):
            raise UsageError(f"out.dir '{out_dir}' overlaps the input {p}; pick an out.dir outside the inputs")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"out.dir '{out_dir}' exists and is not a folder")
    try:
        entries = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    except OSError as e:
        raise UsageError(f"out.dir '{out_dir}' cannot be read: {e.strerror}") from None
    # Overwrite exists to redo a release; a folder of anything else is the user's and is never deleted.
    if entries and not is_release(out_dir, entries):
        raise UsageError(f"out.dir '{out_dir}' holds other files (it is not a diffusers pipeline folder: no "
                         f"{PIPELINE_MARKER}, nor a single-file release of this stage); out.overwrite=true only "
                         "replaces an earlier release, so choose another out.dir")
    if entries and not overwrite:
        raise UsageError(f"out.dir '{out_dir}' already exists and is not empty; choose another out.dir "
                         "or set out.overwrite=true to replace it")


def link_or_copy(src: str, dst: str, link: str = "hardlink") -> None:
    if link == "hardlink":
        try:
            os.link(src, dst, follow_symlinks=True)  # hub caches hold symlinks to blobs: link the blob
            return
        except OSError:
            pass  # another filesystem, or one without hard links: a copy is the same release
    shutil.copyfile(src, dst)


def copy_tree(src_dir: str, dst_dir: str, link: str = "hardlink", skip: Callable[[str], bool] = lambda rel: False):
    """Every file under src_dir except those `skip(relative path)` rejects, with folders recreated."""
    for root, dirs, files in os.walk(src_dir, followlinks=True):
        # Hidden entries (.git, .cache/huggingface) are not part of a pipeline and can be huge.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, src_dir)
        os.makedirs(os.path.join(dst_dir, rel_root), exist_ok=True)
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_root, name))
            if not name.startswith(".") and not skip(rel):
                link_or_copy(os.path.join(root, name), os.path.join(dst_dir, rel), link)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: str) -> None:
    for root, _, files in os.walk(top):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root, directory=True)


def publish(tmp_dir: str, out_dir: str) -> None:
    """Make tmp_dir durable, then put it at out_dir in one rename; an old out_dir is removed only after."""
    _fsync_tree(tmp_dir)
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        else:
            os.rmdir(out_dir)
    os.replace(tmp_dir, out_dir)
    _fsync(os.path.dirname(os.path.abspath(out_dir)), directory=True)
    if old:
        shutil.rmtree(old)


@contextmanager
def staged(out_dir: str) -> Iterator[str]:
    """Yield a sibling `out_dir.tmp` to build in; publish it on success, delete it on any failure.

    A merge killed outright leaves only the `.tmp` folder, which the next run starts over from.
    """
    out_dir = os.path.normpath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)  # also creates missing parent folders
    except OSError as e:
        raise UsageError(f"cannot create out.dir '{out_dir}': {e.filename}: {e.strerror}") from None
    try:
        yield tmp
        publish(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            # A copy or rename names both ends and either can be the one that failed.
            where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename or tmp
            raise DataError(f"writing the release to out.dir '{out_dir}' failed: {where}: {e.strerror or e}") from None
        raise
