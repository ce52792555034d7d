"""webdataset tar inputs (the img2dataset layout): local paths, brace patterns, URLs, `pipe:` commands.

Each input tar becomes one output shard, read as a stream; a sample is its image member plus a
`.txt` caption or a `.json` whose `data.caption_column` field holds it.

A local tar that cannot be read is bad input (a rejected.jsonl entry). A streamed one (URL or
command) that fails may work the next time (network, a remote command), so it raises StreamError:
the driver retries the shard from its start and never records a failed shard as complete.
"""
import http.client
import json
import os
import socket
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from typing import Iterator, List

from shards.common.errors import DataError

from .config import DataConfig
from .data import read_caption
from .inputs import IMAGE_EXTS, Item, display_name, with_prefix

# A streamed tar is read this many times at most; the waits between tries double from RETRY_DELAY_S
# (1 + 2 + 4 s: enough for a dropped connection or a restarted server, short next to a shard).
STREAM_ATTEMPTS = 4
RETRY_DELAY_S = 1.0
# Seconds without a byte from a URL before the read counts as failed (a stalled connection would
# otherwise hold the run forever).
URL_TIMEOUT_S = 60


class StreamError(Exception):
    """A streamed input tar could not be read to its end; the message is one readable line."""


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


def _errno_text(e: BaseException) -> str:
    """"Connection refused", not "[Errno 111] Connection refused" or a repr."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class _Local:
    def __init__(self, path: str):
        self.f = open(path, "rb")

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.f.close()


class _Command:
    """A command's output as a file. Its exit status counts: a command that fails part-way must not
    pass for a short tar. Its stderr goes to a file (a pipe could fill and block it) whose last line
    explains a failure."""

    def __init__(self, cmd, what: str):
        self.what = what
        self.err = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=self.err)
        except OSError as e:
            self.err.close()
            raise StreamError(f"cannot run {cmd[0]}: {_errno_text(e)}") from None

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            self._check()
        return data

    def _check(self) -> None:
        rc = self.proc.wait()
        if rc:
            self.err.seek(0)
            lines = [ln.strip() for ln in self.err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            status = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise StreamError(f"{self.what} {status}" + (f": {lines[-1][:200]}" if lines else ""))

    def finish(self) -> None:
        """After the tar's end: read what is left (padding) so the command ends by itself, then check it."""
        while self.read(1 << 16):
            pass

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped early (an error, or the run ended): do not leave it running
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()


class _Url:
    def __init__(self, url: str):
        try:
            self.r = urllib.request.urlopen(url, timeout=URL_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise StreamError(f"the server answered HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            why = _errno_text(e.reason) if isinstance(e.reason, BaseException) else e.reason
            raise StreamError(f"cannot reach the server: {why}") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise StreamError(f"cannot open the URL: {_errno_text(e)}") from None
        length = self.r.headers.get("Content-Length")
        self.expected = int(length) if length and length.isdigit() else None
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.r.read(n)
            self.got += len(data)
            # read(n) returns b"" on a connection closed early instead of raising; a download cut at a
            # member boundary would otherwise pass for a shorter tar.
            if not data and n != 0 and self.expected is not None and self.got < self.expected:
                raise StreamError(f"the download ended early ({self.got} of {self.expected} bytes)")
            return data
        except http.client.IncompleteRead as e:
            raise StreamError(f"the download ended early ({len(e.partial)} bytes of a block, "
                              f"{e.expected} more expected)") from None
        except (socket.timeout, TimeoutError):
            raise StreamError(f"no data for {URL_TIMEOUT_S} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise StreamError(f"the download failed: {_errno_text(e)}") from None

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.r.close()


def _open(url: str):
    if os.path.exists(url):
        return _Local(url)
    if url.startswith("pipe:"):
        return _Command(url[len("pipe:"):], "the command")
    if url.startswith(("http://", "https://")):
        return _Url(url)
    if url.startswith("gs://"):
        return _Command(["gsutil", "cat", url], "gsutil")
    if url.startswith("s3://"):
        return _Command(["aws", "s3", "cp", url, "-"], "aws s3 cp")
    raise StreamError("not a local file, URL (http, https, gs, s3) or pipe: command")


def _caption(key: str, members: dict, cfg: DataConfig):
    if cfg.caption_source == "instance":
        return cfg.instance_prompt, None
    name = display_name(os.path.basename(key))
    if "txt" in members:
        return read_caption(members["txt"], f"{name}.txt")
    if "json" in members:
        try:
            obj = json.loads(members["json"].decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            return None, f"unreadable caption: {name}.json is not UTF-8 text (byte {e.start})"
        except ValueError:
            return None, f"unreadable caption: {name}.json is not JSON"
        if not isinstance(obj, dict):
            return None, f"unreadable caption: {name}.json is not a JSON object"
        if obj.get(cfg.caption_column) is not None:
            return read_caption(obj[cfg.caption_column], f"the '{cfg.caption_column}' of {name}.json")
    if cfg.instance_prompt:
        return cfg.instance_prompt, None
    return None, f"missing caption: no .txt member, no '{cfg.caption_column}' in .json, and no data.instance_prompt"


def _sample_item(url: str, key: str, members: dict, cfg: DataConfig) -> Item:
    source = display_name(f"{os.path.basename(url)}/{key}")
    images = [ext for ext in members if "." + ext.split(".")[-1].lower() in IMAGE_EXTS]
    if not images:
        return Item(source, url, reject=f"no image: the sample has only {display_name(', '.join(sorted(members)))}")
    caption, why = _caption(key, members, cfg)
    caption = with_prefix(caption, cfg)
    return Item(f"{source}.{display_name(images[0])}", url, caption=caption, reject=why, data=members[images[0]])


def stream_items(url: str, cfg: DataConfig) -> Iterator[Item]:
    """The samples of one input tar, in file order, as Items holding their image bytes.

    Raises StreamError when a streamed tar fails, possibly after some samples: the caller must
    discard what it got from this tar."""
    local = os.path.exists(url)
    try:
        f = _open(url)
    except OSError as e:  # a local file (streams raise StreamError)
        yield Item(display_name(f"{os.path.basename(url)}/"), url, reject=f"unreadable tar: {_errno_text(e)}")
        return
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tar:
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
        f.finish()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        reason = f"{type(e).__name__}: {str(e)[:100]}" if str(e) else type(e).__name__
        if not local:
            raise StreamError(f"not a readable tar stream ({reason})") from None
        yield Item(display_name(f"{os.path.basename(url)}/"), url, reject=f"unreadable tar: {reason}")
    finally:
        f.close()
