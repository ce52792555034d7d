"""The merge stage leaves the user's files alone: folders beside out.dir it did not make, the base's files behind
the release's, and it says so when a LoRA was trained on another base."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import merge.release as release
from merge.sources import OriginalSource, folder_source
from shards.common.errors import DataError
from shards.common.fingerprint import transformer_fingerprint
from conftest import tiny_model_copy
from test_merge import LORA_FILE, _run, make_lora, merge, tree_digest

REPO = Path(__file__).resolve().parents[1]
STAGING = re.compile(r"out\.\d+\.[0-9a-f]{8}\.shardtune-tmp")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, "safety")


@pytest.fixture(scope="module")
def lora(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("lora"))


def _user_folders(parent: Path) -> dict:
    """Folders a user could have beside out.dir, one even named like a staging folder, but without the marker."""
    made = {}
    for name in ("out.tmp", "out.old", "out.123.0123abcd.shardtune-tmp"):
        (parent / name / "sub").mkdir(parents=True)
        (parent / name / "sub" / "notes.txt").write_text(f"mine: {name}")
        made[name] = tree_digest(parent / name)
    return made


def _files(top) -> list:
    return sorted(str(p.relative_to(top)) for p in Path(top).rglob("*") if p.is_file())


def test_user_folders_beside_out_dir_survive_a_merge_and_an_overwrite(base, lora, tmp_path):
    made = _user_folders(tmp_path)
    out = merge(base, lora, tmp_path / "out")
    merge(base, lora, out, "out.overwrite=true")
    assert sorted(os.listdir(tmp_path)) == sorted([*made, "out"])
    assert {name: tree_digest(tmp_path / name) for name in made} == made


def _killed_run(argv, kill_when: str) -> subprocess.CompletedProcess:
    """`python -m merge argv` in its own process, which SIGKILLs itself at the moment `kill_when` names."""
    code = f"""
import os, signal, sys
import merge.release, merge.run
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if {kill_when!r} == "folding":
    merge.run.fold_transformer = die  # after the components are in the staging folder
else:  # publishing: between moving the earlier release aside and renaming the new one into place
    replace = os.replace
    def rename(src, dst):
        if str(src).endswith("/release"):
            die()
        replace(src, dst)
    merge.release.os.replace = rename
from merge.run import main
main(sys.argv[1:])
"""
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_killed_merges_staging_folder_is_removed_by_the_next_run(base, lora, tmp_path):
    made = _user_folders(tmp_path)
    argv = [f"model.path={base}", f"lora.path={lora}", f"out.dir={tmp_path / 'out'}"]
    p = _killed_run(argv, "folding")
    assert p.returncode == -9, p.stderr
    # The out.dir lock's file stays after a SIGKILL (the kernel drops the lock itself); it is not ours to judge.
    left = [n for n in os.listdir(tmp_path) if n not in made and not n.endswith(".shardtune.lock")]
    assert len(left) == 1 and STAGING.fullmatch(left[0]), left
    assert (tmp_path / left[0] / release.STAGING_MARKER).is_file()
    assert (tmp_path / left[0] / "release" / "model_index.json").is_file()  # it got as far as the components

    out = merge(base, lora, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted([*made, "out"])
    assert {name: tree_digest(tmp_path / name) for name in made} == made
    assert tree_digest(out, card=False) == tree_digest(merge(base, lora, tmp_path / "fresh"), card=False)


def test_a_merge_killed_while_publishing_puts_the_earlier_release_back(base, lora, tmp_path, capsys):
    out = merge(base, lora, tmp_path / "out")
    earlier = tree_digest(out)
    argv = [f"model.path={base}", f"lora.path={lora}", f"out.dir={out}", "out.overwrite=true", "lora.scale=0.5"]
    p = _killed_run(argv, "publishing")
    assert p.returncode == -9, p.stderr
    assert not os.path.exists(out)  # the earlier release was moved aside, the new one not yet in place
    [left] = [n for n in os.listdir(tmp_path) if not n.endswith(".shardtune.lock")]
    assert os.path.isdir(tmp_path / left / release.STAGING_PREVIOUS)

    code, line = _run([f"model.path={base}", f"lora.path={lora}", f"out.dir={out}", "lora.scale=0.5"], capsys)
    assert code == 2 and "already exists" in line, line  # without out.overwrite: the earlier release is back
    assert os.listdir(tmp_path) == ["out"] and tree_digest(out) == earlier
    merge(base, lora, out, "out.overwrite=true", "lora.scale=0.5")
    assert os.listdir(tmp_path) == ["out"] and tree_digest(out) != earlier


def test_a_publish_that_cannot_put_the_earlier_release_back_leaves_it_for_the_next_run(base, lora, tmp_path,
                                                                                       monkeypatch, capsys):
    out = merge(base, lora, tmp_path / "out")
    earlier = tree_digest(out)
    replace = os.replace

    def failing(src, dst):  # the new release cannot be renamed into place, nor the earlier one back
        if str(src).endswith(("/release", "/" + release.STAGING_PREVIOUS)):
            raise OSError(5, "Input/output error", src)
        replace(src, dst)
    monkeypatch.setattr(release.os, "replace", failing)
    with pytest.raises(DataError, match="Input/output error"):
        merge(base, lora, out, "out.overwrite=true", "lora.scale=0.5")
    monkeypatch.setattr(release.os, "replace", replace)
    [left] = [n for n in os.listdir(tmp_path) if not n.endswith(".shardtune.lock")]
    assert STAGING.fullmatch(left) and os.path.isdir(tmp_path / left / release.STAGING_PREVIOUS)

    code, line = _run([f"model.path={base}", f"lora.path={lora}", f"out.dir={out}", "lora.scale=0.5"], capsys)
    assert code == 2 and "already exists" in line, line
    assert os.listdir(tmp_path) == ["out"] and tree_digest(out) == earlier


def _component_files(out):
    """Release files that came from the base unchanged (not the merged transformer, the card or the inputs record)."""
    return [f for f in _files(out) if not f.startswith("transformer/diffusion_pytorch_model")
            and f not in ("README.md", "shardtune-merge.json")]


def _can_reflink(folder: Path) -> bool:
    src, dst = folder / ".probe-src", folder / ".probe-dst"
    src.write_bytes(b"x" * 4096)
    try:
        return release.reflink(str(src), str(dst))
    finally:
        for f in (src, dst):
            if f.exists():
                f.unlink()


def test_by_default_editing_the_release_leaves_the_base_unchanged(base, lora, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run_main([f"model.path={base}", f"lora.path={lora}", f"out.dir={out}"], capsys)
    assert code == 0, err
    files = _component_files(out)
    assert "scheduler/scheduler_config.json" in files and "vae/diffusion_pytorch_model.safetensors" in files
    for f in files:
        assert os.stat(out / f).st_ino != os.stat(Path(base) / f).st_ino, f
        assert os.stat(out / f).st_nlink == 1, f
    before = (Path(base) / "scheduler" / "scheduler_config.json").read_bytes()
    with open(out / "scheduler" / "scheduler_config.json", "r+b") as f:  # an edit in place, as editors do
        f.write(b"{ edited")
    assert (Path(base) / "scheduler" / "scheduler_config.json").read_bytes() == before
    how = "reflinked" if _can_reflink(tmp_path) else "copied"
    assert f"other components: {len(files)} files {how} (out.link auto)" in stdout, stdout


def _run_main(argv, capsys):
    """merge's main() as the command line runs it; (exit code, stdout, stderr)."""
    from merge.run import main
    from shards.common.config import run_cli

    code = 0
    try:
        run_cli("merge", main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("mode", ["copy", "hardlink", "reflink", "auto-large"])
def test_link_modes_do_what_they_say(base, lora, tmp_path, capsys, monkeypatch, mode):
    link = mode
    if mode == "auto-large":  # auto without reflinks hard-links files from HARDLINK_MIN_BYTES on
        monkeypatch.setattr(release, "HARDLINK_MIN_BYTES", 100_000)
        link = "auto"
    reflinks = _can_reflink(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _run_main([f"model.path={base}", f"lora.path={lora}", f"out.dir={out}", f"out.link={link}"],
                                  capsys)
    if mode == "reflink" and not reflinks:
        line = err.strip().splitlines()[-1]
        assert code == 1 and "Traceback" not in err and "out.link=reflink" in line and "out.link=auto" in line, err
        assert os.listdir(tmp_path) == []
        return
    assert code == 0, err
    files = _component_files(out)
    large = {f for f in files if os.path.getsize(Path(base) / f) >= 100_000}
    assert large and len(large) < len(files)  # both kinds are there, or the auto case proves nothing
    counts = {"copied": 0, "reflinked": 0, "hard-linked": 0}
    for f in files:
        a, b = os.stat(out / f), os.stat(Path(base) / f)
        assert (out / f).read_bytes() == (Path(base) / f).read_bytes(), f
        shared = a.st_ino == b.st_ino
        if mode == "hardlink" or (mode == "auto-large" and f in large and not reflinks):
            assert shared and a.st_nlink >= 2, f
            counts["hard-linked"] += 1
        else:
            assert not shared and a.st_nlink == 1, f
            counts["reflinked" if mode in ("reflink", "auto-large") and reflinks else "copied"] += 1
    expected = release.placed_summary(counts)
    assert f"other components: {expected} (out.link {link})" in stdout, stdout


# The base fingerprint: what train records equals what merge computes, whatever the base's layout and dtype.
def _single_file(base, path, dtype="auto"):
    from merge.single_file import transformer_jobs, write_single_file

    with folder_source(os.path.join(base, "transformer"), "t") as t:
        write_single_file(transformer_jobs(t, {}, dtype), str(path), progress=False)
    return str(path)


def _merge_side(source, dtype):
    names = set(source.names)
    with source:
        return transformer_fingerprint(lambda n: source.get(n) if n in names else None, dtype)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_train_and_merge_fingerprints_agree_for_folder_and_single_file(base, tmp_path, dtype):
    from shards.common.dtypes import STORAGE_DTYPES
    from train.model import base_fingerprint, load_transformer

    loaded = load_transformer(base, STORAGE_DTYPES[dtype], torch.device("cpu"))
    trained_on = base_fingerprint(loaded, STORAGE_DTYPES[dtype])
    assert trained_on["dtype"] == dtype
    assert _merge_side(folder_source(os.path.join(base, "transformer"), "t"), dtype) == trained_on
    assert _merge_side(OriginalSource(_single_file(base, tmp_path / "fp32.safetensors")), dtype) == trained_on
    if dtype != "fp16":  # a bf16 copy of the fp32 base: rounded to bf16, it is the same base
        bf16 = _single_file(base, tmp_path / "bf16.safetensors", "bf16")
        with safe_open(bf16, framework="pt") as f:
            assert f.get_tensor("model.diffusion_model.context_embedder.bias").dtype == torch.bfloat16
        assert _merge_side(OriginalSource(bf16), dtype) == trained_on


def _with_record(lora_dir, path, record):
    """The LoRA file with shardtune's training record in its header, as train writes it."""
    src = os.path.join(lora_dir, LORA_FILE)
    with safe_open(src, framework="pt") as f:
        header = dict(f.metadata() or {})
    save_file(load_file(src), str(path), metadata={**header, "shardtune": json.dumps(record)})
    return str(path)


def test_a_lora_from_another_base_gives_one_warning(base, lora, tmp_path, tmp_path_factory, capsys):
    from precompute.tiny import build_tiny_model

    other = build_tiny_model(str(tmp_path_factory.mktemp("other") / "tiny-sd3"), seed=1)
    fingerprints = {m: _merge_side(folder_source(os.path.join(m, "transformer"), "t"), "bf16") for m in (base, other)}
    assert fingerprints[base] != fingerprints[other]
    foreign = _with_record(lora, tmp_path / "foreign.safetensors",
                           {"base_model": "some/other-sd3", "base_fingerprint": fingerprints[other]})
    native = _with_record(lora, tmp_path / "native.safetensors",
                          {"base_model": base, "base_fingerprint": fingerprints[base]})
    single = _single_file(base, tmp_path / "base.safetensors")

    cases = [(base, foreign, True), (single, foreign, True), (base, native, False), (single, native, False),
             (base, os.path.join(lora, LORA_FILE), False)]  # no record (another tool's file): no check, no word
    for i, (model, lora_file, warned) in enumerate(cases):
        code, _, err = _run_main([f"model.path={model}", f"lora.path={lora_file}", f"out.dir={tmp_path / f'out{i}'}"],
                                 capsys)
        assert code == 0, err
        lines = [line for line in err.splitlines() if "warning" in line]
        if warned:
            assert len(lines) == 1 and lines[0].startswith("merge: warning: ") and foreign in lines[0], err
            assert "some/other-sd3" in lines[0] and f"model.path {model}" in lines[0], lines[0]
        else:
            assert lines == [], err


def test_a_hard_linked_release_never_writes_through_to_the_base(base, lora, tmp_path, capsys):
    """The release's own model card replaces the base's; written through a hard link it would edit the base."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(base, model)
    (model / "README.md").write_text("the base model's own card\n")
    out = tmp_path / "out"
    code, _, err = _run_main([f"model.path={model}", f"lora.path={lora}", f"out.dir={out}", "out.link=hardlink"],
                             capsys)
    assert code == 0, err
    assert (model / "README.md").read_text() == "the base model's own card\n"
    assert os.stat(out / "README.md").st_ino != os.stat(model / "README.md").st_ino
    assert "merge" in (out / "README.md").read_text().lower()
