"""``score_batch``: many responses at once, in worker processes with a hard per-item time limit.

Each item already runs under a SIGALRM deadline inside :func:`score`. Some work cannot be interrupted by a signal
(a C-level big-integer power inside sympy, say), so with ``workers > 0`` items run in separate processes and a
worker that makes no progress for ``timeout_s + grace_s`` is killed and replaced; its item scores 0 and the rest
of its chunk is re-queued. Workers are started once (``forkserver``: safe after CUDA and threads) and reused.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from mm_gmpo.rewards.custom import RewardFunction, caller, reward_input
from mm_gmpo.rewards.math_equiv import warm_up
from mm_gmpo.rewards.score import DEFAULT_DEADLINE_S, RewardScore, score

ZERO = RewardScore(overall=0.0, accuracy=0.0, format=0.0)


def _worker_main(conn: Connection, rf: RewardFunction | None = None) -> None:
    warm_up()
    try:
        call = caller(rf) if rf is not None else None  # a user function is imported once per worker
    except Exception as e:
        conn.send(f"error: {e}")
        return
    conn.send("ready")
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if call is None:
            for idx, kwargs in chunk:
                conn.send((idx, score(**kwargs)))
        else:  # the batch contract gets the chunk in one call
            for (idx, _), res in zip(chunk, call([kw for _, kw in chunk]), strict=True):
                conn.send((idx, res))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    pending: deque = field(default_factory=deque)  # item indices sent and not yet answered
    last_progress: float = 0.0


class RewardPool:
    """A fixed set of scoring processes. Use :func:`score_batch`; this is its engine."""

    def __init__(self, workers: int, rf: RewardFunction | None = None) -> None:
        self._ctx = mp.get_context("forkserver")
        self.rf = rf
        self.workers = [self._start() for _ in range(workers)]
        for w in self.workers:
            self._await_ready(w)

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.rf), daemon=True)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    @staticmethod
    def _await_ready(w: _Worker, timeout_s: float = 120.0) -> None:
        """Workers import sympy/math-verify before taking work, so no item's clock pays for it."""
        try:
            msg = w.conn.recv() if w.conn.poll(timeout_s) else None
        except (EOFError, OSError):
            msg = f"the process exited (code {w.process.exitcode})"
        if msg != "ready":
            raise RuntimeError(f"reward worker did not start within {timeout_s:.0f} s" if msg is None else
                               f"reward worker could not start: {msg}")

    def _spawn(self) -> _Worker:
        w = self._start()
        self._await_ready(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.process.kill()
        w.process.join(timeout=5)
        w.conn.close()
        self.workers[self.workers.index(w)] = self._spawn()

    def map(self, items: list[dict], hard_timeout_s: float, chunk: int = 16, zero: Any = ZERO) -> tuple[list, int]:
        """Results in item order and the number of workers killed (their stuck item gets ``zero``).

        ``hard_timeout_s``: longest wait for a worker's next result (a batch reward function answers a whole
        chunk at once, so the caller scales it by the chunk size)."""
        results: list[Any] = [None] * len(items)
        todo = deque(range(len(items)))
        killed = 0
        while todo or any(w.pending for w in self.workers):
            for w in self.workers:
                if not w.pending and todo:
                    take = [todo.popleft() for _ in range(min(chunk, len(todo)))]
                    w.pending.extend(take)
                    w.last_progress = time.monotonic()
                    w.conn.send([(i, items[i]) for i in take])
            busy = [w for w in self.workers if w.pending]
            ready = wait([w.conn for w in busy], timeout=0.05)
            for w in busy:
                if w.conn in ready:
                    try:
                        while w.conn.poll():
                            idx, res = w.conn.recv()
                            results[idx] = res
                            w.pending.remove(idx)
                            w.last_progress = time.monotonic()
                    except (EOFError, OSError):  # worker died (e.g. out of memory): its item scores 0
                        self._check_exit(w)
                        results[w.pending.popleft()] = zero
                        todo.extendleft(reversed(w.pending))
                        w.pending.clear()
                        self._replace(w)
                        killed += 1
                elif time.monotonic() - w.last_progress > hard_timeout_s:
                    results[w.pending.popleft()] = zero
                    todo.extendleft(reversed(w.pending))
                    w.pending.clear()
                    self._replace(w)
                    killed += 1
        return [r if r is not None else zero for r in results], killed

    def _check_exit(self, w: _Worker) -> None:
        """A user reward function that ended its worker itself (``os._exit``: a clean exit code, not a kill by a
        signal such as the kernel's out-of-memory killer) stops the run, naming the function: it would end every
        worker that runs it."""
        w.process.join(timeout=5)
        code = w.process.exitcode
        if self.rf is not None and code is not None and code >= 0:
            from mm_gmpo.rewards.custom import RewardFunctionError

            self.close()
            raise RewardFunctionError(f"algorithm.reward_function: {self.rf.spec} ended its reward worker process "
                                      f"(exit code {code}: os._exit or similar) while scoring; a reward function "
                                      "must return a score, never exit the process")

    def close(self) -> None:
        for w in self.workers:
            w.conn.close()
            w.process.kill()
        self.workers = []


_POOL: RewardPool | None = None


def _pool(workers: int, rf: RewardFunction | None = None) -> RewardPool:
    global _POOL
    if _POOL is None or len(_POOL.workers) != workers or _POOL.rf != rf:
        if _POOL is not None:
            _POOL.close()
        _POOL = RewardPool(workers, rf)
        atexit.register(_POOL.close)
    return _POOL


def start_workers(workers: int, reward_function: RewardFunction | None = None) -> float:
    """Start the scoring processes now (imports and math-verify warmed) rather than inside the first step that
    scores, so no step pays for it; ``score_batch`` with the same ``workers`` and ``reward_function`` reuses them.
    Returns the seconds it took (0 for ``workers <= 0``: scoring in this process)."""
    if workers <= 0:
        return 0.0
    t0 = time.perf_counter()
    _pool(workers, reward_function)
    return time.perf_counter() - t0


def score_batch(
    responses: list[str],
    ground_truths: list[str],
    *,
    task: str | list[str],
    choices: list[list[str] | None] | None = None,
    choice_values: list[list[float] | None] | None = None,
    format_weight: float = 0.1,
    format_pattern: str | None = None,
    timeout_s: float | None = DEFAULT_DEADLINE_S,
    workers: int | None = None,
    grace_s: float = 1.0,
    reward_function: RewardFunction | None = None,
    response_lengths: list[int] | None = None,
) -> tuple[list[RewardScore], dict[str, float]]:
    """Score many responses; same semantics as :func:`score`, item i uses ``ground_truths[i]``, ``choices[i]``.

    Args:
        task: one task for all items, or one per item.
        reward_function: score with this user function instead (``mm_gmpo.rewards.custom``; task, choices and
            the format settings are then unused); ``response_lengths`` (tokens) go into its inputs.
        workers: scoring processes; 0 scores in this process (SIGALRM deadline only); default min(2, cpus).
        grace_s: extra time past ``timeout_s`` before a stuck worker is killed.

    Returns:
        (scores, metrics) with mean overall/accuracy/format, the number of items killed for time, and seconds.
    """
    n = len(responses)
    if len(ground_truths) != n:
        raise ValueError(f"{n} responses but {len(ground_truths)} ground truths")
    tasks = [task] * n if isinstance(task, str) else list(task)
    choices = choices if choices is not None else [None] * n
    choice_values = choice_values if choice_values is not None else [None] * n
    if not (len(tasks) == len(choices) == len(choice_values) == n):
        raise ValueError("task, choices and choice_values must have one entry per response")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if reward_function is not None:
        lengths = response_lengths if response_lengths is not None else [len(r) for r in responses]
        return _score_custom(responses, ground_truths, lengths, reward_function, workers, grace_s)
    items = [
        dict(response=r, ground_truth=g, task=t, choices=c, choice_values=v, format_weight=format_weight,
             format_pattern=format_pattern, timeout_s=timeout_s)
        for r, g, t, c, v in zip(responses, ground_truths, tasks, choices, choice_values, strict=True)
    ]
    t0 = time.perf_counter()
    if workers <= 0 or n == 0:
        scores, killed = [score(**it) for it in items], 0
    else:
        scores, killed = _pool(workers).map(items, hard_timeout_s=(timeout_s or 0.0) + grace_s)
    elapsed = time.perf_counter() - t0
    denom = max(n, 1)
    metrics = {
        "reward/overall": sum(s["overall"] for s in scores) / denom,
        "reward/accuracy": sum(s["accuracy"] for s in scores) / denom,
        "reward/format": sum(s["format"] for s in scores) / denom,
        "reward/killed_for_time": float(killed),
        "timing/reward_s": elapsed,
    }
    return scores, metrics


def _score_custom(responses: list[str], ground_truths: list[str], lengths: list[int], rf: RewardFunction,
                  workers: int, grace_s: float, chunk: int = 16) -> tuple[list, dict[str, float]]:
    """A user reward function over many items: (scores, metrics) with ``reward/<key>`` for every key it returns,
    ``reward/errors`` (items whose call raised, timed out or returned a wrong shape: scored 0)."""
    items = [reward_input(r, g, n) for r, g, n in zip(responses, ground_truths, lengths, strict=True)]
    t0 = time.perf_counter()
    zero = ({"overall": 0.0}, "killed: no answer within the hard time limit")
    if workers <= 0 or not items:
        call = caller(rf)
        results = [res for s in range(0, len(items), chunk) for res in call(items[s:s + chunk])]
        killed = 0
    else:
        per_wait = rf.timeout_s * (chunk if caller(rf).kind == "batch" else 1)  # loaded here by the probe already
        results, killed = _pool(workers, rf).map(items, hard_timeout_s=2 * per_wait + grace_s, chunk=chunk,
                                                 zero=zero)
    scores = [sc for sc, _ in results]
    n = max(len(scores), 1)
    metrics: dict[str, float] = {"reward/overall": sum(sc["overall"] for sc in scores) / n}
    for key in sorted({k for sc in scores for k in sc} - {"overall"}):
        vals = [sc[key] for sc in scores if key in sc]
        metrics[f"reward/{key}"] = sum(vals) / len(vals)
    metrics.setdefault("reward/accuracy", metrics["reward/overall"])  # no 'accuracy' key: the reward itself
    errors = [e for _, e in results if e is not None]
    metrics["reward/errors"] = float(len(errors))
    metrics["reward/killed_for_time"] = float(killed)
    metrics["timing/reward_s"] = time.perf_counter() - t0
    if errors:
        warnings.warn(f"reward function {rf.spec}: {len(errors)} of {len(items)} items scored 0 "
                      f"(first: {errors[0]})", stacklevel=3)
    out = [{**sc, "accuracy": sc.get("accuracy", sc["overall"])} for sc in scores]
    return out, metrics
