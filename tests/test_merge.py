"""The merge stage against diffusers itself: a merged pipeline must behave like base + load_lora_weights."""
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cli, tiny_model_copy
from merge.config import MergeConfig
from merge.lora import split_key
from merge.run import main, run_merge
from shards.common.config import load_config, run_cli

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_FILE = "pytorch_lora_weights.safetensors"
WEIGHTS = "diffusion_pytorch_model.safetensors"
R, ALPHA = 4, 8  # alpha != r, so a merge that ignores alpha fails


# Its own copy rather than conftest's tiny_model: merge tests hard-link from it and must not depend on other suites.
@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    return tiny_model_copy(tmp_path_factory, "merge")


def make_lora(model_dir, out_dir, seed=1, **lora_kwargs):
    """A peft LoRA on the tiny transformer with non-zero B (a zero B would make every check pass),
    saved the way a diffusers training script does; the same weights in the unprefixed
    `save_lora_adapter` format go to out_dir/adapter/."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
    kwargs = dict(r=R, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian")
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(**{**kwargs, **lora_kwargs}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    StableDiffusion3Pipeline.save_lora_weights(
        str(out_dir), transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    transformer.save_lora_adapter(os.path.join(out_dir, "adapter"))
    return str(out_dir)


@pytest.fixture(scope="session")
def lora_dir(base_model, tmp_path_factory):
    return make_lora(base_model, tmp_path_factory.mktemp("lora"))


def merge(model, lora, out, *overrides):
    cfg = load_config(MergeConfig, [f"model.path={model}", f"lora.path={lora}", f"out.dir={out}", *overrides])
    run_merge(cfg, progress=False)
    return str(out)


def latents(pipe):
    return pipe("a photo of a dog", num_inference_steps=2, height=64, width=64, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=16).images


def load_pipeline(path):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(path)


@pytest.fixture(scope="session")
def reference_latents(base_model, lora_dir):
    """Latents from diffusers' own LoRA path: base, base + LoRA, base + LoRA at half strength."""
    pipe = load_pipeline(base_model)
    ref = {"base": latents(pipe)}
    pipe.load_lora_weights(lora_dir, adapter_name="lora")
    ref[1.0] = latents(pipe)
    pipe.set_adapters("lora", 0.5)
    ref[0.5] = latents(pipe)
    # Each pair must differ clearly, or the comparisons below prove nothing.
    for a, b in (("base", 1.0), ("base", 0.5), (1.0, 0.5)):
        assert (ref[a] - ref[b]).abs().max() > 1e-2, (a, b)
    return ref


def merged_weights(out):
    folder = os.path.join(out, "transformer")
    index = Path(folder) / (WEIGHTS + ".index.json")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [WEIGHTS]
    return {k: v for f in files for k, v in load_file(os.path.join(folder, f)).items()}


def tree_digest(top, card=True):
    """sha256 of every file of a release; card=False leaves out the model card and the inputs record, which
    name the inputs."""
    return {str(p.relative_to(top)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(top).rglob("*")) if p.is_file() and (card or p.name not in ("README.md", "shardtune-merge.json"))}


# (a), (b): the merged pipeline generates what base + load_lora_weights generates.
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_merged_pipeline_matches_diffusers_lora(base_model, lora_dir, reference_latents, tmp_path, scale):
    out = merge(base_model, lora_dir, tmp_path / "out", f"lora.scale={scale}")
    got = latents(load_pipeline(out))
    torch.testing.assert_close(got, reference_latents[scale], atol=1e-4, rtol=1e-4)


# (c) the folded tensors, computed independently of merge/ and of diffusers.
def test_merged_tensors_are_base_plus_scaled_lora_product(base_model, lora_dir, tmp_path):
    out = merge(base_model, lora_dir, tmp_path / "out", "lora.scale=0.5")
    base = load_file(os.path.join(base_model, "transformer", WEIGHTS))
    lora = load_file(os.path.join(lora_dir, LORA_FILE))
    merged = merged_weights(out)
    assert merged.keys() == base.keys()
    changed = set()
    for key in (k for k in lora if k.endswith(".lora_A.weight")):
        module = key[len("transformer."):-len(".lora_A.weight")]
        a, b = lora[key].double(), lora[key.replace("lora_A", "lora_B")].double()
        expected = base[module + ".weight"].double() + 0.5 * ALPHA / R * (b @ a)
        torch.testing.assert_close(merged[module + ".weight"].double(), expected, atol=1e-6, rtol=0)
        changed.add(module + ".weight")
    assert len(changed) == 15  # 8 targets in block 0, 7 in the context_pre_only last block
    for key in base.keys() - changed:
        assert torch.equal(merged[key], base[key]), key


def _drop_metadata(lora_dir):
    path = os.path.join(lora_dir, LORA_FILE)
    save_file(load_file(path), path, metadata={"format": "pt"})


# alpha_pattern / rank_pattern / rsLoRA / no metadata: scales as diffusers + peft fuse them.
@pytest.mark.parametrize("variant", ["patterns-rslora", "no-metadata"])
def test_scale_rules_match_diffusers_fuse(base_model, tmp_path, variant):
    if variant == "patterns-rslora":
        lora_dir = make_lora(base_model, tmp_path / "lora", seed=2, use_rslora=True, rank_pattern={"to_v": 2},
                             alpha_pattern={"transformer_blocks.0.attn.to_q": 2, "add_k_proj": 16})
    else:
        lora_dir = make_lora(base_model, tmp_path / "lora", seed=3)
        _drop_metadata(lora_dir)
    pipe = load_pipeline(base_model)
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    expected = pipe.transformer.state_dict()
    merged = merged_weights(merge(base_model, lora_dir, tmp_path / "out", "lora.scale=0.7"))
    base = load_file(os.path.join(base_model, "transformer", WEIGHTS))
    assert merged.keys() == expected.keys()
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == 15
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)


def test_unprefixed_peft_adapter_file_merges_the_same(base_model, lora_dir, tmp_path):
    a = merge(base_model, lora_dir, tmp_path / "a")
    b = merge(base_model, os.path.join(lora_dir, "adapter", LORA_FILE), tmp_path / "b")
    assert tree_digest(a, card=False) == tree_digest(b, card=False)
    assert split_key("base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight") == (
        "transformer_blocks.0.attn.to_q", "B")


# (d) a sharded base in, a forced-sharded release out, read back by diffusers.
def test_sharded_base_and_sharded_output(base_model, lora_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    base = tmp_path / "sharded-base"
    shutil.copytree(base_model, base)
    shutil.rmtree(base / "transformer")
    SD3Transformer2DModel.from_pretrained(os.path.join(base_model, "transformer")).save_pretrained(
        base / "transformer", max_shard_size="150KB")
    assert len(list((base / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1

    reference = merged_weights(merge(base_model, lora_dir, tmp_path / "single"))
    out = merge(base, lora_dir, tmp_path / "sharded", "out.max_shard_bytes=100000")
    index = json.loads((Path(out) / "transformer" / (WEIGHTS + ".index.json")).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == "diffusion_pytorch_model-00001-of-%05d.safetensors" % len(shards)
    assert not (Path(out) / "transformer" / WEIGHTS).exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    merged = merged_weights(out)
    assert merged.keys() == reference.keys()
    assert all(torch.equal(merged[k], reference[k]) for k in reference)
    loaded = SD3Transformer2DModel.from_pretrained(os.path.join(out, "transformer")).state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


# (e) deterministic bytes, whether overwritten in place, hard-linked or copied.
def test_rerun_gives_identical_bytes(base_model, lora_dir, tmp_path):
    out = merge(base_model, lora_dir, tmp_path / "out", "out.max_shard_bytes=100000", "out.link=hardlink")
    first = tree_digest(out)
    merge(base_model, lora_dir, out, "out.max_shard_bytes=100000", "out.overwrite=true", "out.link=hardlink")
    assert tree_digest(out) == first
    copied = merge(base_model, lora_dir, tmp_path / "copied", "out.max_shard_bytes=100000", "out.link=copy")
    assert tree_digest(copied) == first
    assert sorted(os.listdir(tmp_path)) == ["copied", "out"]  # no staging folder left behind
    base_vae = os.stat(os.path.join(base_model, "vae", "diffusion_pytorch_model.safetensors")).st_ino
    assert os.stat(os.path.join(out, "vae", "diffusion_pytorch_model.safetensors")).st_ino == base_vae
    assert os.stat(os.path.join(copied, "vae", "diffusion_pytorch_model.safetensors")).st_ino != base_vae


def test_out_dtype_bf16(base_model, lora_dir, tmp_path):
    merged = merged_weights(merge(base_model, lora_dir, tmp_path / "out", "out.dtype=bf16"))
    fp32 = merged_weights(merge(base_model, lora_dir, tmp_path / "fp32"))
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert all(torch.equal(merged[k], fp32[k].to(torch.bfloat16)) for k in fp32)


def _edited_lora(lora_dir, tmp_path, edit):
    tensors = load_file(os.path.join(lora_dir, LORA_FILE))
    with safe_open(os.path.join(lora_dir, LORA_FILE), framework="pt") as f:
        header = f.metadata()
    edit(tensors)
    path = tmp_path / "edited.safetensors"
    save_file(tensors, path, metadata=header)
    return str(path)


def _extra_module(t):
    t["transformer.transformer_blocks.0.attn.to_nowhere.lora_A.weight"] = torch.ones(R, 32)
    t["transformer.transformer_blocks.0.attn.to_nowhere.lora_B.weight"] = torch.ones(32, R)


def _wrong_shape(t):
    t["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.ones(R, 7)


def _text_encoder_key(t):
    t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(R, 32)


def _alpha_tensor(t):
    t["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(8.0)


def _duplicate_module(t):
    prefixed = t["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    t["transformer_blocks.0.attn.to_q.lora_A.weight"] = prefixed.clone()


def _missing_b(t):
    del t["transformer.transformer_blocks.1.attn.to_k.lora_B.weight"]


def _nan_in_b(t):
    t["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][0, 0] = float("nan")


def _inf_in_a(t):
    t["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"][1, 2] = float("-inf")


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("merge", main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code, err.strip().splitlines()[-1]


# (f) bad input: one line on stderr naming the problem, exit 2 for usage, 1 for data; nothing written.
@pytest.mark.parametrize("edit, code, words", [
    (_extra_module, 1, ["to_nowhere", "matches no tensor"]),
    (_wrong_shape, 1, ["transformer_blocks.0.attn.to_q", "shape"]),
    (_text_encoder_key, 1, ["text encoder", "not supported"]),
    (_alpha_tensor, 1, ["transformer.transformer_blocks.0.attn.to_q.alpha"]),
    (_duplicate_module, 1, ["transformer_blocks.0.attn.to_q", "twice"]),
    (_missing_b, 1, ["transformer_blocks.1.attn.to_k", "lora_B"]),
    # A broken LoRA is not fixed by a smaller lora.scale or a wider out.dtype: say so.
    (_nan_in_b, 1, ["transformer_blocks.0.attn.to_q", "lora_B", "non-finite", "retrain"]),
    (_inf_in_a, 1, ["transformer_blocks.1.attn.to_k", "lora_A", "non-finite", "retrain"]),
])
def test_bad_lora_files_are_refused(base_model, lora_dir, tmp_path, capsys, edit, code, words):
    lora = _edited_lora(lora_dir, tmp_path, edit)
    got, line = _run([f"model.path={base_model}", f"lora.path={lora}", f"out.dir={tmp_path / 'out'}"], capsys)
    assert got == code and line.startswith("merge: error: ")
    assert all(w in line for w in words), line
    assert sorted(os.listdir(tmp_path)) == ["edited.safetensors"]


@pytest.mark.parametrize("args", [["lora.scale=1e39"], ["lora.scale=1e7", "out.dtype=fp16"]])
def test_non_finite_result_is_refused_and_leaves_nothing(base_model, lora_dir, tmp_path, capsys, args):
    argv = [f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={tmp_path / 'out'}", *args]
    code, line = _run(argv, capsys)
    assert code == 1 and "non-finite" in line and "transformer_blocks.0.attn" in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, words", [
    (["lora.path={tmp}/missing.safetensors"], ["lora.path", "missing.safetensors", "does not exist"]),
    (["model.path={tmp}/no-model"], ["model.path", "no-model"]),
    (["lora.scael=0.5"], ["unknown config key 'lora.scael'"]),
    (["out.dtype=fp8", "out.link=symlink"], ["out.dtype", "out.link"]),
])
def test_usage_errors(base_model, lora_dir, tmp_path, capsys, args, words):
    argv = [f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={tmp_path / 'out'}"]
    argv += [a.format(tmp=tmp_path) for a in args]
    code, line = _run(argv, capsys)
    assert code == 2 and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


# (f) through the entry point's command (in this process: the single-file test runs `python -m merge` itself).
@pytest.mark.parametrize("case", ["missing-lora", "unknown-key", "module-not-in-base"])
def test_command_line_errors(base_model, lora_dir, tmp_path, case):
    lora = lora_dir
    extra = []
    if case == "missing-lora":
        lora = tmp_path / "nope.safetensors"
    elif case == "unknown-key":
        extra = ["out.colour=red"]
    else:
        lora = _edited_lora(lora_dir, tmp_path, _extra_module)
    p = cli("merge", f"model.path={base_model}", f"lora.path={lora}", f"out.dir={tmp_path / 'out'}", *extra)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    code, word = {"missing-lora": (2, "lora.path"), "unknown-key": (2, "out.colour"),
                  "module-not-in-base": (1, "to_nowhere")}[case]
    assert p.returncode == code and word in lines[0], lines[0]


# (g) an existing release is never replaced without out.overwrite=true.
def test_existing_out_dir_is_refused_without_overwrite(base_model, lora_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, line = _run([f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={out}"], capsys)
    assert code == 2 and "out.overwrite=true" in line and str(out) in line
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_the_same_merge_again_is_up_to_date_until_an_input_changes(base_model, lora_dir, tmp_path, capsys):
    """A retried job runs the same command on a finished release: it says so and exits 0, touching nothing.
    Settings that only say how files are placed do not count; other LoRA bytes under the same path do."""
    lora = tmp_path / "lora"
    shutil.copytree(lora_dir, lora)
    out = tmp_path / "out"
    argv = [f"model.path={base_model}", f"lora.path={lora}", f"out.dir={out}"]
    merge(base_model, lora, out)
    before = tree_digest(out)
    capsys.readouterr()
    run_cli("merge", main, argv + ["out.link=copy", "merge.verify=true"])
    assert capsys.readouterr().out.startswith(f"merge: up to date: {out} holds the release of these inputs")
    assert tree_digest(out) == before
    weights = load_file(lora / LORA_FILE)
    key = next(k for k in weights if ".lora_B." in k)
    weights[key] = weights[key] * 2
    with safe_open(str(lora / LORA_FILE), "pt") as f:
        header = f.metadata()
    save_file(weights, str(lora / LORA_FILE), metadata=header)
    code, line = _run(argv, capsys)
    assert code == 2 and "out.overwrite=true" in line and tree_digest(out) == before


def test_overwrite_never_deletes_a_folder_that_is_not_a_release(base_model, lora_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    argv = [f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={out}", "out.overwrite=true"]
    code, line = _run(argv, capsys)
    assert code == 2 and "holds other files" in line and str(out) in line, line
    assert os.listdir(out) == ["notes.md"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_overwrite_replaces_an_empty_folder(base_model, lora_dir, tmp_path):
    (tmp_path / "out").mkdir()
    out = merge(base_model, lora_dir, tmp_path / "out", "out.overwrite=true")
    assert (Path(out) / "model_index.json").is_file() and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("where", ["/proc/x", "{tmp}/a-file/out"])
def test_out_dir_that_cannot_be_created_is_a_usage_error(base_model, lora_dir, tmp_path, capsys, where):
    if where.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("needs Linux's /proc")
    (tmp_path / "a-file").write_text("not a folder")
    out = where.format(tmp=tmp_path)
    code, line = _run([f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={out}"], capsys)
    assert code == 2 and f"out.dir '{out}'" in line, line
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


# A write that fails mid-way (here: past a file size limit, as a full or broken disk would) is one line, and its
# staging folder is gone.
@pytest.mark.parametrize("link", ["hardlink", "copy"])  # fails in safetensors' writer / in the component copy
def test_write_failure_mid_way_is_one_line_and_leaves_nothing(base_model, lora_dir, tmp_path, link):
    import resource
    import signal

    out = tmp_path / "out"
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, limit[1]))  # for this process, only while it merges
    try:
        p = cli("merge", f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={out}", f"out.link={link}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    line = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert line.startswith("merge: error: ") and "File too large" in line, line
    assert re.search(re.escape(str(out)) + r"\.\d+\.[0-9a-f]{8}\.shardtune-tmp/release/", line), line
    assert os.listdir(tmp_path) == []


# safetensors writes 0600 files; a release on a shared machine must be readable as the umask allows.
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_release_files_get_the_umask_mode(base_model, lora_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = merge(base_model, lora_dir, tmp_path / "out", "out.max_shard_bytes=100000", "out.link=copy")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in Path(out).rglob("*") if p.is_file()}
    assert f"transformer/{WEIGHTS}.index.json" in modes
    assert sum(name.startswith("transformer/diffusion_pytorch_model-") for name in modes) >= 2
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_out_dir_overlapping_the_base_is_refused(base_model, lora_dir, capsys):
    code, line = _run([f"model.path={base_model}", f"lora.path={lora_dir}", f"out.dir={base_model}/merged"], capsys)
    assert code == 2 and "overlaps" in line


def test_shipped_configs_load():
    for name in ("tiny", "sd3-medium"):
        cfg = load_config(MergeConfig, ["--config", str(REPO / "configs" / name / "merge.yaml")])
        assert cfg.lora.scale == 1.0 and cfg.out.dtype == "auto" and cfg.out.link == "auto"
        assert not cfg.out.overwrite
    assert cfg.model.path == "stabilityai/stable-diffusion-3-medium-diffusers"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2,
                                   torch.float8_e4m3fn])
def test_finiteness_check_catches_nan_and_inf_in_every_float_dtype(dtype):
    from merge.fold import all_finite

    t = torch.randn(300, 7).to(dtype)
    assert all_finite(t) and all_finite(t[:0]) and all_finite(t[:, 2])
    bad = [float("nan")] + ([float("inf"), -float("inf")] if dtype != torch.float8_e4m3fn else [])  # e4m3fn: no inf
    for value in bad:
        for at in ((0, 0), (150, 3), (299, 6)):
            u = t.float()
            u[at] = value
            assert not all_finite(u.to(dtype)), (dtype, value, at)


def test_a_header_whose_sizes_disagree_is_one_line(tmp_path):
    from shards.tensorfile import TensorFile
    from shards.common.errors import DataError

    h = json.dumps({"a.weight": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    h += b" " * (-len(h) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(h).to_bytes(8, "little") + h + bytes(16))
    with pytest.raises(DataError, match=r"'a.weight' holds 16 bytes, not the F16 \[2, 2\]"):
        TensorFile(str(path))


def test_folding_runs_on_one_thread_and_gives_the_threads_back(base_model, lora_dir, tmp_path, monkeypatch):
    """Idle OpenMP workers spun on the cores the kernel copies need (BENCHMARKS.md); the caller's setting returns."""
    from merge import run as merge_run

    seen = []
    real = merge_run.fold_transformer
    monkeypatch.setattr(merge_run, "fold_transformer", lambda *a, **k: seen.append(torch.get_num_threads()) or
                        real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so the test means something on a one-core machine too
    try:
        merge(base_model, lora_dir, tmp_path / "out")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
