"""`make demo` end to end, in a copy of the repository (so the working tree's build/ is untouched)."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO


def test_make_demo(tmp_path):
    if not os.path.exists(os.path.join(REPO, ".venv", ".installed")):
        pytest.skip("needs the .venv that `make test` creates")
    # The copy shares this .venv; were it out of date, `make demo` there would reinstall it with the copy's
    # paths in its scripts (gone with tmp_path).
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=REPO).returncode != 0:
        pytest.skip(".venv is older than pyproject.toml: run `make test` (it reinstalls it) first")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    work = tmp_path / "repo"
    for f in files:
        if os.path.exists(os.path.join(REPO, f)):
            os.makedirs(work / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(REPO, f), work / f)  # keeps mtimes, so make sees .venv as up to date
    os.symlink(os.path.join(REPO, ".venv"), work / ".venv")
    r = subprocess.run(["make", "demo"], cwd=work, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "pip install" not in r.stdout  # the venv was reused, not rebuilt
    assert "demo finished" in r.stdout
    b = work / "build"
    for p in ("tiny-sd3/model_index.json", "sample-data/astronaut.png", "shards/manifest.json",
              "train/pytorch_lora_weights.safetensors", "train/loss.png", "train/samples/step-000200.png",
              "merged/model_index.json", "merged/transformer/diffusion_pytorch_model.safetensors"):
        assert (b / p).exists(), p

    import torch
    from diffusers import StableDiffusion3Pipeline

    merged = StableDiffusion3Pipeline.from_pretrained(str(b / "merged"))
    image = merged("a photo of a cat", num_inference_steps=2, height=64, width=64,
                   generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
