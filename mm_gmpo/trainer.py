"""The training loop. ``train(cfg)`` builds a run; ``train_step`` reads top to bottom in data-flow order:

    prompts -> rollout (n per prompt) -> rank balance -> rewards (scored beside the old log-probs)
            -> group advantages -> mini-batch GMPO/GRPO updates (FSDP2) -> weight sync -> eval / log / checkpoint

Every rank holds an FSDP2 shard of the policy and a colocated rollout engine with its own full copy of the
weights (as vLLM does; with ``rollout.tensor_parallel_size`` > 1 one engine spans that many ranks), refreshed by
``sync_weights`` after each step. Each rank generates a contiguous slice of the step's prompts; balancing then
moves whole prompt groups between ranks to even out their tokens, so a group always lives on one rank and
advantages need no communication. Each feature has one owner, built here: the inputs (``inputs``), the policy,
reference, optimizer and engine (``components``), rollout and online filtering (``rollout.batch.BatchFiller``),
rank balancing and the update schedule (``balance.balance_step``), rewards (``rewards.pending``), offload
(``offload.Offloader``), validation (``validator``), checkpoints and resume (``checkpointer``), the run folder
(``run_folder``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mm_gmpo import distributed
from mm_gmpo.advantage import step_advantages
from mm_gmpo.balance import balance_step
from mm_gmpo.checkpoint import TrainerState
from mm_gmpo.checkpointer import Checkpointer
from mm_gmpo.components import Components, build_components, make_trainer_engine
from mm_gmpo.config import Config, validate
from mm_gmpo.inputs import Inputs, PromptSampler, prepare_inputs
from mm_gmpo.logger import step_summary
from mm_gmpo.loss import kl_penalty, truncated_is_weights
from mm_gmpo.metrics import StepTimer, batch_metrics, gpu_used_gib, perf_metrics, sample_records, step_metrics
from mm_gmpo.offload import Offloader
from mm_gmpo.profiling import profiled, write_profile
from mm_gmpo.rewards.batch import start_workers
from mm_gmpo.rewards.pending import PendingRewards
from mm_gmpo.rollout.base import SamplingParams
from mm_gmpo.rollout.batch import BatchFiller, to_batch
from mm_gmpo.rollout.layout import rollout_layout
from mm_gmpo.run_folder import RunFolder
from mm_gmpo.update import UpdateBatch, step_update_metrics
from mm_gmpo.validator import Validator
from mm_gmpo.weight_sync import sync_weights


@dataclass
class Run:
    """Everything a step works with, built once by ``train``."""

    cfg: Config
    info: distributed.DistInfo
    inputs: Inputs
    sampler: PromptSampler
    folder: RunFolder
    parts: Components
    engine: object
    filler: BatchFiller
    offloader: Offloader
    validator: Validator
    checkpointer: Checkpointer
    state: TrainerState
    total_steps: int


def train(cfg: Config) -> dict[str, float]:
    """Train as ``cfg`` says; returns the last step's metrics."""
    info = distributed.init_distributed(cpu_collectives=cfg.trainer.cpu_offload)
    validate(cfg, world_size=info.world_size,
             local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    t, r = cfg.trainer, cfg.rollout
    layout = rollout_layout(info.rank, info.world_size, r.tensor_parallel_size if r.backend == "vllm" else 1)
    inputs = prepare_inputs(cfg, layout)  # read only: the run folder is made once the inputs are known to be good
    sampler = PromptSampler(len(inputs.train_prompts), seed=t.seed)
    total_steps = t.total_steps or max(1, t.epochs * len(inputs.train_prompts) // t.rollout_batch_size)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    folder = RunFolder(cfg, info)
    parts = build_components(cfg, info, total_steps, inputs.allowed)
    offloader = Offloader(t, parts.policy, parts.optimizer, parts.kl and parts.kl.model, info.device)
    offloader.park()  # the engine is created (and sizes its KV cache) without the trainer's offloaded state
    engine = make_trainer_engine(cfg, inputs.processor, info, layout, clips=inputs.has_clips)
    pool_s = start_workers(t.reward_workers, inputs.rf)  # warm scoring processes now, not inside step 1
    if info.is_main and pool_s:
        print(f"reward workers: {t.reward_workers} started in {pool_s:.1f} s")
    checkpointer = Checkpointer(cfg, folder.out, info, parts.policy, parts.optimizer, parts.scheduler)
    state = checkpointer.resume(sampler, folder.log)
    sync_weights(parts.policy, engine, dtype=parts.sync_dtype)
    sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                              allowed_token_ids=inputs.allowed)
    filler = BatchFiller(cfg, engine, sampler, inputs.train_prompts, inputs.processor, sampling, inputs.rf, info,
                         layout)
    validator = Validator(cfg, engine, inputs.val_encoded, inputs.rf, info, layout, folder.log, inputs.allowed)
    validator.before_training(state.step)
    run = Run(cfg, info, inputs, sampler, folder, parts, engine, filler, offloader, validator, checkpointer, state,
              total_steps)

    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not info.is_main)
    metrics: dict[str, float] = {}
    first_step = state.step + 1  # its timings include one-off costs (first sleep, optimizer state, compilation)
    for step in range(first_step, total_steps + 1):
        folder.watch.check()  # torchrun's launcher gone: stop rather than train on into its run folder
        metrics = train_step(run, step) | {"timing/warmup_step": float(step == first_step)}
        folder.log.log(step, metrics)
        if info.is_main and any(k.startswith("eval/") for k in metrics):  # the plot follows the run
            folder.plot()
        if info.is_main and cfg.logging.console_every and step % cfg.logging.console_every == 0:
            bar.write(step_summary(step, total_steps, metrics))
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.3f}")
        state.step, state.data_position = step, sampler.state_dict()
        checkpointer.maybe_save(state, total_steps)
    bar.close()
    folder.finish(parts.policy, inputs.processor)
    return metrics


def train_step(run: Run, step: int) -> dict[str, float]:
    """One step, each stage timed; returns its metrics (global: every rank returns the same)."""
    cfg, info, parts, alg = run.cfg, run.info, run.parts, run.cfg.algorithm
    n = cfg.rollout.n
    timer = StepTimer("prompts", "rollout", "reward")
    # 1-2. prompts and rollout (with online filtering: scored, and more rounds until the batch holds signal)
    gen = run.filler.fill(step, timer)
    # 3. even out the ranks' tokens (prompt groups move within their mini-batch); the update's schedule
    with timer("balance"):
        plan = balance_step(gen, n, cfg.trainer.rollout_batch_size // cfg.trainer.mini_batch_size,
                            cfg.trainer.ppo_epochs, step, info, enabled=cfg.trainer.balance_ranks,
                            uneven=alg.online_filtering)
    gen = plan.gen
    # scoring starts now and runs beside sleep and the old-log-prob pass; the advantages wait for it
    rewards = PendingRewards([e.prompt for e in gen.prompts], gen.rollouts, format_weight=alg.format_weight,
                             workers=cfg.trainer.reward_workers, reward_function=run.inputs.rf, scored=gen.rewards)
    with timer("rollout"):
        rollout_used = gpu_used_gib(info.device)  # the engine still awake beside the trainer's resident state
        run.engine.sleep()  # vLLM: give the GPU memory to the update
    batch, sampler_lp = to_batch(gen.prompts, gen.rollouts, run.inputs.tokenizer.pad_token_id)
    if info.device.type == "cuda":  # micro-batches cut from page-locked pixels are copied asynchronously
        batch = batch.pin_memory()
    parts.policy.reset_counters()
    with run.offloader.on_device(timer):
        # 4. old log-probs, reference log-probs (KL), the train/inference correction (TIS)
        with timer("old_logprob"):
            old_lp = parts.logprobs(batch)
        ref_lp = None
        if parts.kl is not None:
            with timer("ref_logprob"):
                ref_lp = parts.reference_logprobs(batch, run.offloader)
        is_w, tis_metrics = (truncated_is_weights(old_lp, sampler_lp, batch.response_mask, alg.tis_cap)
                             if alg.tis_cap > 0 else (None, {}))
        # 5. rewards (waited for only now), group advantages
        scores, reward_metrics = rewards.result(timer)
        with timer("advantage"):
            token_kl = kl_penalty(old_lp, ref_lp, alg.kl_penalty) if ref_lp is not None and alg.kl_in_reward else None
            advantages, adv_metrics, kl_metrics = step_advantages(
                scores, n, normalize_std=alg.normalize_std, eps=alg.adv_eps, token_kl=token_kl,
                mask=batch.response_mask, kl_coef=alg.kl_coef)
        # 6. mini-batch updates
        data = UpdateBatch(batch, old_lp, advantages, ref_lp, is_w)
        with timer("update"), profiled(info.device, enabled=step == cfg.trainer.profile_step) as prof:
            updates = [parts.optimizer_step(data.select(part)) for part in plan.schedule]
    if prof:  # trainer.profile_step: the update's own wall time, not the summary's
        timer.set("update", prof["wall_s"])
        write_profile(prof, Path(cfg.trainer.output_dir) / f"profile_update_step{step}", info.is_main)
    # 7. weight sync (the engine wakes up first; it must forget everything computed with the old weights)
    sync_metrics = sync_weights(parts.policy, run.engine, dtype=parts.sync_dtype)
    # 8. validation, metrics, samples
    eval_metrics = run.validator.maybe_run(step, run.total_steps)
    times = timer.metrics()
    update = step_update_metrics(updates)
    local = {**adv_metrics, **batch_metrics(batch, gen.rollouts, sampler_lp, old_lp), **tis_metrics}
    metrics = {**step_metrics(local, gen.metrics | reward_metrics, online_filtering=alg.online_filtering,
                              device=info.device),
               **update, **sync_metrics, **times, **plan.metrics, **eval_metrics, **kl_metrics,
               **perf_metrics(parts.policy, batch, update_s=times["timing/update_s"],
                              update_patches=update.get("perf/update_vision_patches", 0.0),
                              ppo_epochs=cfg.trainer.ppo_epochs, device=info.device, rollout_used_gib=rollout_used),
               **({"actor/kl_coef": alg.kl_coef} if parts.kl is not None else {}),
               "train/epoch": float(run.sampler.epoch)}
    if info.is_main and cfg.logging.train_samples:
        run.folder.log.samples(step, sample_records(gen.prompts, gen.rollouts, scores, advantages,
                                                    cfg.logging.train_samples), split="train")
    return metrics
