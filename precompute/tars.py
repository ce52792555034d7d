"""webdataset tar inputs (the img2dataset layout): local paths, brace patterns, URLs, `pipe:` commands.

Each input tar becomes one output shard, read as a stream; a sample is its image member plus a
`.txt` caption or a `.json` whose `data.caption_column` field holds it.
"""
import json
import os
import tarfile
from typing import Iterator, List

from shards.errors import DataError

from .config import IMAGE_EXTS, DataConfig
from .data import Item


def is_webdataset(path: str) -> bool:
    return path.startswith(("pipe:", "http://", "https://", "s3://", "gs://")) or \
        path.endswith((".tar", ".tar}")) or ("{" in path and ".tar" in path)


def expand(path: str) -> List[str]:
    from braceexpand import braceexpand

    urls = [u for part in path.split("::") for u in braceexpand(part)]
    local_missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if local_missing:
        raise DataError(f"data.path: {len(local_missing)} tar file(s) missing, e.g. {local_missing[0]}")
    return urls


def tar_signature(url: str) -> list:
    if os.path.exists(url):
        st = os.stat(url)
        return [url, st.st_size, st.st_mtime_ns]
    return [url]  # a URL cannot be checked for changes without reading it


def _open(url: str):
    if os.path.exists(url):
        return open(url, "rb")
    from webdataset.gopen import gopen
    return gopen(url, "rb")


def _caption(members: dict, cfg: DataConfig):
    if cfg.caption_source == "instance":
        return cfg.instance_prompt, None
    if "txt" in members:
        text = members["txt"].decode("utf-8", "replace")
    elif "json" in members:
        try:
            text = json.loads(members["json"]).get(cfg.caption_column)
        except ValueError:
            return None, "unreadable caption: the .json member is not JSON"
    else:
        text = None
    if text is None:
        return (cfg.instance_prompt, None) if cfg.instance_prompt else \
            (None, f"missing caption: no .txt member, no '{cfg.caption_column}' in .json, and no data.instance_prompt")
    text = " ".join(str(text).split())
    return (text, None) if text else (None, "empty caption: blank caption member")


def _sample_item(url: str, key: str, members: dict, cfg: DataConfig) -> Item:
    source = f"{os.path.basename(url)}/{key}"
    images = [ext for ext in members if "." + ext.split(".")[-1].lower() in IMAGE_EXTS]
    if not images:
        return Item(source, url, reject=f"no image: the sample has only {', '.join(sorted(members))}")
    caption, why = _caption(members, cfg)
    if caption is not None and cfg.caption_prefix:
        caption = f"{cfg.caption_prefix.rstrip()} {caption}"
    return Item(f"{source}.{images[0]}", url, caption=caption, reject=why, data=members[images[0]])


def stream_items(url: str, cfg: DataConfig) -> Iterator[Item]:
    """The samples of one input tar, in file order, as Items holding their image bytes."""
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            key, members = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                k, _, ext = base.partition(".")
                k = os.path.join(os.path.dirname(m.name), k)
                if key is not None and k != key:
                    yield _sample_item(url, key, members, cfg)
                    members = {}
                key = k
                members[ext.lower()] = tar.extractfile(m).read()
            if key is not None:
                yield _sample_item(url, key, members, cfg)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Item(f"{os.path.basename(url)}/", url, reject=f"unreadable tar: {type(e).__name__}: {str(e)[:100]}")
