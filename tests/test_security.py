"""Reliability and security (issue 21): nothing a checkpoint or a config value names can run code; two
regressions the suite must catch (a uniform factor on the update's gradient; a wrong choice letter scored as
right)."""

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"  # the built-in task (scripts/train_mm.py's default config)


class _Boom:
    """Unpickling this runs ``os.system`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------- code execution from files


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    from mm_gmpo.checkpoint import _rng_state, _set_rng_state

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(_rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == want[1:]
    torch.manual_seed(3)  # the tensor draw again, from the restored state
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), want[0])


def test_a_crafted_rng_file_does_not_run_code_on_resume(tmp_path):
    from mm_gmpo.checkpoint import CheckpointError, TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy

    policy = Policy(build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(hidden_size=32, layers=1,
                                                                                      vision_depth=1),
                                dtype=torch.float32, seed=0))
    save_checkpoint(tmp_path / "ckpt", policy, None, None, TrainerState(step=1))
    folder = latest_checkpoint(tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    with open(folder / "rng" / "rank_0.pt", "wb") as f:
        pickle.dump({"torch": _Boom(marker)}, f)
    with pytest.raises(CheckpointError, match=r"rank_0\.pt: not an RNG state"):
        load_checkpoint(folder, policy, None, None)
    assert not marker.exists()


def test_template_names_stay_in_the_template_folder_and_render_in_a_sandbox(tmp_path):
    from mm_gmpo.data.prompts import DataError, render_question, system_prompt

    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    (tmp_path / "sub").mkdir()
    rel = os.path.relpath(tmp_path / "evil", ROOT / "mm_gmpo" / "templates")
    with pytest.raises(DataError, match="neither a built-in template"):
        render_question(rel, "2 + 2?")  # '../../tmp/.../evil': no walking out of the folder by name
    with pytest.raises(DataError, match="SecurityError"):
        render_question(str(evil), "2 + 2?")  # an explicit file renders, in the sandbox
    own = tmp_path / "mine.jinja"
    own.write_text("Q: {{ content }}{% if choices %} {{ choices | join(' / ') }}{% endif %}")
    (tmp_path / "mine.system.txt").write_text("Be brief.")
    assert render_question(str(own), " 2 + 2? ", ["3", "4"]) == "Q: 2 + 2? A. 3 / B. 4"
    assert system_prompt(str(own)) == "Be brief."
    assert render_question("plain", "2 + 2?") == "2 + 2?"


# ---------------------------------------------------------------- regressions the suite must catch


@pytest.mark.parametrize(("objective", "budget"), [("gmpo", 10_000), ("gmpo", 9), ("gmpo", 4), ("gspo", 4),
                                                    ("cispo", 4), ("sapo", 4)])
def test_update_gradient_equals_the_whole_batch_loss_gradient_in_float64(objective, budget, own_process_group):
    """policy_update's accumulated gradient (any micro-batch split) equals the gradient of the objective on the
    whole batch computed directly, in float64: a uniform factor anywhere in the update would show. Every
    normalisation: per sequence (GMPO, GSPO), token_mean (CISPO; GRPO's path), seq_mean_token_mean (SAPO;
    GSPO-token's)."""
    from mm_gmpo import distributed
    from mm_gmpo.loss import get_policy_loss, objective_defaults
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy, collate
    from mm_gmpo.update import UpdateBatch, policy_update

    def make():
        m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(hidden_size=32, layers=1, vision_depth=1),
                        dtype=torch.float64, seed=0, attn_implementation="eager")
        return Policy(m)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 150000, (5,), generator=g).tolist() for _ in range(4)]
    responses = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (3, 1, 4, 2)]
    batch = collate(prompts, responses, pad_id=0)
    old = torch.where(batch.response_mask.bool(), -torch.rand(batch.response_mask.shape, generator=g,
                                                              dtype=torch.float64) * 3, 0.0)
    adv = torch.tensor([1.0, -0.5, 0.8, -1.2], dtype=torch.float64)

    direct = make()
    logp, _ = direct(batch)
    loss_fn = get_policy_loss(objective)
    loss, _ = loss_fn(logp, old, adv, batch.response_mask)
    loss.backward()
    want = {n: p.grad.clone() for n, p in direct.named_parameters() if p.grad is not None}

    policy = make()
    distributed.parallelize(policy, param_dtype=None, reduce_dtype=torch.float64, activation_checkpointing=False)
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    by_tokens = objective_defaults(objective).get("loss_agg") == "token_mean"
    policy_update(policy, opt, UpdateBatch(batch, old, adv), loss_fn, max_tokens_per_micro_batch=budget,
                  max_grad_norm=0.0, keep_grads=True, normalize_by="tokens" if by_tokens else "sequences")
    got = {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.grad is not None}
    assert set(want) <= set(got)
    for n in set(got) - set(want):  # the vision tower ran on a blank patch x 0 (FSDP: every rank takes part)
        assert not got[n].any(), n
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-14, msg=n)


NAMING = ["the answer is ({L})", "The answer is {L}.", "\\boxed{{{L}}}", "\\boxed{{({L})}}", "Answer: {L}",
          "answer: ({L})", "**{L}**", "Final answer: {L}", "({L})", "{L}", "The correct option is {L}",
          "So the answer is {L}. {V}", "<think>compute</think> \\boxed{{{L}}}"]


@pytest.mark.parametrize("naming", NAMING)
def test_every_way_of_naming_a_wrong_letter_scores_zero(naming):
    """Inter-GPS problem 2401: choices 30 / 60 / 120 / 240, the answer is B; naming A in any style scores 0, and
    the same sentence naming B scores 1."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_rewards import geo

    from mm_gmpo.rewards import score

    d = geo(2401)
    assert d["answer"] == "B" and d["choices"][:2] == ["30", "60"]
    for letter, value in (("A", "30"), ("C", "120"), ("D", "240")):
        wrong = naming.format(L=letter, V=value)
        assert score(wrong, d["answer"], task="geometry3k", choices=d["choices"])["accuracy"] == 0, wrong
    right = naming.format(L="B", V="60")
    assert score(right, d["answer"], task="geometry3k", choices=d["choices"])["accuracy"] == 1, right


# ---------------------------------------------------------------- settings that cannot train


BAD = {
    "trainer.mini_batch_size": [-8, 0], "trainer.rollout_batch_size": [0, -16], "trainer.ppo_epochs": [0, -1],
    "trainer.total_steps": [-5], "trainer.epochs": [0], "rollout.n": [1, 0, -2], "optim.min_lr_ratio": [5, -0.1],
    "rollout.top_p": [2, 0, -0.5], "optim.max_grad_norm": [-1], "data.max_prompt_length": [0],
    "optim.lr": ["nan", "inf", 0, -1e-6], "rollout.temperature": ["nan", 0], "rollout.max_tokens": [0],
    "optim.betas": ["[2,3]", "[0.9]", "[0.9,1.0]"], "algorithm.clip_low": [-0.1, "nan"], "optim.weight_decay": [-0.01],
    "rollout.gpu_memory_utilization": [0, 1.5], "algorithm.kl_coef": ["inf"], "rollout.val_top_p": [0],
}


def test_every_value_that_cannot_train_is_a_config_error():
    from mm_gmpo.config import ConfigError, load_config, validate

    for key, values in BAD.items():
        for value in values:
            with pytest.raises(ConfigError, match=key.split(".")[-1]):
                validate(load_config(None, [f"{key}={value}"]))


def test_random_bad_overrides_fail_before_any_model(monkeypatch):
    """A property test: 200 seeded draws of one to three bad values mixed into valid overrides; validate raises
    ConfigError every time, and train() stops before building a model."""
    import random

    from mm_gmpo import trainer
    from mm_gmpo.config import ConfigError, load_config, validate

    rng = random.Random(0)
    good = ["trainer.rollout_batch_size=8", "trainer.mini_batch_size=4", "rollout.n=4", "optim.lr=1e-5"]
    for _ in range(200):
        picks = rng.sample(sorted(BAD), rng.randint(1, 3))
        overrides = [*rng.sample(good, 2), *(f"{k}={rng.choice(BAD[k])}" for k in picks)]
        with pytest.raises(ConfigError):
            validate(load_config(None, overrides))

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    from mm_gmpo import components

    monkeypatch.setattr(components, "build_policy", no_model)
    monkeypatch.setattr(components, "build_model", no_model)
    with pytest.raises(ConfigError):
        trainer.train(load_config(None, ["rollout.n=1", "trainer.output_dir=" + str(ROOT / "runs" / "never")]))


# ---------------------------------------------------------------- one trainer per run folder


def test_a_second_trainer_on_a_busy_run_folder_stops_naming_the_holder(tmp_path):
    import fcntl

    from mm_gmpo.config import ConfigError, load_config
    from mm_gmpo.run_folder import lock_run_folder
    from mm_gmpo.trainer import train

    out = tmp_path / "run"
    out.mkdir()
    held = lock_run_folder(out)
    assert f"pid {os.getpid()}" in (out / ".lock").read_text()
    with pytest.raises(ConfigError, match=rf"in use by a running trainer \(host .* pid {os.getpid()}\)"):
        train(load_config(TINY, [f"trainer.output_dir={out}", "trainer.total_steps=1"]))
    assert not (out / "metrics.jsonl").exists()
    held.close()  # the holder ends (the kernel drops the lock of a killed process the same way)
    again = lock_run_folder(out)
    fcntl.flock(again, fcntl.LOCK_UN)
    again.close()


# ---------------------------------------------------------------- resume with changed settings


@pytest.mark.slow
def test_resume_refuses_changed_maths_unless_allowed_and_then_applies_the_new_lr(tmp_path):
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    base = [sys.executable, str(ROOT / "scripts" / "train_mm.py"), f"trainer.output_dir={tmp_path / 'run'}",
            "trainer.rollout_batch_size=4", "trainer.mini_batch_size=4", "rollout.n=4", "trainer.eval_every=0",
            "trainer.export_hf=false", "trainer.save_every=1", "optim.lr_schedule=constant", "optim.lr=1e-3"]

    def run(*extra):
        return subprocess.run([*base, *extra], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)

    r = run("trainer.total_steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    # a change of the maths stops with one line listing it, before any step
    r = run("trainer.total_steps=4", "optim.lr=2e-3", "algorithm.clip_high=0.3")
    assert r.returncode == 2
    assert "optim.lr: 0.001 -> 0.002" in r.stderr and "algorithm.clip_high: 0.4 -> 0.3" in r.stderr
    assert len([x for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]) == 2
    # allowed: the new learning rate really applies; a harmless change (logging, more steps) is only reported
    r = run("trainer.total_steps=3", "optim.lr=2e-3", "trainer.resume_allow_changes=true",
            "logging.sample_generations=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "settings changed since the checkpoint: " in r.stdout and "logging.sample_generations" in r.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["actor/lr"] for row in rows] == [1e-3, 1e-3, 2e-3]


# ---------------------------------------------------------------- checkpoints that survive damage


def _three_checkpoints(folder: Path):
    from mm_gmpo.checkpoint import TrainerState, save_checkpoint
    from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
    from mm_gmpo.policy import Policy

    policy = Policy(build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(hidden_size=32, layers=1,
                                                                                      vision_depth=1),
                                dtype=torch.float32, seed=0))
    for step in (1, 2, 3):
        save_checkpoint(folder, policy, None, None, TrainerState(step=step), keep_last=3)
    return policy


@pytest.mark.parametrize("damage", ["truncate_shard", "garbage_shard", "drop_metadata", "drop_state", "garbage_rng"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    import json

    from mm_gmpo.checkpoint import MANIFEST, resume_point

    _three_checkpoints(tmp_path)
    newest = tmp_path / "step_00000003"
    manifest = json.loads((newest / MANIFEST).read_text())
    assert "trainer_state.json" in manifest and any(n.endswith(".distcp") for n in manifest)
    shard = next(p for p in sorted((newest / "model_optim").iterdir()) if p.suffix == ".distcp")
    if damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "garbage_shard":  # same size, other bytes: only the hash sees it
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "drop_metadata":
        (newest / "model_optim" / ".metadata").unlink()
    elif damage == "drop_state":
        (newest / "trainer_state.json").unlink()
    else:
        (newest / "rng" / "rank_0.pt").write_bytes(b"not a tensor file")
    path, skipped = resume_point(tmp_path)
    assert path == tmp_path / "step_00000002"
    assert len(skipped) == 1 and skipped[0].startswith("step_00000003: ")
    assert resume_point(tmp_path / "nothing") == (None, [])


def test_a_failed_save_names_the_cause_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    import errno

    from mm_gmpo import checkpoint
    from mm_gmpo.checkpoint import CheckpointError, TrainerState, save_checkpoint

    policy = _three_checkpoints(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_sharded", full_disk)
    with pytest.raises(CheckpointError, match=r"step_00000004 failed: No space left on device \(.* GiB free"):
        save_checkpoint(tmp_path, policy, None, None, TrainerState(step=4), keep_last=3)
    assert not list(tmp_path.glob(".tmp_*"))
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"


# ---------------------------------------------------------------- data that must not escape DataError


def _intergps_copy(root: Path, pid: int = 2401) -> Path:
    import shutil

    src = ROOT / "data" / "geometry3k" / "test" / str(pid)
    dst = root / "test" / str(pid)
    shutil.copytree(src, dst)
    return dst


def _png(size, mode="RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


BAD_ROWS = {
    "non_utf8": ("data.json", lambda d: (d / "data.json").write_bytes(b'{"problem_text": "\xff\xfe"}'), "not UTF-8"),
    "json_list": ("data.json", lambda d: (d / "data.json").write_text("[1, 2]"), "expected an object"),
    "choices_string": ("choices", lambda d: _edit(d, choices="ABCD"), "field 'choices'"),
    "problem_number": ("problem_text", lambda d: _edit(d, problem_text=42), "field 'problem_text'"),
    "truncated_image": ("img_diagram.png", lambda d: (d / "img_diagram.png").write_bytes(
        (d / "img_diagram.png").read_bytes()[:200]), "not a readable image"),
    "image_is_a_folder": ("img_diagram.png", lambda d: ((d / "img_diagram.png").unlink(),
                                                        (d / "img_diagram.png").mkdir()), "not a regular file"),
    "bomb": ("img_diagram.png", lambda d: (d / "img_diagram.png").write_bytes(_png((12000, 12000), "1")),
             "pixel cap"),
    "aspect": ("img_diagram.png", lambda d: (d / "img_diagram.png").write_bytes(_png((1, 300))), "aspect ratio"),
}


def _edit(d: Path, **fields):
    import json

    meta = json.loads((d / "data.json").read_text())
    meta.update(fields)
    (d / "data.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_every_bad_row_is_a_data_error_naming_file_and_field_and_skippable(tmp_path, case):
    from mm_gmpo.data.geometry3k import load_geometry3k
    from mm_gmpo.data.prompts import DataError

    field, damage, words = BAD_ROWS[case]
    bad = _intergps_copy(tmp_path, 2401)
    _intergps_copy(tmp_path, 2402)
    damage(bad)
    with pytest.raises(DataError) as e:
        load_geometry3k(tmp_path, "test", layout="intergps")
    assert "2401" in str(e.value) and words in str(e.value), str(e.value)
    assert field in str(e.value) or field == "data.json"
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        ds = load_geometry3k(tmp_path, "test", layout="intergps", on_bad_sample="skip")
    assert len(ds) == 1 and ds[0]["id"] == "2402"


# ---------------------------------------------------------------- a lost launcher, a full disk mid-run


@pytest.mark.slow
def test_a_worker_whose_launcher_died_stops(tmp_path):
    """A launcher (A) starts a worker (B) in its own session, as torchrun does, and dies; B's LauncherWatch sees
    it at its next check and stops."""
    import subprocess
    import time

    flag = tmp_path / "stopped"
    worker = (f"import os, sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "from mm_gmpo.run_folder import LauncherWatch\n"
              "w = LauncherWatch(parent=int(sys.argv[1]))  # the launcher's pid (it may be gone already)\n"
              "for _ in range(400):\n"
              "    try:\n"
              "        w.check()\n"
              "    except RuntimeError as e:\n"
              f"        open({str(flag)!r}, 'w').write(str(e)); break\n"
              "    time.sleep(0.05)\n")
    launcher = (f"import subprocess, sys, time, os; subprocess.Popen([sys.executable, '-c', {worker!r}, "
                "str(os.getpid())], start_new_session=True); time.sleep(0.5); os._exit(0)")
    subprocess.run([sys.executable, "-c", launcher], timeout=60)
    for _ in range(400):
        if flag.exists() and flag.read_text():
            break
        time.sleep(0.05)
    assert "is gone; this worker" in flag.read_text()
    assert LauncherWatch_never_fires_outside_torchrun()


def LauncherWatch_never_fires_outside_torchrun() -> bool:
    from mm_gmpo.run_folder import LauncherWatch

    w = LauncherWatch()
    w.check()
    return w.parent is None or "LOCAL_RANK" in os.environ


@pytest.mark.slow
def test_a_full_disk_mid_run_stops_with_the_cause_or_warns_and_trains_on(tmp_path, monkeypatch, own_process_group):
    import errno
    import json

    from mm_gmpo import checkpoint
    from mm_gmpo.checkpoint import CheckpointError
    from mm_gmpo.config import load_config
    from mm_gmpo.trainer import train

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_sharded", full_disk)
    args = ["trainer.rollout_batch_size=4", "trainer.mini_batch_size=4", "rollout.n=4", "trainer.eval_every=0",
            "trainer.export_hf=false", "trainer.save_every=1", "trainer.total_steps=2", "reward_workers=0"]
    args = [a.replace("reward_workers", "trainer.reward_workers") for a in args]
    with pytest.raises(CheckpointError, match="No space left on device"):
        train(load_config(TINY, [*args, f"trainer.output_dir={tmp_path / 'error'}"]))
    assert len((tmp_path / "error" / "metrics.jsonl").read_text().splitlines()) == 1
    train(load_config(TINY, [*args, f"trainer.output_dir={tmp_path / 'warn'}", "trainer.save_errors=warn"]))
    rows = [json.loads(x) for x in (tmp_path / "warn" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert not list((tmp_path / "warn" / "checkpoints").glob(".tmp_*"))
