"""Offload between stages (trainer.offload_params / offload_optimizer): parameter shards and optimizer state go to
the CPU while the engine generates and come back for the update; the weight sync reads them where they are. On a
GPU the moves are real (devices checked); on the CPU the same code runs as a no-op move, and the runs must match."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm_gmpo import distributed
from mm_gmpo.loss import gmpo_loss
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.offload import move_train_state
from mm_gmpo.optim import build_optimizer
from mm_gmpo.policy import Policy, collate
from mm_gmpo.update import UpdateBatch, policy_update

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sharded_policy(name: str):
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0,
                        attn_implementation="sdpa")
    policy = Policy(model).to(DEVICE)
    distributed.parallelize(policy, param_dtype=None, activation_checkpointing=False)
    return policy, build_optimizer(policy, lr=1e-3, name=name)


def data(seed: int) -> UpdateBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (4, 14), generator=g)
    b = collate(ids[:, :8].tolist(), ids[:, 8:].tolist(), pad_id=0)
    return UpdateBatch(b, -torch.rand(b.response_mask.shape, generator=g), torch.randn(4, generator=g))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_offload_round_trip_leaves_the_run_unchanged(name, own_process_group):
    runs = []
    for offload in (False, True):
        policy, opt = sharded_policy(name)
        policy_update(policy, opt, data(0), gmpo_loss, device=DEVICE)  # optimizer state exists from here on
        if offload:
            moved = move_train_state(policy, opt, torch.device("cpu"))
            assert all(p.device.type == "cpu" for p in policy.parameters())
            assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values()
                       if torch.is_tensor(v) and v.ndim > 0)
            n_params = sum(p.numel() for p in policy.parameters())
            assert moved >= (4 * n_params if DEVICE.type == "cuda" else 0)  # nothing to move on a CPU
            # the weight sync gathers from the CPU shards: the same tensors as on the device
            offloaded = {n: distributed.full_tensor(p).cpu() for n, p in policy.named_parameters()}
            move_train_state(policy, opt, DEVICE)
            assert all(p.device == DEVICE or p.device.type == DEVICE.type for p in policy.parameters())
            for n, p in policy.named_parameters():
                assert torch.equal(offloaded[n], distributed.full_tensor(p).cpu()), n
        policy_update(policy, opt, data(1), gmpo_loss, device=DEVICE)
        runs.append({n: p.full_tensor().detach().cpu() for n, p in policy.named_parameters()})
        torch.distributed.barrier()
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n


@pytest.mark.slow
def test_train_with_offload_is_the_same_run_and_times_the_moves(tmp_path):
    runs = {}
    for flags in ((), ("trainer.offload_params=true", "trainer.offload_optimizer=true")):
        out = tmp_path / ("offload" if flags else "plain")
        cmd = [sys.executable, str(ROOT / "scripts" / "train_mm.py"), f"trainer.output_dir={out}",
               "trainer.total_steps=3", "trainer.rollout_batch_size=4", "trainer.mini_batch_size=2", "rollout.n=4",
               "trainer.eval_every=0", "trainer.save_every=2", "trainer.export_hf=false", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        if flags:
            assert all("timing/offload_s" in row and "timing/reload_s" in row for row in rows)
        runs[bool(flags)] = [{k: v for k, v in row.items() if not k.startswith(("time", "timing/", "perf/"))}
                             for row in rows]
    assert len(runs[False]) == 3 and runs[False] == runs[True]


def test_offload_and_cpu_offload_together_is_a_config_error():
    from mm_gmpo.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=r"trainer\.cpu_offload already"):
        validate(load_config(None, ["trainer.cpu_offload=true", "trainer.offload_params=true"]))


@pytest.mark.slow
def test_with_offload_the_checkpoint_and_export_are_written_from_the_cpu_shards(tmp_path, monkeypatch,
                                                                                 own_process_group):
    """The engine is awake when a step saves (and at the end, when the run exports): bringing the training state
    back to the GPU then would need the memory the engine holds (the one-H200 7B plan runs out). So the state
    stays where offload put it. A spy follows the state's place; the compute device is named cpu:0 here so that
    a move to it can be told from a move to the host."""
    from mm_gmpo import checkpointer, offload, run_folder, trainer
    from mm_gmpo.config import load_config

    compute = torch.device("cpu", 0)
    monkeypatch.setattr(trainer.distributed, "init_distributed",
                        lambda **kw: distributed.DistInfo(0, 1, 0, compute))
    where = ["compute"]
    seen = []
    move = offload.move_train_state

    def spy_move(policy, optimizer, device, **kw):
        where[0] = "compute" if device == compute else "host"
        return move(policy, optimizer, device, **kw)

    def spy(name, real):
        def call(*args, **kwargs):
            seen.append((name, where[0]))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(offload, "move_train_state", spy_move)
    monkeypatch.setattr(checkpointer, "save_checkpoint", spy("save", checkpointer.save_checkpoint))
    monkeypatch.setattr(run_folder, "export_hf", spy("export", run_folder.export_hf))
    cfg = load_config(None, [f"trainer.output_dir={tmp_path / 'run'}", "trainer.total_steps=1",
                             "trainer.rollout_batch_size=2", "trainer.mini_batch_size=2", "rollout.n=2",
                             "trainer.eval_every=0", "trainer.save_every=1", "trainer.export_hf=true",
                             "logging.tensorboard=false", "trainer.offload_params=true",
                             "trainer.offload_optimizer=true", "rollout.max_tokens=8"])
    trainer.train(cfg)
    assert seen == [("save", "host"), ("export", "host")]
    assert (tmp_path / "run" / "hf_export" / "model.safetensors").exists()
