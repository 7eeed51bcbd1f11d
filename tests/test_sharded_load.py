"""Sharded loading (model.load=sharded): a model built on the meta device, sharded by FSDP2 on 2 gloo ranks and
filled rank by rank equals an unsharded from_pretrained of the same folder exactly, while each rank reads about
half of the checkpoint (counted); random models are the same on any number of ranks; train() gives the same run
with model.load=sharded as with model.load=full."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_gmpo.lora import add_lora
from mm_gmpo.models import RandomSource, build_model, empty_model, model_config, tiny_qwen2_5_vl_config

pytestmark = pytest.mark.slow  # every test here starts torchrun ranks

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_ranks(nproc: int, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "load_worker.py"), *args, "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A pretrained folder shaped like the 7B (untied LM head), saved in two safetensors files, bf16 on disk."""
    from mm_gmpo.models import write_model_folder

    cfg = tiny_qwen2_5_vl_config()
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = False
    d = tmp_path_factory.mktemp("pretrained")
    model = build_model("t", random_init=True, config=cfg, dtype=torch.bfloat16, attn_implementation="sdpa", seed=7)
    model.save_pretrained(d, max_shard_size="12MB")
    write_model_folder(d / "tok", cfg)  # tokenizer files beside (train() reads the processor from the folder)
    for f in (d / "tok").iterdir():
        if not (d / f.name).exists():
            f.rename(d / f.name)
    return d


def test_sharded_load_equals_from_pretrained_and_reads_half_per_rank(folder, tmp_path):
    assert (folder / "model.safetensors.index.json").exists()  # the multi-file layout of real checkpoints
    got = run_ranks(2, tmp_path / "out.pt", "--folder", str(folder), "--source", "checkpoint")
    ref = build_model(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    assert not ref.config.tie_word_embeddings and "lm_head.weight" in got["params"]
    ref_params = dict(ref.named_parameters())
    assert set(got["params"]) == set(ref_params)
    for name, p in ref_params.items():
        assert torch.equal(got["params"][name], p), name  # bit-exact: the same bf16 values, cast to fp32
    ref_buffers = dict(ref.named_buffers())
    for name, b in got["buffers"].items():
        assert torch.equal(b, ref_buffers[name]), name  # the rotary tables survive to_empty
    on_disk = sum(p.numel() * 2 for p in ref_params.values())  # bf16 bytes of the checkpoint
    largest = max(p.numel() * 2 for p in ref_params.values())
    for r in got["ranks"]:
        # each rank reads its rows of every tensor: half the checkpoint (uneven row counts: within a row each)
        assert abs(r["bytes_read"] - on_disk / 2) <= sum(p[0].numel() * 2 for p in ref_params.values())
        assert r["largest_held"] <= largest / 2 + largest / ref_params["lm_head.weight"].shape[0]
        assert r["shard_bytes"] == pytest.approx(2 * r["bytes_read"], rel=1e-9)  # fp32 shards of what it read
    assert sum(r["bytes_read"] for r in got["ranks"]) == on_disk


def test_random_init_is_the_same_on_any_number_of_ranks(folder, tmp_path):
    got = run_ranks(2, tmp_path / "out.pt", "--folder", str(folder), "--source", "random")
    meta = empty_model(model_config(folder), attn_implementation="sdpa")
    single = RandomSource(meta, 5)
    for name, _ in meta.named_parameters():
        assert torch.equal(got["params"][name], single.read(name, slice(None))), name
    # transformers' own init rule, module by module: norms 1, biases 0, weights N(0, initializer_range)
    params = got["params"]
    assert torch.equal(params["model.language_model.norm.weight"], torch.ones(64))
    assert not params["model.visual.blocks.0.attn.qkv.bias"].any()
    w = params["model.language_model.layers.0.mlp.up_proj.weight"]
    assert w.std().item() == pytest.approx(0.02, rel=0.1) and abs(w.mean().item()) < 2e-3
    # and a rank holds one module at a time, never the model
    assert max(r["largest_held"] for r in got["ranks"]) == params["lm_head.weight"].numel() * 4


def test_lora_on_a_sharded_load_reads_base_weights_and_starts_adapters_as_peft(folder, tmp_path):
    got = run_ranks(2, tmp_path / "out.pt", "--folder", str(folder), "--source", "checkpoint", "--lora", "4")
    ref = build_model(str(folder), dtype=torch.float32, attn_implementation="sdpa")
    add_lora(ref, rank=4, alpha=8)
    for name, p in ref.named_parameters():
        if ".lora_" not in name:
            assert torch.equal(got["params"][name], p), name
    lora_a = [n for n in got["params"] if ".lora_A." in n]
    assert len(lora_a) == 14
    for name in lora_a:
        a, b = got["params"][name], got["params"][name.replace(".lora_A.", ".lora_B.")]
        assert not b.any()  # B = 0: the model starts unchanged
        bound = 1 / a.shape[1] ** 0.5  # Kaiming-uniform(a=sqrt(5)) of peft / nn.Linear
        assert a.abs().max().item() <= bound and a.abs().max().item() > 0.8 * bound


def test_train_is_the_same_run_with_sharded_and_full_loading(folder, tmp_path):
    runs = {}
    for load in ("full", "sharded"):
        out = tmp_path / load
        cmd = [sys.executable, str(ROOT / "scripts" / "train_mm.py"), f"model.path={folder}", f"model.load={load}",
               f"trainer.output_dir={out}", "trainer.total_steps=2", "trainer.rollout_batch_size=4",
               "trainer.mini_batch_size=4", "rollout.n=4", "trainer.eval_every=0", "trainer.save_every=0",
               "trainer.export_hf=false"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert ("sharded load: read" in r.stdout) == (load == "sharded")
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs[load] = [{k: v for k, v in row.items() if not k.startswith(("time", "timing/", "perf/"))}
                      for row in rows]
    assert len(runs["full"]) == 2 and runs["full"] == runs["sharded"]
