"""Writing the release folder: unchanged components reflinked, copied or hard-linked, published atomically.

The release is built in a staging folder beside out.dir, `OUT.<pid>.<random>.shardtune-tmp`, whose first
file is a marker naming this stage. Only folders with that name pattern and that marker (or empty ones,
which hold nothing to lose) are ever removed: a user's `OUT.tmp` or `OUT.old` is never touched.
"""
import errno
import json
import os
import platform
import re
import secrets
import shutil
import socket
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional, Sequence

from shards.common.atomic import fsync, fsync_tree, link_or_copy
from shards.common.errors import DataError, UsageError

from .rerun import INPUTS_FILE

PIPELINE_MARKER = "model_index.json"  # what makes a folder a diffusers pipeline, i.e. an earlier release
STAGING_SUFFIX = ".shardtune-tmp"
STAGING_MARKER = ".shardtune-merge-staging"  # written first into every staging folder: the proof it is ours
STAGING_RELEASE = "release"  # the new release, built inside the staging folder
STAGING_PREVIOUS = "previous"  # an earlier release, moved aside while the new one is renamed into place
# out.link=auto on a filesystem without reflinks: files at least this large (weights) are hard-linked, smaller
# ones (configs, tokenizers, where an edit is likely) copied. 64 MiB lies above every config and tokenizer file
# of SD3 and below its VAE and text encoder weights.
HARDLINK_MIN_BYTES = 64 << 20
COPIED, REFLINKED, HARDLINKED = "copied", "reflinked", "hard-linked"


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

    files = [e for e in entries if e not in (CARD_NAME, SAMPLES_DIR, INPUTS_FILE)]
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


def _ficlone_request() -> Optional[int]:
    """Linux's FICLONE ioctl number (fcntl has it from Python 3.12 on); None where there is no such ioctl."""
    if not sys.platform.startswith("linux"):
        return None
    import fcntl

    if hasattr(fcntl, "FICLONE"):
        return fcntl.FICLONE
    # _IOW(0x94, 9, int): these architectures put the direction bits elsewhere.
    return 0x80049409 if platform.machine().startswith(("mips", "ppc", "powerpc", "sparc", "alpha")) else 0x40049409


_FICLONE = _ficlone_request()
# What FICLONE answers when the filesystem (or the pair of them) cannot share extents.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def reflink(src: str, dst: str) -> bool:
    """Make dst a copy-on-write clone of src (same blocks until either is written); False where not possible."""
    if _FICLONE is None:
        return False
    import fcntl

    with open(src, "rb") as s:  # follows the symlinks of hub caches to their blobs
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.ioctl(fd, _FICLONE, s.fileno())
            cloned = True
        except OSError as e:
            if e.errno not in _NO_REFLINK:
                raise
            cloned = False
        finally:
            os.close(fd)
    if not cloned:
        os.remove(dst)
    return cloned


def place_file(src: str, dst: str, link: str = "auto") -> str:
    """Put src's content at dst as out.link says; returns how: COPIED, REFLINKED or HARDLINKED.

    auto: a reflink where the filesystem has them (btrfs, XFS, ...), else a copy, and a hard link for files of at
    least HARDLINK_MIN_BYTES. A hard link is the base's own file: an edit in place changes both."""
    if link in ("auto", "reflink"):
        if reflink(src, dst):
            return REFLINKED
        if link == "reflink":
            raise DataError(f"out.link=reflink: the filesystem cannot reflink {src} into {os.path.dirname(dst)} "
                            "(copy-on-write clones need btrfs, XFS or the like, with both on the same one); "
                            "use out.link=auto or out.link=copy")
    if link == "hardlink" or (link == "auto" and os.path.getsize(src) >= HARDLINK_MIN_BYTES):
        return HARDLINKED if link_or_copy(src, dst) else COPIED  # a copy is the same release
    shutil.copyfile(src, dst)
    return COPIED


def copy_tree(src_dir: str, dst_dir: str, link: str = "auto",
              skip: Callable[[str], bool] = lambda rel: False) -> Dict[str, int]:
    """Every file under src_dir except those `skip(relative path)` rejects, with folders recreated; returns how
    many files got there each way (COPIED, REFLINKED, HARDLINKED)."""
    placed: Counter = Counter()
    for root, dirs, files in os.walk(src_dir, followlinks=True):
        # Hidden entries (.git, .cache/huggingface) are not part of a pipeline and can be huge.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = os.path.relpath(root, src_dir)
        os.makedirs(os.path.join(dst_dir, rel_root), exist_ok=True)
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_root, name))
            if not name.startswith(".") and not skip(rel):
                placed[place_file(os.path.join(root, name), os.path.join(dst_dir, rel), link)] += 1
    return dict(placed)


def placed_summary(placed: Dict[str, int]) -> str:
    """'3 files copied, 2 reflinked, 1 hard-linked' (only the ways used); '' for none."""
    parts = [(placed[how], how) for how in (COPIED, REFLINKED, HARDLINKED) if placed.get(how)]
    if not parts:
        return ""
    (n, how), rest = parts[0], parts[1:]
    return ", ".join([f"{n} file{'' if n == 1 else 's'} {how}"] + [f"{k} {h}" for k, h in rest])


def _staging_pattern(out_dir: str) -> "re.Pattern":
    return re.compile(re.escape(os.path.basename(out_dir)) + r"\.\d+\.[0-9a-f]{8}" + re.escape(STAGING_SUFFIX))


def _marker(staging: str) -> Optional[dict]:
    """The staging marker's content, or None when the folder has no valid one (then it is not ours)."""
    try:
        with open(os.path.join(staging, STAGING_MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("stage") == "merge" else None


def _still_running(marker: dict) -> bool:
    """Whether the merge that made a staging folder is alive (same machine, its process still there)."""
    pid = marker.get("pid")
    if marker.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, under another user
    return True


def clean_leftovers(out_dir: str) -> None:
    """Remove what an earlier merge into out_dir left when it was killed: its marked staging folders.

    A merge killed between moving the earlier release aside and renaming the new one into place left no out_dir;
    the earlier release is then put back first. Folders without the marker are never touched."""
    out_dir = os.path.normpath(os.path.abspath(out_dir))
    parent = os.path.dirname(out_dir)
    try:
        names = os.listdir(parent)
    except OSError:
        return  # no parent yet: nothing can be left there
    pattern = _staging_pattern(out_dir)
    for name in sorted(names):
        path = os.path.join(parent, name)
        if not pattern.fullmatch(name) or not os.path.isdir(path) or os.path.islink(path):
            continue
        marker = _marker(path)
        if marker is None and os.listdir(path):
            continue  # not ours (or too broken to tell): left alone
        if marker is not None and _still_running(marker):
            continue  # another merge into the same out.dir is writing it
        try:
            previous = os.path.join(path, STAGING_PREVIOUS)
            if os.path.isdir(previous) and not os.path.lexists(out_dir):
                os.replace(previous, out_dir)
            shutil.rmtree(path)
        except OSError as e:
            raise DataError(f"cannot remove {path}, left by an earlier merge that was stopped: "
                            f"{e.strerror or e}; remove it by hand") from None


def publish(tmp_dir: str, out_dir: str, staging: str) -> None:
    """Make tmp_dir durable, then put it at out_dir in one rename; an earlier release goes into `staging` (removed
    with it afterwards) and is put back if the rename fails."""
    fsync_tree(tmp_dir)
    previous = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            previous = os.path.join(staging, STAGING_PREVIOUS)
            os.replace(out_dir, previous)
        else:
            os.rmdir(out_dir)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        if previous:
            os.replace(previous, out_dir)
        raise
    fsync(os.path.dirname(os.path.abspath(out_dir)))


@contextmanager
def staged(out_dir: str) -> Iterator[str]:
    """Yield a folder to build the release in, inside a new marked staging folder beside out_dir; publish it on
    success; remove the staging folder (and only it) in any case.

    A merge killed outright leaves its staging folder, which `clean_leftovers` removes on the next run."""
    out_dir = os.path.normpath(out_dir)
    staging = f"{out_dir}.{os.getpid()}.{secrets.token_hex(4)}{STAGING_SUFFIX}"
    created = False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(staging)), exist_ok=True)  # missing parent folders of out.dir
        os.mkdir(staging)
        created = True
        with open(os.path.join(staging, STAGING_MARKER), "w") as f:
            json.dump({"stage": "merge", "out_dir": os.path.abspath(out_dir), "pid": os.getpid(),
                       "host": socket.gethostname()}, f)
        tmp = os.path.join(staging, STAGING_RELEASE)
        os.mkdir(tmp)
    except OSError as e:
        if created:
            shutil.rmtree(staging, ignore_errors=True)
        raise UsageError(f"cannot create out.dir '{out_dir}': {e.filename}: {e.strerror}") from None
    try:
        yield tmp
        publish(tmp, out_dir, staging)
    except BaseException as e:
        if not os.path.exists(os.path.join(staging, STAGING_PREVIOUS)):
            shutil.rmtree(staging, ignore_errors=True)
        # else publishing failed and could not even put the earlier release back: it stays in the marked
        # staging folder, and the next run's clean_leftovers moves it back to out_dir.
        if isinstance(e, OSError):
            # A copy or rename names both ends and either can be the one that failed.
            where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename or tmp
            raise DataError(f"writing the release to out.dir '{out_dir}' failed: {where}: {e.strerror or e}") from None
        raise
    # Published: what is left is the earlier release, if any. A failure here leaves a marked folder for the
    # next run to remove, never a broken release.
    shutil.rmtree(staging, ignore_errors=True)
