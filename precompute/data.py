"""Dataset reading: find images and captions, load images as RGB, report what cannot be used.

Every reason is "category: detail", so summaries can count by category.

Accounting: every entry found under a data folder ends up exactly once in the shards or in
rejected.jsonl, except (a) a caption file whose stem matches an image there (used or not: with
data.caption_source=instance and for class images it is not read), (b) the metadata.jsonl or
metadata.csv at the top of the folder that captions are read from, and (c) out.dir and
data.class_path when they lie inside data.path (class images are listed as class images). A folder that is not entered (hidden, or one already walked through another
symlink) is one entry; its files are not listed one by one.
"""
import csv
import errno
import hashlib
import io
import json
import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

from shards.common.errors import DataError

from .config import DataConfig
from .inputs import IMAGE_EXTS, OTHER_IMAGE_EXTS, Item, display_name, with_prefix


CLASS_PREFIX = "class/"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def list_inputs(cfg: DataConfig, skip: Sequence[str] = ()) -> List[Item]:
    """Every input, usable or not, in a fixed order: instance images, then class images, each sorted.

    `skip`: folders that are never inputs even when inside a data folder (the run's out.dir)."""
    # Class images kept inside the instance folder are class images only, never instance images too.
    instance_skip = [*skip, cfg.class_path] if cfg.class_path else list(skip)
    items = _scan(cfg.path, cfg, "", prompt=cfg.instance_prompt, always=cfg.caption_source == "instance",
                  skip=instance_skip)
    if cfg.class_path:
        items += _scan(cfg.class_path, cfg, CLASS_PREFIX, prompt=cfg.class_prompt, always=True, prior=True, skip=skip)
    for it in items:
        if not it.prior:  # the prefix is the instance trigger word; class images stay captioned as the class
            it.caption = with_prefix(it.caption, cfg)
    return items


# ---------------------------------------------------------------------------------------------
# captions


_JSON_KINDS = {bool: "true/false", int: "number", float: "number", list: "list", dict: "object"}


def read_caption(value, where: str) -> Tuple[Optional[str], Optional[str]]:
    """A caption from a caption file's or tar member's bytes, or from a metadata value:
    (caption, None), or (None, reason). Folders, metadata files and tars all go through here, so the
    same text gives the same caption whatever holds it."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"unreadable caption: {where} is not UTF-8 text (byte {e.start}); save it as UTF-8"
    if not isinstance(value, str):
        kind = _JSON_KINDS.get(type(value), type(value).__name__)
        return None, f"unreadable caption: {where} is a {kind}, not a string"
    # A byte-order mark (U+FEFF, left by some Windows editors, also mid-text after `cat a.txt b.txt`)
    # is invisible, not whitespace to str.split, and would reach the tokenizers as a character.
    text = " ".join(value.replace("\ufeff", " ").split())
    return (text, None) if text else (None, f"empty caption: {where} is blank")


class NotRegularFile(OSError):
    pass


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def read_file(path: str) -> bytes:
    """The bytes of a regular file. Anything else is refused before it is opened: a FIFO would block
    the run forever and a device would never end."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"not a regular file (a {_kind(st.st_mode)})")
    with open(path, "rb") as f:
        return f.read()


def _metadata(folder: str, column: str) -> Tuple[Optional[Dict[str, Tuple[Optional[str], Optional[str]]]], Optional[str]]:
    """file_name -> (caption, reject reason) from a Hugging Face imagefolder metadata file, if the folder has one.

    A file listed on several rows with different captions gets a reason naming the rows: which row
    is meant cannot be known, and keeping either would train on a caption the user may not want."""
    for name in METADATA_FILES:
        path = os.path.join(folder, name)
        if not os.path.lexists(path):
            continue
        try:
            # utf-8-sig: a byte-order mark would otherwise make line 1 unreadable JSON or rename the
            # first CSV column to "\ufefffile_name".
            text = read_file(path).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}); fix or remove it") from None
        rows = []
        if name.endswith(".jsonl"):
            # Only "\n" ends a line: JSON strings may hold U+2028 and other characters splitlines() splits on.
            for n, line in enumerate(text.split("\n"), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}: line {n} is not JSON") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}: line {n} is not a JSON object")
                    rows.append((n, row))
        else:
            try:
                # Line numbers as an editor shows them (the header is line 1).
                reader = csv.DictReader(io.StringIO(text, newline=""))
                rows = [(reader.line_num, row) for row in reader]
            except csv.Error as e:
                raise DataError(f"{path}: not a readable CSV file ({e})") from None
        listed: Dict[str, List[Tuple[int, Optional[str], Optional[str]]]] = {}
        for n, row in rows:
            if "file_name" not in row:
                raise DataError(f"{path}: line {n} has no file_name column")
            if column not in row:
                raise DataError(f"{path}: line {n} has no '{column}' column; set data.caption_column "
                                f"(it has {', '.join(sorted(k for k in row if k is not None))})")
            if not isinstance(row["file_name"], str) or not row["file_name"]:
                raise DataError(f"{path}: line {n}: file_name must be a non-empty string, got {row['file_name']!r}")
            value = "" if row[column] is None else row[column]
            caption, why = read_caption(value, f"the '{column}' of line {n} in {name}")
            listed.setdefault(os.path.normpath(row["file_name"]), []).append((n, caption, why))
        out = {}
        for rel, entries in listed.items():
            if len({(c, w is None) for _, c, w in entries}) > 1:
                lines = ", ".join(str(n) for n, _, _ in entries)
                out[rel] = (None, f"conflicting captions: {rel} is listed on lines {lines} of {name} with "
                                  "different captions; keep one line")
            else:
                out[rel] = entries[0][1:]
        return out, name
    return None, None


def _caption_from_metadata(meta, rel: str, meta_name: str, prompt: Optional[str]):
    found = meta.get(os.path.normpath(rel))
    if found is None:
        return (prompt, None) if prompt else (None, f"missing caption: not listed in {meta_name} and no data.instance_prompt")
    return found


def _caption_file(image_rel: str, caption: Optional[Tuple[str, Optional[str]]], cfg: DataConfig,
                  prompt: Optional[str]):
    """The caption of an image from its same-stem caption file (path, walk reason), if it has one."""
    if caption is None:
        if prompt:
            return prompt, None
        name = os.path.splitext(os.path.basename(image_rel))[0] + cfg.caption_ext
        return None, f"missing caption: no {display_name(name)} and no data.instance_prompt"
    path, walk_reason = caption
    name = display_name(os.path.basename(path))
    if walk_reason:
        return None, f"unreadable caption: {name}: {walk_reason}"
    try:
        data = read_file(path)
    except OSError as e:
        return None, f"unreadable caption: {name}: {e.strerror or e}"
    return read_caption(data, name)


# ---------------------------------------------------------------------------------------------
# the folder walk


def _walk(folder: str, skip: Sequence[str]) -> List[Tuple[str, str, Optional[os.stat_result], Optional[str]]]:
    """(rel, path, stat, reason) for every entry under `folder`, following symlinked folders.

    Each real folder is entered once (by device and inode), so a symlink loop, or a second way to a
    folder already walked, becomes one entry with a reason instead of an endless or doubled walk.
    Symlinked folders are entered after the real tree, so a folder keeps its own name when a link
    elsewhere also points at it."""
    entered: Dict[Tuple[int, int], Optional[str]] = {}
    for s in skip:
        try:
            st = os.stat(s)
            entered[(st.st_dev, st.st_ino)] = None  # never an input, and not reported
        except OSError:
            pass
    st = os.stat(folder)
    entered.setdefault((st.st_dev, st.st_ino), "")
    out, links = [], []

    def enter(path: str, rel: str, st: os.stat_result) -> None:
        seen = entered.get((st.st_dev, st.st_ino), False)
        if seen is None:
            return
        if seen is not False:
            if seen == "" or rel.startswith(seen + os.sep):
                where = "the data folder" if seen == "" else display_name(seen)
                out.append((rel, path, None, f"symlink loop: leads back to {where}, which holds it"))
            else:
                out.append((rel, path, None, f"already included: the same folder as {display_name(seen)}"))
            return
        entered[(st.st_dev, st.st_ino)] = rel
        walk(path, rel)

    def walk(dirpath: str, reldir: str) -> None:
        try:
            names = sorted(os.listdir(dirpath))
        except OSError as e:
            out.append((reldir, dirpath, None, f"unreadable folder: {e.strerror}"))
            return
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.join(reldir, name) if reldir else name
            try:
                st = os.stat(path)
            except OSError as e:
                if not os.path.islink(path):
                    why = f"unreadable: {e.strerror}"
                elif e.errno == errno.ELOOP:
                    why = "symlink loop: the link resolves to itself"
                else:
                    why = f"broken symlink: its target {display_name(os.readlink(path))} does not exist"
                out.append((rel, path, None, why))
                continue
            if stat.S_ISDIR(st.st_mode):
                if name.startswith("."):
                    out.append((rel, path, None, "hidden folder: not searched (its name starts with '.')"))
                elif os.path.islink(path):
                    links.append((path, rel, st))
                else:
                    enter(path, rel, st)
            elif not stat.S_ISREG(st.st_mode):
                out.append((rel, path, st, f"not a regular file: a {_kind(st.st_mode)}, never opened"))
            elif name.startswith("."):
                out.append((rel, path, st, "hidden file: not read (its name starts with '.')"))
            else:
                out.append((rel, path, st, None))

    walk(folder, "")
    while links:
        enter(*links.pop(0))
    return sorted(out)


def _scan(folder: str, cfg: DataConfig, prefix: str, prompt: Optional[str], always: bool,
          prior: bool = False, skip: Sequence[str] = ()) -> List[Item]:
    """Images under `folder` (recursive) with captions, as Items (rejected ones carry the reason)."""
    meta, meta_name = _metadata(folder, cfg.caption_column)
    entries = _walk(folder, skip)
    caption_ext = cfg.caption_ext.lower()
    # Stems of image files, usable or not: a rejected image's caption file is accounted for by it.
    images = {os.path.splitext(rel)[0] for rel, _, _, _ in entries if os.path.splitext(rel)[1].lower() in IMAGE_EXTS}
    captions = {os.path.splitext(rel)[0]: (path, why) for rel, path, _, why in entries
                if os.path.splitext(rel)[1].lower() == caption_ext}
    items = []
    for rel, path, st, why in entries:
        ext = os.path.splitext(rel)[1].lower()
        base = os.path.basename(rel)
        item = Item(prefix + display_name(rel), path, prior=prior)
        if st is not None:
            item.size, item.mtime_ns = st.st_size, st.st_mtime_ns
        items.append(item)
        if rel == meta_name:
            items.pop()  # the captions' source, not an input
        elif ext == caption_ext and os.path.splitext(rel)[0] in images and why is None:
            items.pop()  # the caption of an image, accounted for by that image
        elif why:
            item.reject = why
        elif rel in METADATA_FILES:
            item.reject = f"not used: captions are read from {meta_name} (one metadata file per folder)"
        elif base in METADATA_FILES:
            item.reject = "not used: metadata files are read only at the top of the data folder"
        elif ext == caption_ext:
            item.reject = "caption without an image: no image file of the same name"
        elif ext in IMAGE_EXTS:
            if always:
                item.caption = prompt
            elif meta is not None:
                item.caption, item.reject = _caption_from_metadata(meta, rel, meta_name, prompt)
            else:
                item.caption, item.reject = _caption_file(rel, captions.get(os.path.splitext(rel)[0]), cfg, prompt)
        elif ext in OTHER_IMAGE_EXTS:
            item.reject = f"unsupported image format: {ext} (use {', '.join(IMAGE_EXTS)})"
        else:
            item.reject = (f"not an image: {ext} files are not read" if ext else "not an image: no file extension") + \
                f" (images: {', '.join(IMAGE_EXTS)})"
    if meta is not None:
        present = {os.path.normpath(rel) for rel, _, _, _ in entries}
        for rel in sorted(set(meta) - present):
            items.append(Item(prefix + rel, os.path.join(folder, rel),
                              reject=f"missing image: listed in {meta_name} but not found"))
    return sorted(items, key=lambda it: it.source)


def sample_key(source: str, sha256: str) -> str:
    """Stable key from the source path and content hash; never from a loader position."""
    return hashlib.sha256(f"{source}\0{sha256}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
