"""Evaluation: oracle 100% / wrong 0% / garbage 0%, report == recomputation from generations.jsonl, resume,
HF engine on a tiny random model (and on an exported HF folder), sampler log-probs == trainer log-probs."""

import json
from collections import defaultdict

import pytest
import torch

from mm_gmpo.data import geometry3k_prompts, load_geometry3k, load_text_math, text_math_prompts
from mm_gmpo.data.processing import encode_prompt, load_processor
from mm_gmpo.evaluation import evaluate, make_engine, read_generations
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate
from mm_gmpo.rollout.base import SamplingParams
from mm_gmpo.rollout.hf import HFEngine
from mm_gmpo.rollout.oracle import OracleEngine

SMALL = {"min_pixels": 3136, "max_pixels": 50_000}


@pytest.fixture(scope="module")
def processor():
    return load_processor()


@pytest.fixture(scope="module")
def geo_subset():
    ds = load_geometry3k(split="test").select(range(0, 601, 20))  # 31 problems of all types
    return ds


def recompute(path):
    """Independent recomputation of the headline numbers from generations.jsonl."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    per = defaultdict(list)
    for r in rows:
        per[r["id"]].append(r["correct"])
    acc = sum(sum(v) / len(v) for v in per.values()) / len(per)
    pass_k = sum(any(v) for v in per.values()) / len(per)
    fmt = sum(r["format"] for r in rows) / len(rows)
    return len(per), acc, pass_k, fmt, rows


@pytest.mark.parametrize("show_choices", [False, True])
@pytest.mark.parametrize(("mode", "expected"), [("correct", 1.0), ("wrong", 0.0), ("garbage", 0.0)])
def test_oracle_backends(tmp_path, processor, geo_subset, show_choices, mode, expected):
    prompts = list(geometry3k_prompts(geo_subset, show_choices=show_choices))
    rep = evaluate(prompts, OracleEngine(mode), processor, tmp_path, dataset="geo", progress=False,
                   sampling=SamplingParams(n=2), **SMALL)
    assert rep.n_problems == len(prompts) == 31 and rep.k == 2 and rep.n_samples == 62
    assert rep.accuracy == expected and rep.pass_at_k == expected
    n, acc, pass_k, fmt, rows = recompute(tmp_path / "generations.jsonl")
    assert (n, acc, pass_k, fmt) == (rep.n_problems, rep.accuracy, rep.pass_at_k, rep.format_rate)
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == rep.accuracy
    assert "| accuracy (mean@2) |" in (tmp_path / "results.md").read_text()
    assert set(rep.by_type) == {"problem_type_graph", "problem_type_goal"}
    if mode == "correct":
        assert all(r["extracted"] == r["ground_truth"] for r in rows)


def test_per_type_table_matches_recomputation(tmp_path, processor, geo_subset):
    prompts = list(geometry3k_prompts(geo_subset))

    class HalfOracle(OracleEngine):  # right on even problems, wrong on odd ones
        def generate(self, encs, sampling):
            out = super().generate(encs, sampling)
            for r in out:
                if r.prompt_index % 2:
                    r.text = "\\boxed{-1e9}"
            return out

    rep = evaluate(prompts, HalfOracle("correct"), processor, tmp_path, dataset="geo", progress=False,
                   sampling=SamplingParams(), **SMALL)
    _, acc, _, _, rows = recompute(tmp_path / "generations.jsonl")
    assert 0 < rep.accuracy == acc < 1
    by_goal = defaultdict(list)
    for r in rows:
        for t in r["metadata"]["problem_type_goal"]:
            by_goal[t].append(r["correct"])
    for t, v in by_goal.items():
        assert rep.by_type["problem_type_goal"][t]["accuracy"] == pytest.approx(sum(v) / len(v))
        assert rep.by_type["problem_type_goal"][t]["n"] == len(v)


def test_resume_skips_done_ids_and_ignores_torn_line(tmp_path, processor, geo_subset):
    prompts = list(geometry3k_prompts(geo_subset))
    calls = []

    class Counting(OracleEngine):
        def generate(self, encs, sampling):
            calls.append(len(encs))
            return super().generate(encs, sampling)

    evaluate(prompts[:10], Counting(), processor, tmp_path, dataset="geo", progress=False,
             sampling=SamplingParams(), **SMALL)
    with open(tmp_path / "generations.jsonl", "a") as f:
        f.write('{"id": "geometry3k/test/torn", "sam')  # a kill mid-write
    rep = evaluate(prompts, Counting(), processor, tmp_path, dataset="geo", progress=False,
                   sampling=SamplingParams(), batch_size=100, **SMALL)
    assert calls == [10, 21]
    assert rep.n_problems == 31 and rep.accuracy == 1.0
    assert len(read_generations(tmp_path / "generations.jsonl")) == 31


def test_text_math_oracle(tmp_path, processor):
    prompts = list(text_math_prompts(load_text_math("math500").select(range(25))))
    rep = evaluate(prompts, OracleEngine(), processor, tmp_path, dataset="math500", progress=False,
                   sampling=SamplingParams())
    assert rep.accuracy == 1.0 and "level" in rep.by_type and "subject" in rep.by_type
    rep_w = evaluate(prompts, OracleEngine("wrong"), processor, tmp_path / "w", dataset="math500", progress=False,
                     sampling=SamplingParams())
    assert rep_w.accuracy == 0.0


def test_hf_engine_sampler_logprobs_match_policy(processor, geo_subset):
    """The HF engine's sampler log-probs (T=1) equal the trainer's log-probs of the same tokens: no mismatch."""
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    engine = HFEngine(model, processor.tokenizer, batch_size=8)
    encs = [encode_prompt(p, processor, **SMALL) for p in geometry3k_prompts(geo_subset.select(range(3)))]
    rollouts = engine.generate(encs, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=0))
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, s) for i in range(3) for s in range(2)]
    assert all(151655 not in r.response_ids for r in rollouts)  # image pad never sampled
    assert all(r.finish_reason in ("stop", "length") and 0 < len(r.response_ids) <= 12 for r in rollouts)
    batch = collate([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id=151643,
                    pixel_values=[encs[r.prompt_index].pixel_values for r in rollouts],
                    image_grid_thw=[encs[r.prompt_index].image_grid_thw for r in rollouts])
    with torch.no_grad():
        lp, _ = Policy(model)(batch)
    for i, r in enumerate(rollouts):
        torch.testing.assert_close(lp[i, :len(r.response_ids)], torch.tensor(r.logprobs), rtol=0, atol=1e-4)


def test_eval_on_exported_hf_folder(tmp_path, processor, geo_subset):
    """Any HF-format folder (what the trainer exports) evaluates through the same code path."""
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    engine, proc = make_engine("hf", str(tmp_path / "ckpt"), device="cpu", batch_size=4)
    prompts = list(geometry3k_prompts(geo_subset.select(range(2))))
    rep = evaluate(prompts, engine, proc, tmp_path / "out", dataset="geo", progress=False,
                   sampling=SamplingParams(n=1, temperature=0.0, max_tokens=6), **SMALL)
    rows = read_generations(tmp_path / "out" / "generations.jsonl")
    assert rep.n_problems == 2 and len(rows) == 2
    assert all(0 < r["response_tokens"] <= 6 for r in rows)
    assert rep.mean_response_tokens == sum(r["response_tokens"] for r in rows) / 2


def test_make_engine_random_models_as_the_trainer_names_them(tmp_path):
    """'tiny-random' and 'random:CONFIG' build random-weight models from the config (bundled processor), as the
    trainer's model.path does; vLLM refuses them (it needs weights on disk)."""
    cfg = tiny_qwen2_5_vl_config(hidden_size=96)
    cfg.to_json_file(tmp_path / "config.json")
    engine, proc = make_engine("hf", f"random:{tmp_path / 'config.json'}", device="cpu")
    assert engine.model.config.text_config.hidden_size == 96 and proc.tokenizer is not None
    engine, _ = make_engine("hf", "tiny-random", device="cpu")
    assert engine.model.config.text_config.hidden_size == 64
    with pytest.raises(SystemExit, match="random:x is for --backend hf"):
        make_engine("vllm", "random:x")


def test_a_folder_of_other_settings_is_refused_and_the_report_covers_what_was_asked(tmp_path, processor, geo_subset):
    """The issue's stumble: an oracle run filled the folder, then a model evaluated with --limit 5 printed the
    oracle's 31-problem result. Now other settings are refused by name; the same settings with fewer problems
    report those problems only; results.json records the settings."""
    from mm_gmpo.evaluation import EvalSettingsError

    prompts = list(geometry3k_prompts(geo_subset))
    evaluate(prompts, OracleEngine(), processor, tmp_path, dataset="geo", progress=False, sampling=SamplingParams(),
             settings={"model": "oracle-run", "backend": "oracle"}, **SMALL)
    with pytest.raises(EvalSettingsError, match=r"model: 'oracle-run' there, 'runs/tiny/hf_export' now"):
        evaluate(prompts[:5], OracleEngine("wrong"), processor, tmp_path, dataset="geo", progress=False,
                 sampling=SamplingParams(), settings={"model": "runs/tiny/hf_export", "backend": "oracle"}, **SMALL)
    with pytest.raises(EvalSettingsError, match="sampling"):
        evaluate(prompts[:5], OracleEngine(), processor, tmp_path, dataset="geo", progress=False,
                 sampling=SamplingParams(n=4, temperature=1.0), settings={"model": "oracle-run", "backend": "oracle"},
                 **SMALL)
    rep = evaluate(prompts[:5], OracleEngine(), processor, tmp_path, dataset="geo", progress=False,
                   sampling=SamplingParams(), settings={"model": "oracle-run", "backend": "oracle"}, **SMALL)
    assert rep.n_problems == 5 and rep.n_samples == 5
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["model"] == "oracle-run" and saved["settings"]["sampling"]["n"] == 1
    assert saved["n_problems"] == 5
    (tmp_path / "settings.json").unlink()  # a folder from before settings were recorded
    with pytest.raises(EvalSettingsError, match=r"without a settings\.json"):
        evaluate(prompts[:5], OracleEngine(), processor, tmp_path, dataset="geo", progress=False,
                 sampling=SamplingParams(), **SMALL)


@pytest.mark.slow
def test_cli_default_folder_follows_the_settings_and_refuses_mixing(tmp_path, monkeypatch, capsys):
    """eval_geometry3k.py: the oracle and oracle-wrong backends get folders of their own by default; an explicit
    --out that holds the other backend's results stops with exit code 2 and one line."""
    import runpy
    from pathlib import Path

    from mm_gmpo.evaluation import default_out

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)

    def cli(*args):  # the script in this process: one import for every call
        monkeypatch.setattr("sys.argv", ["eval_geometry3k.py", "--model", "tiny-random", "--limit", "3", *args])
        code = 0
        try:
            runpy.run_path(str(root / "scripts" / "eval_geometry3k.py"), run_name="__main__")
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    a, b = cli("--backend", "oracle"), cli("--backend", "oracle-wrong")
    assert a[0] == 0 and b[0] == 0, a[2][-2000:] + b[2][-2000:]
    folders = sorted(p.parent.relative_to(tmp_path) for p in tmp_path.glob("eval_out/*/*/results.json"))
    assert [str(f) for f in folders] == ["eval_out/geometry3k_test/tiny-random-oracle-greedy-n1-max2048",
                                         "eval_out/geometry3k_test/tiny-random-oracle-wrong-greedy-n1-max2048"]
    assert "| accuracy (mean@1) | 100.0 |" in a[1] and "| accuracy (mean@1) | 0.0 |" in b[1]
    code, _, err = cli("--backend", "oracle-wrong", "--out", str(tmp_path / folders[0]))
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / folders[0]} holds results of other settings (backend: 'oracle' there, 'oracle-wrong' "
        "now); pass another --out, or --overwrite to replace them"]

    class Args:
        model, backend, temperature, top_p, n, max_tokens, seed, template = "m", "hf", 1.0, 0.9, 8, 512, 3, None

    assert default_out(Args, "math500") == Path("eval_out/math500/m-hf-t1-p0.9-n8-max512-seed3")
