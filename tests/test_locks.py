"""One writer per output folder: the lock refuses a second writer with its holder named, frees itself when
its holder dies, and lets precompute parts share a folder."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO
from shards.common.errors import UsageError
from shards.common.lock import LOCK_NAME, exclusive, out_dir_lock, sibling_lock

ENV = {**os.environ, "PYTHONPATH": REPO}


def _holder(code: str):
    """A real process that takes a lock (`code` is the with-statement's expression) and keeps it."""
    p = subprocess.Popen([sys.executable, "-c", "import time\nfrom shards.common.lock import *\nfrom precompute.outdir import "
                          f"part_lock\nwith {code}:\n    print('held', flush=True)\n    time.sleep(600)"],
                         cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_until_the_holder_dies_even_by_sigkill(tmp_path):
    out = str(tmp_path / "out")
    p = _holder(f"out_dir_lock({out!r}, 'train')")
    try:
        with pytest.raises(UsageError) as e:
            with out_dir_lock(out, "train"):
                pass
        assert f"out.dir {out} is in use by train (pid {p.pid} on " in str(e.value)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert os.path.exists(os.path.join(out, LOCK_NAME))  # left behind by the killed holder: stale, not held
    with out_dir_lock(out, "train") as info:
        assert info["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released and removed


def test_without_flock_the_lock_file_is_the_lock_and_a_dead_holder_is_stale(tmp_path, monkeypatch):
    import shards.common.lock as lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    path = str(tmp_path / "x.lock")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "x.lock").write_text('{"stage": "train", "pid": %s, "host": "%s"}' % (dead.stdout.strip(),
                                                                                      os.uname().nodename))
    with exclusive(path, "train", "out.dir X"):  # its holder is gone from this host: taken over
        with pytest.raises(UsageError, match=rf"in use by train \(pid {os.getpid()} .*delete {path}"):
            with exclusive(path, "train", "out.dir X"):
                pass
    assert not os.path.exists(path)


def test_precompute_parts_share_a_folder_but_not_a_part_or_another_split(tmp_path):
    from precompute.outdir import part_lock

    out = str(tmp_path / "set")
    p = _holder(f"part_lock({out!r}, 0, 2, False)")
    try:
        with part_lock(out, 1, 2, False):  # the other part of the same split
            pass
        for part, parts, overwrite, needle in [(0, 2, False, "in use by precompute part 0 of 2"),
                                               (0, 1, False, "must all use parts=1"),
                                               (1, 2, True, "out.overwrite=true would clear its shards")]:
            with pytest.raises(UsageError, match=needle):
                with part_lock(out, part, parts, overwrite):
                    pass
    finally:
        p.kill()
        p.wait()


def test_a_second_merge_into_the_same_out_dir_is_refused(tmp_path):
    from merge.config import MergeConfig
    from merge.run import run_merge
    from shards.common.config import load_config

    out = str(tmp_path / "release")
    p = _holder(f"sibling_lock({out!r}, 'merge')")
    try:
        with pytest.raises(UsageError, match=rf"out.dir '{out}' is in use by merge \(pid {p.pid}"):
            with sibling_lock(out, "merge"):
                pass
        os.mkdir(out)
        (tmp_path / "alias").symlink_to(out)  # the same out.dir by another name takes the same lock
        with pytest.raises(UsageError, match="is in use by merge"):
            with sibling_lock(str(tmp_path / "alias"), "merge"):
                pass
        (tmp_path / "alias").unlink()
        os.rmdir(out)
        cfg = load_config(MergeConfig, [f"model.path={tmp_path}", f"lora.path={tmp_path}", f"out.dir={out}"])
        with pytest.raises(UsageError, match="is in use by merge"):  # the stage takes it before any work
            run_merge(cfg, progress=False)
    finally:
        p.kill()
        p.wait()
    assert sorted(os.listdir(tmp_path)) == [f".release{LOCK_NAME}"]  # beside out.dir; never inside it
