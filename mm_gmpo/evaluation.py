"""Evaluation: generate -> score -> generations.jsonl -> report, resumable, one code path for every benchmark.

Every number in the report is recomputed from ``generations.jsonl`` (one line per sample: id, sample, prompt,
response, extracted answer, correct, ...), so any figure can be traced to its samples, and an interrupted run
resumes by skipping the ids already written. The report covers the problems asked for this time only.

An output folder belongs to one setting: ``settings.json`` records the model (and a fingerprint of its weight
files), dataset, backend, sampling, template and image sizes; resuming into a folder written with other settings
(or by an older version without settings) is refused with the differences named, so a folder never reports
another run's results. The CLI's default folder is derived from those settings.

Metrics
    accuracy (mean@k)  mean over problems of the fraction of correct samples (= greedy pass@1 when n=1, T=0)
    pass@k             fraction of problems with at least one correct sample
    format_rate        fraction of samples in the required format
    mean_response_tokens, truncated_rate (hit max_tokens)
    by_type            accuracy per value of each metadata list field (Geometry3K problem_type_graph/goal)
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mm_gmpo.data.processing import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, encode_prompt
from mm_gmpo.data.prompts import Prompt
from mm_gmpo.logger import drop_torn_tail, read_jsonl
from mm_gmpo.rewards import extract_answer
from mm_gmpo.rewards.pending import score_rollouts
from mm_gmpo.rollout.base import RolloutEngine, SamplingParams
from mm_gmpo.rollout.factory import make_engine as factory_make_engine

TYPE_FIELDS = ("problem_type_graph", "problem_type_goal", "level", "subject")


@dataclass
class EvalReport:
    dataset: str
    n_problems: int
    n_samples: int
    accuracy: float
    pass_at_k: float
    format_rate: float
    mean_response_tokens: float
    truncated_rate: float
    k: int
    by_type: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        lines = [
            f"## {self.dataset}",
            "",
            "| metric | value |",
            "|---|---|",
            f"| problems | {self.n_problems} |",
            f"| samples per problem (k) | {self.k} |",
            f"| accuracy (mean@{self.k}) | {100 * self.accuracy:.1f} |",
            f"| pass@{self.k} | {100 * self.pass_at_k:.1f} |",
            f"| format compliance | {100 * self.format_rate:.1f} |",
            f"| mean response tokens | {self.mean_response_tokens:.0f} |",
            f"| truncated (hit max tokens) | {100 * self.truncated_rate:.1f} |",
        ]
        for fname, table in self.by_type.items():
            lines += ["", f"### by {fname}", "", "| type | problems | accuracy |", "|---|---|---|"]
            for t, row in sorted(table.items(), key=lambda kv: -kv[1]["n"]):
                lines.append(f"| {t} | {row['n']:.0f} | {100 * row['accuracy']:.1f} |")
        return "\n".join(lines) + "\n"


read_generations = read_jsonl  # records of a generations.jsonl


def report_from_generations(records: list[dict], dataset: str, sampling: dict | None = None) -> EvalReport:
    """All report numbers, from generation records only."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_id[r["id"]].append(r)
    n = len(by_id)
    if n == 0:
        return EvalReport(dataset, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, sampling=sampling or {})
    per_problem = {i: sum(r["correct"] for r in rs) / len(rs) for i, rs in by_id.items()}
    by_type: dict[str, dict[str, dict[str, float]]] = {}
    for fname in TYPE_FIELDS:
        acc: dict[str, list[float]] = defaultdict(list)
        for i, rs in by_id.items():
            val = rs[0].get("metadata", {}).get(fname)
            if val is None or val == -1 or val == "":
                continue
            for t in val if isinstance(val, list) else [val]:
                acc[str(t)].append(per_problem[i])
        if acc:
            by_type[fname] = {t: {"n": float(len(v)), "accuracy": sum(v) / len(v)} for t, v in acc.items()}
    return EvalReport(
        dataset=dataset,
        n_problems=n,
        n_samples=len(records),
        accuracy=sum(per_problem.values()) / n,
        pass_at_k=sum(any(r["correct"] for r in rs) for rs in by_id.values()) / n,
        format_rate=sum(r["format"] for r in records) / len(records),
        mean_response_tokens=sum(r["response_tokens"] for r in records) / len(records),
        truncated_rate=sum(r["finish_reason"] == "length" for r in records) / len(records),
        k=max(len(rs) for rs in by_id.values()),
        by_type=by_type,
        sampling=sampling or {},
    )


class EvalSettingsError(ValueError):
    """An output folder written with other settings than this run's (the message names the differences)."""


SETTINGS = "settings.json"


def model_fingerprint(model: str) -> str:
    """What identifies the weights behind ``model``: for a local folder a hash of its weight and config files'
    names, sizes and modification times (a re-export changes it), else the hub id or random-model name."""
    import hashlib

    folder = Path(model)
    if not folder.is_dir():
        return model
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{folder.resolve()}@{h.hexdigest()[:12]}"


def full_settings(settings: dict[str, Any], *, dataset: str, sampling: SamplingParams, min_pixels: int,
                  max_pixels: int, format_weight: float) -> dict[str, Any]:
    """What an output folder records: the caller's settings (model, backend, ...) with the dataset, sampling,
    image sizes and format weight, as they read back from JSON (tuples become lists)."""
    return json.loads(json.dumps({"dataset": dataset, **settings, "sampling": asdict(sampling),
                                  "min_pixels": min_pixels, "max_pixels": max_pixels,
                                  "format_weight": format_weight}))


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` when it was written with other settings (or without any recorded)."""
    have = out / SETTINGS
    if have.exists():
        try:
            old = json.loads(have.read_text())
        except ValueError:
            old = {}
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise EvalSettingsError(f"{out} holds results of other settings ({'; '.join(diff[:4])}); pass another "
                                    "--out, or --overwrite to replace them")
    else:
        gens = out / "generations.jsonl"
        found = [n for n in ("results.json", "results.md") if (out / n).exists()]
        if gens.exists() and gens.stat().st_size:
            found.insert(0, "generations.jsonl")
        if found:
            raise EvalSettingsError(f"{out} holds {', '.join(found)} without a {SETTINGS} (another or an older run): "
                                    "their settings are unknown; pass another --out, or --overwrite to replace them")


def drop_unfinished(gen_path: Path, n: int) -> set[str]:
    """The ids with all ``n`` samples in ``gen_path``; rows of ids with fewer (a run killed mid-problem) are
    removed from the file (rewritten atomically), so those problems are generated again, whole."""
    rows = read_generations(gen_path)
    samples: dict[str, set[int]] = defaultdict(set)
    for r in rows:
        samples[r["id"]].add(int(r.get("sample", 0)))
    done = {i for i, got in samples.items() if got >= set(range(n))}
    if len(done) != len(samples):
        tmp = gen_path.with_name(gen_path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r["id"] in done)
        tmp.replace(gen_path)
    return done


def evaluate(
    prompts: Iterable[Prompt],
    engine: RolloutEngine,
    processor,
    out_dir: str | Path,
    *,
    dataset: str,
    sampling: SamplingParams,
    batch_size: int = 32,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    format_weight: float = 0.1,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> EvalReport:
    """Generate, score and report; writes generations.jsonl, results.json and results.md under ``out_dir``.

    Resumable: problems whose id is already in generations.jsonl are skipped. ``settings`` (what produced the
    generations: model, backend, ...; the sampling and image sizes are added) must match those of an earlier run
    in ``out_dir`` (:class:`EvalSettingsError` otherwise). The report covers ``prompts`` only.
    """
    prompts = list(prompts)
    if batch_size < 1 or sampling.n < 1:
        raise ValueError(f"evaluate needs batch_size >= 1 and sampling.n >= 1, got {batch_size} and {sampling.n}")
    out = Path(out_dir)
    settings = full_settings(settings or {}, dataset=dataset, sampling=sampling, min_pixels=min_pixels,
                             max_pixels=max_pixels, format_weight=format_weight)
    check_settings(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=2))
    gen_path = out / "generations.jsonl"
    drop_torn_tail(gen_path)
    done = drop_unfinished(gen_path, sampling.n)
    todo = [p for p in prompts if p.id not in done]
    t0 = time.perf_counter()
    correct = total = 0
    bar = tqdm(total=len(todo), desc=f"eval {dataset}", unit="problem", disable=not progress)
    with open(gen_path, "a") as f:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            encs = [encode_prompt(p, processor, min_pixels=min_pixels, max_pixels=max_pixels) for p in chunk]
            rollouts = engine.generate(encs, sampling)
            scores, _ = score_rollouts(chunk, rollouts, format_weight=format_weight)
            for r, s in zip(rollouts, scores, strict=True):
                p = chunk[r.prompt_index]
                rec = {
                    "id": p.id, "sample": r.sample_index, "prompt": encs[r.prompt_index].text,
                    "response": r.text, "extracted": extract_answer(r.text), "ground_truth": p.ground_truth,
                    "choices": p.choices, "correct": s["accuracy"] == 1.0, "format": s["format"],
                    "response_tokens": len(r.response_ids), "finish_reason": r.finish_reason,
                    "metadata": {k: v for k, v in p.metadata.items() if k in TYPE_FIELDS},
                }
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                correct += rec["correct"]
                total += 1
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(acc=f"{correct / max(total, 1):.3f}")
    bar.close()
    asked = {p.id for p in prompts}
    report = report_from_generations([r for r in read_generations(gen_path) if r["id"] in asked], dataset,
                                     asdict(sampling))
    report.seconds = time.perf_counter() - t0
    report.settings = settings
    (out / "results.json").write_text(json.dumps(asdict(report), indent=2))
    (out / "results.md").write_text(report.to_markdown())
    return report


def make_engine(backend: str, model: str, *, device: str | None = None, batch_size: int = 16, dtype: str = "auto",
                min_pixels: int | None = None, max_pixels: int | None = None, max_model_len: int | None = None,
                max_images: int = 1, max_videos: int = 0):
    """(engine, processor) for the evaluation commands: ``rollout.factory.make_engine`` with a model's own weights
    (vLLM loads them; a random-weight model is for --backend hf, plumbing and speed only)."""
    from mm_gmpo.data.processing import load_processor
    from mm_gmpo.models import is_random_model, processor_source, torch_dtype
    from mm_gmpo.rollout.factory import BACKENDS

    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    is_random = is_random_model(model) if model else True
    if backend == "vllm" and is_random:
        raise SystemExit(f"--backend vllm needs a model folder or hub name; {model} is for --backend hf")
    processor = load_processor(processor_source(model or "tiny-random"))
    if backend == "vllm":
        engine = factory_make_engine("vllm", model, processor=processor, dtype=dtype if dtype == "auto" else
                                     torch_dtype(dtype), load_format="auto", enable_sleep_mode=False,
                                     gpu_memory_utilization=0.85, min_pixels=min_pixels, max_pixels=max_pixels,
                                     max_model_len=max_model_len, max_images_per_prompt=max_images,
                                     max_videos_per_prompt=max_videos)
    else:
        engine = factory_make_engine(backend, model, processor=processor, dtype=dtype,
                                     device=torch.device(device) if device else None, batch_size=batch_size)
    return engine, processor


def _at_least(low: int):
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value

    return parse


def add_eval_args(ap) -> None:
    """Arguments shared by the evaluation scripts."""
    ap.add_argument("--model", required=True, help="HF-format folder (e.g. a trainer export), hub name, or tiny-random / random:NAME")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm", "oracle", "oracle-wrong"])
    ap.add_argument("--n", type=_at_least(1), default=1, help="samples per problem (k of mean@k / pass@k)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=_at_least(1), default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=_at_least(0), default=0, help="evaluate only the first N problems (0 = all); the "
                    "report covers those N, and a later run without --limit in the same folder adds the rest")
    ap.add_argument("--batch-size", type=_at_least(1), default=32)
    ap.add_argument("--template", default=None, help="prompt template in mm_gmpo/templates (default per dataset)")
    ap.add_argument("--format-weight", type=float, default=0.1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="output folder (default: eval_out/<dataset>/<model>-<backend>-"
                    "<sampling>, derived from the settings)")
    ap.add_argument("--overwrite", action="store_true", help="replace the results already in the output folder")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[-60:] or "model"


def default_out(args, dataset: str) -> Path:
    """eval_out/<dataset>/<model>-<backend>-<sampling>: a folder per setting, so runs never mix."""
    model = Path(args.model)
    name = "_".join(model.parts[-2:]) if model.is_dir() else args.model
    greedy = args.temperature <= 0
    sampling = ("greedy" if greedy else f"t{args.temperature:g}-p{args.top_p:g}") + f"-n{args.n}-max{args.max_tokens}"
    if not greedy:
        sampling += f"-seed{args.seed}"
    template = f"-{args.template}" if args.template else ""
    return Path("eval_out") / _slug(dataset) / f"{_slug(name)}-{args.backend}-{sampling}{template}"


SECONDS_PER_PROBLEM = {"oracle": "well under 0.01 s", "oracle-wrong": "well under 0.01 s",
                       "hf": "about 30 s per batch of up to --batch-size problems at 2,048 tokens for the tiny random "
                             "model on 2 CPU cores (measured: 31 s for 2 problems; a random model never stops early "
                             "and tokens come one at a time); real models are far slower on a CPU",
                       "vllm": "set by the model, the GPU and --max-tokens (not measured here for evaluation)"}


def run_cli(args, prompts: list[Prompt], dataset: str, *, min_pixels: int, max_pixels: int) -> EvalReport:
    import sys

    if args.limit:
        prompts = prompts[:args.limit]
    sampling = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              seed=args.seed)
    out = Path(args.out) if args.out else default_out(args, dataset)
    settings = {"model": args.model, "model_fingerprint": model_fingerprint(args.model), "backend": args.backend,
                "template": args.template}
    if args.overwrite and out.exists():
        for name in ("generations.jsonl", SETTINGS, "results.json", "results.md"):
            (out / name).unlink(missing_ok=True)
    try:  # every setting, before any model is loaded (evaluate checks again: the library path)
        check_settings(out, full_settings(settings, dataset=dataset, sampling=sampling, min_pixels=min_pixels,
                                          max_pixels=max_pixels, format_weight=args.format_weight))
    except EvalSettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"evaluating {len(prompts)} problems of {dataset} with {args.model} ({args.backend}) into {out}; "
          f"typical time per problem: {SECONDS_PER_PROBLEM[args.backend]}")
    engine, proc = make_engine(args.backend, args.model, device=args.device, batch_size=args.batch_size,
                               min_pixels=min_pixels, max_pixels=max_pixels, max_model_len=None,
                               max_images=max(1, max((p.n_images for p in prompts), default=1)),
                               max_videos=max((p.n_videos for p in prompts), default=0))
    try:
        report = evaluate(prompts, engine, proc, out, dataset=dataset, sampling=sampling,
                          batch_size=args.batch_size, min_pixels=min_pixels, max_pixels=max_pixels,
                          format_weight=args.format_weight, settings=settings)
    except EvalSettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.to_markdown())
    print(f"wrote {out / 'generations.jsonl'}, {out / 'results.json'}, {out / 'results.md'}")
    return report
