"""Multi-GPU and multi-node readiness, on CPU: four gloo ranks run ``tests/multirank_worker.py`` (stub engines where
vLLM would be), under a 60 s process-group timeout and a launch timeout, so a hang fails instead of blocking.
Each case would hang or mix values on code that assumed one engine per rank, equal metric keys on every rank, or
one filesystem per job; the engine's keyword arguments for several ranks are tested in test_vllm_engine.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RANKS = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multirank")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           str(ROOT / "tests" / "multirank_worker.py"), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def read(case: str) -> list[dict]:
        return [json.loads((out / f"{case}_rank{k}.json").read_text()) for k in range(RANKS)]

    return read


def test_tensor_parallel_groups_submit_the_same_prompts_with_the_same_seed(results):
    """TP 2 on 4 ranks: ranks 0,1 and 2,3 each submit one identical prompt list and draw the same sampler
    random numbers; the two groups differ; each rank trains on its own half, and the four halves are the step's
    global batch exactly once, in order."""
    r = results("tp_prompts")
    assert r[0]["submitted"] == r[1]["submitted"] and r[2]["submitted"] == r[3]["submitted"]
    assert r[0]["draw"] == r[1]["draw"] and r[2]["draw"] == r[3]["draw"] and r[0]["draw"] != r[2]["draw"]
    assert r[0]["submitted"] != r[2]["submitted"] and len(r[0]["submitted"]) == 4
    assert [x["layout"] for x in r] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert [p for x in r for p in x["trained"]] == r[0]["global_batch"]
    assert r[1]["trained"] == r[1]["submitted"][2:]
    for x in r:  # n=2 rollouts per trained prompt, indexed into the rank's own prompts
        assert x["rollouts"] == 4 and x["prompt_index"] == [0, 0, 1, 1]


def test_an_engine_group_with_no_validation_prompts_does_not_hang_the_others(results):
    """One validation prompt, two TP groups whose generate is a collective within the group: group 0 generates
    (both its ranks), group 1 skips; the counts add up once (the prompt is scored by one rank only)."""
    r = results("eval_empty")
    assert [x["generated"] for x in r] == [1, 1, 0, 0]
    for x in r:
        assert x["metrics"]["eval/prompts"] == 1.0 and x["metrics"]["eval/accuracy"] == 1.0


def test_a_rank_with_only_overlong_prompts_stops_every_rank_with_one_message(results):
    for x in results("overlong"):
        assert x["error"] and "longer than data.max_prompt_length" in x["error"]


def test_metrics_reduce_over_the_union_of_keys(results):
    """Ranks 0,2 report only_even_min, ranks 1,3 only_odd: each key is reduced over the ranks that have it,
    never paired with another key's value; sums count a missing key as 0."""
    for x in results("metric_keys"):
        assert x["mean"] == {"common": 1.5, "ratio_max": 3.0, "only_odd": 12.0, "only_even_min": 3.0}
        assert x["sum"] == {"loss/x": 1.0}


def test_every_rank_takes_the_same_resume_decision(results):
    """Only rank 0 sees the checkpoint: every rank skips it alike (none waits in a load the others skip); when
    all see it, all resume from it."""
    for x in results("resume_views"):
        assert x["alone"] == "None" and x["skipped"] == ["step_00000002: no trainer_state.json"]
        assert x["everyone"] == "step_00000002"


def test_an_output_dir_not_shared_by_every_rank_is_refused_by_name(results):
    r = results("shared_folder")
    for x in r:
        assert "is not shared by every rank: rank 1 on" in x["error"] and "rank 3 on" in x["error"]
        assert "trainer.output_dir" in x["error"] and "rank 2" not in x["error"]
    assert r[0]["leftovers"] == []  # the probe file is removed


def test_ranks_with_and_without_images_update_together(results):
    """Ranks 0,2 hold image prompts, 1,3 text-only ones, in one FSDP2 update: no hang, one global loss and
    gradient norm, and the vision tower moved (the image ranks' gradients reached every shard)."""
    r = results("mixed_images")
    assert len({x["loss"] for x in r}) == 1 and len({x["grad_norm"] for x in r}) == 1
    assert all(x["vision_moved"] > 0 for x in r) and len({x["vision_moved"] for x in r}) == 1


def test_balanced_ranks_give_the_same_update_as_the_unbalanced_order(results):
    """Rank 0's responses are long, the others' short. Moving prompt groups between ranks within their mini-batch
    (balance_stage) and splitting each rank's tokens evenly into micro-batches evens the ranks out, and the old
    log-probs of every response, the loss and gradient norm of each mini-batch and the weights after two
    optimizer steps equal those of the unbalanced order (fp32 summation order apart)."""
    r = results("balanced_update")
    plain, moved = r[0]["plain"], r[0]["moved"]
    assert plain["metrics"]["perf/balance_moved_groups"] == 0
    assert moved["metrics"]["perf/balance_moved_groups"] > 0
    before = plain["metrics"]["perf/rank_token_imbalance"]
    assert before > 1.3 and moved["metrics"]["perf/rank_token_imbalance_unbalanced"] == before
    assert moved["metrics"]["perf/rank_token_imbalance"] < before - 0.2
    assert sorted(i for x in r for i in x["moved"]["ids"]) == sorted(i for x in r for i in x["plain"]["ids"])
    assert any(x["moved"]["ids"] != x["plain"]["ids"] for x in r)  # groups did travel
    assert moved["losses"] == pytest.approx(plain["losses"], rel=1e-4, abs=1e-7) and plain["losses"][1] != 0
    assert moved["norms"] == pytest.approx(plain["norms"], rel=1e-5)
    assert r[0]["logprob_max_diff"] < 1e-3  # sums of ~50 log-probs of about -12 each
    assert r[0]["param_max_diff"] < 1e-5 < 1e-2 < r[0]["param_change"]
    assert all(x["param_max_diff"] == r[0]["param_max_diff"] for x in r)


def test_online_filtering_trains_exactly_the_batch_when_the_ranks_found_enough(results):
    """rollout_batch_size 8 on 4 ranks, n=2: rank 0 and rank 2 find only in-band groups, rank 1 none, rank 3 from
    round 2 on. After round 2 they hold 4 + 0 + 4 + 2 = 10: every rank trains 2 in-band groups (rank 1 two of
    rank 0's), the 2 left over are surplus; the old rule trained 2 + 1 fallback (A = 0) + 2 + 2."""
    ranks = [r["enough"] for r in results("filtering")]
    for r in ranks:
        assert len(r["trained"]) == 2 and r["prompt_index"] == [0, 0, 1, 1]
        assert all(set(r["rewards"][2 * g:2 * g + 2]) == {0.0, 1.0} for g in range(2))  # each group half right
    trained = [i for r in ranks for i in r["trained"]]
    found = [i for r in ranks for i in r["in_band_found"]]
    assert len(set(trained)) == 8 and set(trained) <= set(found) and len(found) == 10
    assert ranks[1]["trained"] == ranks[0]["in_band_found"][2:4]  # rank 1 took what rank 0 had beyond its share
    sampled = sum(len(r["sampled"]) for r in ranks)
    m = ranks[0]["metrics"]
    assert all(r["metrics"] == m for r in ranks)
    assert m == {"filter/sampled_groups": 16.0, "filter/trained_groups": 8.0, "filter/dropped_groups": 6.0,
                 "filter/surplus_groups": 2.0, "filter/fallback_groups": 0.0, "filter/rounds": 2.0}
    assert m["filter/trained_groups"] + m["filter/dropped_groups"] + m["filter/surplus_groups"] == sampled


def test_online_filtering_spreads_what_it_found_when_the_rounds_run_out(results):
    """Only rank 0 finds in-band groups (2, in round 1); the rounds (2) run out with 2 of 8: ranks 0 and 1 train
    one each, ranks 2 and 3 one out-of-band group each so that they take part (counted as fallback)."""
    ranks = [r["short"] for r in results("filtering")]
    assert [len(r["trained"]) for r in ranks] == [1, 1, 1, 1]
    assert [r["trained"][0] for r in ranks[:2]] == ranks[0]["in_band_found"]
    assert [sorted(r["rewards"]) for r in ranks] == [[0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert ranks[0]["metrics"] == {"filter/sampled_groups": 16.0, "filter/trained_groups": 4.0,
                                   "filter/dropped_groups": 12.0, "filter/surplus_groups": 0.0,
                                   "filter/fallback_groups": 2.0, "filter/rounds": 2.0}


def test_weight_sync_gathers_bf16_and_sends_the_same_tensors(results):
    for x in results("sync_bf16"):
        assert x["gathered_dtypes"] == ["torch.bfloat16"] and x["exact"] and x["names"]
        assert x["gathered_gb"] == x["sent_gb"]


def test_two_nodes_through_c10d_rendezvous_train_text_math_and_checkpoint(tmp_path):
    """Two single-process "nodes" on localhost, joined by torchrun's c10d rendezvous (LOCAL_RANK 0 and
    LOCAL_WORLD_SIZE 1 on each, WORLD_SIZE 2), running the built-in text-math task (configs/tiny_math.yaml: a
    text-only model, the Qwen2.5-Math template): two GMPO steps and a checkpoint that holds both ranks' files, so
    nothing assumes the local world is the whole world, and the text-math mode runs through the same loop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "mm_gmpo_two_nodes", str(ROOT / "scripts" / "train_mm.py"), "--config",
               str(ROOT / "configs" / "tiny_math.yaml"), f"trainer.output_dir={out}",
               "trainer.total_steps=2", "trainer.rollout_batch_size=4", "trainer.mini_batch_size=2", "rollout.n=4",
               "trainer.save_every=2", "trainer.eval_every=0", "trainer.export_hf=false", "logging.tensorboard=false"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                      cwd=ROOT))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    ckpt = out / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert (logs[0] + logs[1]).count("step 2/2 | reward") == 1  # the console summary, printed by rank 0 only
    trained = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in trained] == [1, 1, 2, 2] and all(s["split"] == "train" for s in trained)
    for s in trained:  # text only, the math template's system prompt, a one-digit answer scored against a + 1
        assert "Please reason step by step" in s["prompt"] and "What is " in s["prompt"] and "<|vision" not in s["prompt"]
        assert s["response"] in tuple("0123456789")
        a = int(s["prompt"].split("What is ")[1].split(" + 1?")[0])
        assert s["reward"] == float(s["response"] == str(a + 1))
