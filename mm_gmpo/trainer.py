"""The training loop. ``train(cfg)`` reads top to bottom in data-flow order:

    prompts -> rollout (n per prompt) -> rank balance -> rewards (scored beside the old log-probs)
            -> group advantages -> mini-batch GMPO/GRPO updates (FSDP2) -> weight sync -> log / eval / checkpoint

Every rank holds an FSDP2 shard of the policy and a colocated rollout engine with its own full copy of the
weights (as vLLM does; with ``rollout.tensor_parallel_size`` > 1 one engine spans that many ranks), refreshed by
``sync_weights`` after each step. Each rank generates a contiguous slice of the step's prompts (the ranks of one
tensor-parallel engine generate their slices together, ``distributed.RolloutLayout``); ``balance_stage`` then
moves whole prompt groups between ranks to even out their tokens, so a group always lives on one rank and
advantages need no communication. Rewards are scored beside the old-log-prob pass (``PendingRewards``).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mm_gmpo import distributed
from mm_gmpo.advantage import group_advantages, groups_in_band, kl_shaped_rewards
from mm_gmpo.attention import use_grouped_vision_attention
from mm_gmpo.balance import assign_groups, pace
from mm_gmpo.checkpoint import (
    CheckpointError,
    TrainerState,
    export_hf,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    verify_checkpoint,
)
from mm_gmpo.config import Config, ConfigError, config_changes, dump_yaml, to_dict, validate
from mm_gmpo.data.processing import EncodedPrompt, encode_prompts, load_processor
from mm_gmpo.data.prompts import DataError, Prompt, limit_images
from mm_gmpo.data.synthetic import COLORS, DIGITS, single_token_ids
from mm_gmpo.logger import MetricsLogger, plot_training, read_metrics, run_summary, step_summary
from mm_gmpo.lora import adapters_disabled, add_lora
from mm_gmpo.loss import get_policy_loss, kl_penalty, truncated_is_weights
from mm_gmpo.models import (
    ASSETS,
    CheckpointSource,
    RandomSource,
    build_model,
    check_model_source,
    compile_blocks,
    empty_model,
    is_random_model,
    loads_sharded,
    model_config,
    random_model_config,
    resolve_attention,
    write_model_folder,
)
from mm_gmpo.policy import Policy, PolicyBatch, collate, use_packing
from mm_gmpo.profiling import profiled, write_profile
from mm_gmpo.rewards import score_batch
from mm_gmpo.rewards.batch import start_workers
from mm_gmpo.rewards.custom import RewardFunction, probe, resolve_spec
from mm_gmpo.rollout.base import Rollout, SamplingParams
from mm_gmpo.update import (
    UpdateBatch,
    build_optimizer,
    build_scheduler,
    compute_logprobs,
    group_minibatches,
    master_dtype,
    peak_bf16_flops,
    policy_update,
    training_flops,
    update_schedule,
)
from mm_gmpo.weight_sync import sync_weights

# ---------------------------------------------------------------- stage hand-offs


@dataclass
class RolloutBatch:
    """What the rollout, reward and advantage stages hand to the update (this rank's share of one step)."""

    prompts: list[EncodedPrompt]
    rollouts: list[Rollout]  # prompt-major: n samples of prompt 0, then prompt 1, ...
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    batch: PolicyBatch
    sampler_logprobs: torch.Tensor  # (N, R), 0 where the engine reports none


class PromptSampler:
    """Deterministic epoch-wise shuffling over a prompt list; its state is the data position in checkpoints."""

    def __init__(self, n_items: int, seed: int):
        self.n, self.seed, self.epoch, self.index = n_items, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index:self.index + take]
            self.index += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", self.n) != self.n:
            raise ConfigError(f"the checkpoint's dataset had {state['n']} prompts, this one has {self.n}: "
                              "resume with the same data, or start a new output_dir")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


# ---------------------------------------------------------------- setup helpers


def load_prompts(cfg: Config, split: str) -> list[Prompt]:
    """Train or validation prompts for the configured dataset; prompts with more than data.max_images images are
    dropped with a counted warning."""
    d = cfg.data
    source = d.train_source if split == "train" else d.val_source
    which = d.train_split if split == "train" else d.val_split
    if d.dataset == "files":
        from mm_gmpo.data.files import Columns, load_file_prompts

        source = d.train_files if split == "train" else d.val_files
        prompts = load_file_prompts(source, columns=Columns(d.prompt_key, d.answer_key, d.image_key),
                                    image_dir=d.image_dir or None, template=d.template,
                                    system_prompt=d.system_prompt or None, task=d.task, on_bad_sample=d.on_bad_sample,
                                    default_split="train" if split == "train" else "test")
    elif d.dataset == "synthetic":
        from mm_gmpo.data.synthetic import synthetic_prompts

        prompts = synthetic_prompts(512 if split == "train" else 64, seed=cfg.trainer.seed, split=split)
    elif d.dataset == "arithmetic":
        from mm_gmpo.data.synthetic import arithmetic_prompts

        prompts = arithmetic_prompts(512 if split == "train" else 64, seed=cfg.trainer.seed, split=split,
                                     template=d.template)
    elif d.dataset == "geometry3k":
        from mm_gmpo.data.geometry3k import geometry3k_prompts, load_geometry3k

        ds = load_geometry3k(source, which, on_bad_sample=d.on_bad_sample) if source else load_geometry3k(split=which)
        prompts = list(geometry3k_prompts(ds, template=d.template, show_choices=d.show_choices))
    else:
        from mm_gmpo.data.text_math import load_text_math, text_math_prompts

        ds = load_text_math(source or "math500", split=which, levels=d.levels or None, on_bad_sample=d.on_bad_sample)
        prompts = list(text_math_prompts(ds, template=d.template))
    return limit_images(prompts, d.max_images, source or f"{d.dataset} [{split}]")


def reward_function(cfg: Config, probe_ground_truth: str) -> RewardFunction | None:
    """The configured user reward function, loaded and called once on one sample, or None (built-in verifiers).
    Every mistake in it stops the run here, before the first rollout, with a message naming file and function."""
    a = cfg.algorithm
    if not a.reward_function:
        return None
    rf = RewardFunction(resolve_spec(a.reward_function), dict(a.reward_kwargs), a.reward_type, a.reward_timeout_s)
    probe(rf, probe_ground_truth)
    return rf


@dataclass
class Inputs:
    """What the run reads before anything is written: processor, prompts, reward function, restricted tokens."""

    processor: object
    tokenizer: object
    train_prompts: list[Prompt]
    rf: RewardFunction | None
    val_encoded: list[EncodedPrompt]  # this engine group's share of the validation prompts
    allowed: tuple[int, ...] | None  # restricted sampling: the built-in tasks' answers, or rollout.allowed_tokens


def prepare_inputs(cfg: Config, layout: distributed.RolloutLayout) -> Inputs:
    """Load and check every input (model or processor source, train and validation data, the reward function's
    probe, restricted tokens); raises ConfigError / DataError naming the key, file or filter."""
    t, r = cfg.trainer, cfg.rollout
    key, source = ("model.processor", cfg.model.processor) if cfg.model.processor else ("model.path", cfg.model.path)
    check_model_source(source, key)
    try:
        processor = load_processor(ASSETS if is_random_model(source) else source)
    except DataError as e:
        why = ("the folder has no processor or tokenizer that loads" if Path(source).expanduser().exists() else
               "the folder does not exist and the hub could not give it")
        raise ConfigError(f"{key}: no model folder or hub id {source!r} that loads: {why} ({e})") from None
    tokenizer = getattr(processor, "tokenizer", processor)
    train_prompts = load_prompts(cfg, "train")
    rf = reward_function(cfg, train_prompts[0].ground_truth)  # a user reward: loaded and probed before any model
    val_encoded: list[EncodedPrompt] = []
    if t.eval_every or t.val_before_train:
        val = load_prompts(cfg, "val")[layout.dp_rank::layout.dp_size]  # each engine group answers its share
        val_encoded, _ = encode_prompts(val, processor, max_prompt_length=cfg.data.max_prompt_length,
                                        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    allowed = None
    words = list(r.allowed_tokens) or {"synthetic": list(COLORS), "arithmetic": list(DIGITS)}.get(cfg.data.dataset, [])
    if words:
        try:
            allowed = tuple(single_token_ids(tokenizer, words))
        except ValueError as e:
            raise ConfigError(f"rollout.allowed_tokens: {e}") from None
    return Inputs(processor, tokenizer, train_prompts, rf, val_encoded, allowed)


def check_inputs(cfg: Config) -> None:
    """``train_mm.py --check``: every input check of a run, in this process, writing nothing."""
    prepare_inputs(cfg, distributed.rollout_layout(0, 1))


def _build(cfg: Config, dtype: torch.dtype, seed: int, device: torch.device | None = None):
    rand = random_model_config(cfg.model.path)
    return build_model(cfg.model.path, random_init=rand is not None, config=rand, dtype=dtype,
                       attn_implementation=cfg.model.attn_implementation, seed=seed, device=device)


def build_policy(cfg: Config, info: distributed.DistInfo, packed: bool, *, reference: bool = False) -> Policy:
    """The FSDP2-sharded policy, built and loaded as ``model.load`` says; with ``reference=True`` the frozen
    reference for the KL term: the same initial weights, held in the compute dtype, no LoRA, no gradients."""
    t = cfg.trainer
    compute_dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    # the dtype of the trained (sharded) weights: fp32, bf16 for adamw_bf16; the reference keeps compute's
    master = compute_dtype if reference else master_dtype(cfg.optim.name)
    rand = random_model_config(cfg.model.path)
    sharded = loads_sharded(cfg.model.load, cfg.model.path)
    if sharded:  # parameters on the meta device until parallelize has sharded them; then each rank fills its own
        model = empty_model(rand or model_config(cfg.model.path), dtype=master,
                            attn_implementation=cfg.model.attn_implementation)
    else:  # the reference is built like the policy (fp32 init, same seed), then cast
        model = _build(cfg, master_dtype(cfg.optim.name), seed=t.seed, device=info.device).to(master)
    lo = cfg.model.lora
    if lo.rank and not reference:  # adapters only: base weights and (unless lora.vision) the vision tower frozen
        try:
            n_adapted = add_lora(model, rank=lo.rank, alpha=lo.alpha or 2 * lo.rank,
                                 target_modules=lo.target_modules, vision=lo.vision,
                                 modules_to_save=lo.modules_to_save)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if info.is_main:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"LoRA rank {lo.rank}: {n_adapted} linear layers, {trainable:,} trainable parameters")
    if reference:
        model.requires_grad_(False)
    if cfg.model.vision_attention == "grouped" or (cfg.model.vision_attention == "auto" and info.device.type == "cuda"):
        use_grouped_vision_attention(model)
    if cfg.model.compile:
        compile_blocks(model)
    if sharded:
        try:
            source = RandomSource(model, t.seed) if rand else CheckpointSource(model, cfg.model.path, seed=t.seed)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.path: {e}") from None
    policy = Policy(model, chunk_size=cfg.model.logprob_chunk_size, packed=packed)
    if not sharded:
        policy.to(info.device)
    distributed.parallelize(policy, param_dtype=None if reference or cfg.model.dtype != "bf16" else torch.bfloat16,
                            reduce_dtype=torch.float32,
                            activation_checkpointing=cfg.model.activation_checkpointing and not reference,
                            checkpoint_every=cfg.model.checkpoint_every,
                            cpu_offload=t.cpu_offload, freeze_vision=cfg.model.freeze_vision)
    if sharded:
        t_load = time.perf_counter()
        loaded = distributed.materialize(policy, source, torch.device("cpu") if t.cpu_offload else info.device)
        if info.is_main:
            print(f"sharded load{' (reference)' if reference else ''}: {'initialised' if rand else 'read'} "
                  f"{loaded['bytes_read'] / 2**30:.2f} GiB on this rank in {time.perf_counter() - t_load:.1f} s "
                  f"(largest tensor held: {loaded['largest_held'] / 2**30:.2f} GiB)")
    return policy


def _make_engine(cfg: Config, processor, device: torch.device, seed: int | None = None, progress: bool = False):
    """The colocated rollout engine of this rank (seeded alike on the ranks of one tensor-parallel engine). Its
    initial weights do not matter: sync_weights runs first."""
    r = cfg.rollout
    if r.backend == "vllm":
        from mm_gmpo.rollout.vllm_engine import VLLMEngine

        path = cfg.model.path
        rand = random_model_config(path)
        if rand is not None:  # a weightless folder (config + tokenizer): vLLM starts with dummy weights
            import tempfile

            path = str(write_model_folder(Path(tempfile.mkdtemp(prefix="mm_gmpo_model_")), rand))
        return VLLMEngine(path, dtype="bfloat16" if cfg.model.dtype == "bf16" else "float32",
                          gpu_memory_utilization=r.gpu_memory_utilization,
                          tensor_parallel_size=r.tensor_parallel_size, enforce_eager=r.enforce_eager,
                          enable_sleep_mode=r.enable_sleep_mode, sleep_level=r.sleep_level, load_format="dummy",
                          seed=cfg.trainer.seed if seed is None else seed,
                          max_model_len=cfg.data.max_prompt_length + r.max_tokens,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                          max_images_per_prompt=cfg.data.max_images, progress=progress)
    from mm_gmpo.rollout.hf import HFEngine

    dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    model = _build(cfg, dtype, seed=cfg.trainer.seed, device=device).to(device)  # weights are replaced by the first sync
    return HFEngine(model, getattr(processor, "tokenizer", processor), device=device,
                    batch_size=max(16, cfg.rollout.n * 4), progress=progress)


# ---------------------------------------------------------------- stages


def to_batch(prompts: list[EncodedPrompt], rollouts: list[Rollout], pad_id: int) -> tuple[PolicyBatch, torch.Tensor]:
    """The trainer's batch of ``rollouts`` (their prompt_index into ``prompts``) and the sampler's log-probs."""
    batch = collate([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts], pad_id=pad_id,
                    pixel_values=[prompts[r.prompt_index].pixel_values for r in rollouts],
                    image_grid_thw=[prompts[r.prompt_index].image_grid_thw for r in rollouts],
                    image_ids=[prompts[r.prompt_index].image_keys for r in rollouts])
    sampler_lp = torch.zeros(batch.response_mask.shape)
    for i, r in enumerate(rollouts):
        if r.logprobs:
            sampler_lp[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
    return batch, sampler_lp


def reward_stage(prompts: list[EncodedPrompt], rollouts: list[Rollout], cfg: Config,
                 rf: RewardFunction | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(rewards (N,), per-sample accuracy (N,), metrics)."""
    ps = [prompts[r.prompt_index].prompt for r in rollouts]
    scores, metrics = score_batch([r.text for r in rollouts], [p.ground_truth for p in ps], task=[p.task for p in ps],
                                  choices=[p.choices for p in ps], choice_values=[p.choice_values for p in ps],
                                  format_weight=cfg.algorithm.format_weight, workers=cfg.trainer.reward_workers,
                                  reward_function=rf, response_lengths=[len(r.response_ids) for r in rollouts])
    return (torch.tensor([s["overall"] for s in scores]), torch.tensor([float(s["accuracy"]) for s in scores]),
            metrics)


@dataclass
class Generated:
    """The rollout stage's hand-off: this rank's prompt groups to train on, their responses and (when online
    filtering had to score them to choose the groups) their rewards."""

    prompts: list[EncodedPrompt]
    rollouts: list[Rollout]  # n per prompt, prompt-major; prompt_index into prompts
    rewards: torch.Tensor | None  # (N,); None: not scored yet (PendingRewards scores them)
    metrics: dict[str, float]  # data/*, filter/*; reward/* (over every sampled response) once scored
    timings: dict[str, float]


class PendingRewards:
    """A step's scoring, started as soon as its rollouts exist. With reward worker processes
    (trainer.reward_workers > 0) a background thread feeds them and waits, so the old-log-prob pass runs
    meanwhile; in-process scoring runs at once (its per-item deadline is a SIGALRM, which only the main thread
    may set). ``result()`` gives (rewards, metrics, busy_s, wait_s): busy_s the scoring's own wall time, wait_s
    how long the caller was held up by it."""

    def __init__(self, prompts: list[EncodedPrompt], rollouts: list[Rollout], cfg: Config,
                 rf: RewardFunction | None):
        def job() -> tuple[torch.Tensor, dict, float]:
            t0 = time.perf_counter()
            rewards, _, metrics = reward_stage(prompts, rollouts, cfg, rf)
            return rewards, metrics, time.perf_counter() - t0

        self._executor = None
        if cfg.trainer.reward_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix="mm_gmpo-rewards")
            self._future = self._executor.submit(job)
        else:  # the caller waited for all of it
            self._done = job()

    @classmethod
    def scored(cls, rewards: torch.Tensor, metrics: dict, busy_s: float) -> PendingRewards:
        """Rewards already computed (online filtering scores while it chooses groups)."""
        out = cls.__new__(cls)
        out._executor, out._done = None, (rewards, metrics, busy_s)
        return out

    def result(self) -> tuple[torch.Tensor, dict, float, float]:
        if self._executor is None:
            rewards, metrics, busy = self._done
            return rewards, metrics, busy, busy
        t0 = time.perf_counter()
        try:
            rewards, metrics, busy = self._future.result()
        finally:
            self._executor.shutdown(wait=True)
        return rewards, metrics, busy, time.perf_counter() - t0


COUNTED = ("reward/errors", "reward/killed_for_time")  # summed over rounds and ranks; other reward/* averaged


def generate(engine, sampler: PromptSampler, train_prompts: list[Prompt], processor, sampling: SamplingParams,
             cfg: Config, rf: RewardFunction | None, step: int, info: distributed.DistInfo,
             layout: distributed.RolloutLayout | None = None) -> Generated:
    """Prompts -> rollout -> rewards for one step. With ``algorithm.online_filtering`` groups whose mean accuracy
    (or reward) is outside [filter_low, filter_high] are dropped and further rounds of prompts are rolled out
    until the global batch holds rollout_batch_size groups or max_filter_rounds is reached; each rank then keeps
    at most its share (and at least one group, so that every rank takes part in the update).

    ``layout``: the ranks of one tensor-parallel engine submit their group's prompts together, with the group's
    seed, and each keeps its own slice of the outputs (default: every rank is its own engine)."""
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    layout = layout or distributed.rollout_layout(info.rank, info.world_size)
    per_rank = t.rollout_batch_size // info.world_size
    timings = {"timing/prompts_s": 0.0, "timing/rollout_s": 0.0, "timing/reward_s": 0.0}
    kept: list[tuple[EncodedPrompt, list[Rollout], torch.Tensor]] = []
    sums: dict[str, float] = {}
    n_sampled, rounds, dropped, last = 0, 0, 0, None
    data_metrics: dict[str, float] = {}
    while True:
        rounds += 1
        # 1. prompts: the same global batch on every rank; this engine group's contiguous slice, encoded rank slice
        # by rank slice (what each drops as too long is the same on every rank of the group)
        idx = sampler.next(t.rollout_batch_size)[layout.group_slice(per_rank)]
        t0 = time.perf_counter()
        parts = [encode_prompts([train_prompts[i] for i in idx[j * per_rank:(j + 1) * per_rank]], processor,
                                max_prompt_length=cfg.data.max_prompt_length, min_pixels=cfg.data.min_pixels,
                                max_pixels=cfg.data.max_pixels) for j in range(layout.tp)]
        encoded, data_metrics = parts[layout.tp_rank]
        offset = sum(len(p) for p, _ in parts[:layout.tp_rank])
        timings["timing/prompts_s"] += time.perf_counter() - t0
        # 2. rollout (the group's prompts, the group's seed), then this rank's part of the outputs
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed * 100_003 + step * 101 + layout.dp_rank + 7_919 * (rounds - 1))
            group_rollouts = engine.generate([e for p, _ in parts for e in p], sampling)
        rollouts = [replace(x, prompt_index=x.prompt_index - offset) for x in group_rollouts
                    if offset <= x.prompt_index < offset + len(encoded)]
        timings["timing/rollout_s"] += time.perf_counter() - t0
        if not a.online_filtering:  # scored later, beside the old-log-prob pass (PendingRewards)
            kept = [(encoded[g], rollouts[g * r.n:(g + 1) * r.n], None) for g in range(len(encoded))]
            break
        # 3. rewards: online filtering needs them now, to choose the groups
        t0 = time.perf_counter()
        rewards, accuracy, metrics = reward_stage(encoded, rollouts, cfg, rf)
        timings["timing/reward_s"] += time.perf_counter() - t0
        for k, v in metrics.items():
            if k.startswith("reward/"):
                sums[k] = sums.get(k, 0.0) + (v if k in COUNTED else v * len(rollouts))
        n_sampled += len(rollouts)
        keep = groups_in_band(accuracy if a.filter_key == "accuracy" else rewards, r.n, a.filter_low, a.filter_high)
        groups = [(encoded[g], rollouts[g * r.n:(g + 1) * r.n], rewards[g * r.n:(g + 1) * r.n])
                  for g in range(len(encoded))]
        last = groups
        kept += [grp for grp, k in zip(groups, keep.tolist(), strict=True) if k]
        dropped += int((~keep).sum())
        total = distributed.all_reduce_sum([float(len(kept))], info.device)[0]
        if total >= t.rollout_batch_size or rounds >= a.max_filter_rounds:
            break
    fallback = 0
    if not kept and last:  # nothing in the band on this rank: train on one group of the last round (mostly A = 0)
        kept, fallback = last[:1], 1
    # a rank left with no prompt at all (every one longer than data.max_prompt_length) stops every rank alike
    if distributed.all_reduce_max(0.0 if kept else 1.0, info.device):
        raise DataError(f"step {step}: every prompt of some rank's share is longer than data.max_prompt_length="
                        f"{cfg.data.max_prompt_length} tokens (images included), so that rank has nothing to train "
                        "on; raise data.max_prompt_length or lower data.max_pixels")
    kept = kept[:per_rank]
    prompts = [enc for enc, _, _ in kept]
    out_rollouts = [replace(x, prompt_index=i) for i, (_, rs, _) in enumerate(kept) for x in rs]
    metrics = {k: (v if k in COUNTED else v / max(n_sampled, 1)) for k, v in sums.items()}
    metrics |= data_metrics
    if a.online_filtering:
        kept_n, dropped_n, fallback_n = distributed.all_reduce_sum([float(len(kept)), float(dropped),
                                                                    float(fallback)], info.device)
        metrics |= {"filter/trained_groups": kept_n, "filter/dropped_groups": dropped_n,
                    "filter/rounds": float(rounds), "filter/fallback_groups": fallback_n}
    rewards = torch.cat([rw for _, _, rw in kept]) if a.online_filtering else None
    return Generated(prompts, out_rollouts, rewards, metrics, timings)


BALANCE_TOLERANCE = 0.02  # moving groups costs an exchange: only when the busiest rank is this much above the mean


@dataclass
class Balanced:
    """The rank-balancing stage's hand-off: this rank's groups after the move, and the step's first pass of
    mini-batches over them (None: nothing moved, the usual schedule applies)."""

    gen: Generated
    first_pass: list[list[int]] | None
    metrics: dict[str, float]


def balance_stage(gen: Generated, group_size: int, n_mini: int, step: int, info: distributed.DistInfo,
                  enabled: bool = True) -> Balanced:
    """Even out the ranks' tokens (prompt + response) in every mini-batch of the step's first pass by moving
    prompt groups between ranks within their mini-batch (``balance.assign_groups``): each global mini-batch keeps
    its groups and each rank its number of groups, so the update's maths is unchanged and only the slowest rank's
    wait shrinks. ``perf/rank_token_imbalance`` is the pace the ranks run at, the sum over mini-batches of the
    busiest rank's tokens over the sum of the mean rank's (1 = balanced); ``..._unbalanced`` the same without
    moving anything."""
    n = group_size
    tokens = [float(sum(len(x.prompt_ids) + len(x.response_ids) for x in gen.rollouts[q * n:(q + 1) * n]))
              for q in range(len(gen.prompts))]
    per_rank = distributed.all_gather_objects(tokens)
    owner, minibatch, flat = [], [], []
    for r, toks in enumerate(per_rank):
        parts = group_minibatches(len(toks) * n, n, n_mini, seed=step)  # the update schedule's first pass
        mb = {}
        for k, part in enumerate(parts):
            for i in part:
                mb.setdefault(i // n, set()).add(k)
        if any(len(v) != 1 for v in mb.values()):  # samples shuffled one by one (fewer groups than mini-batches)
            return Balanced(gen, None, {})
        owner += [r] * len(toks)
        minibatch += [mb[q].pop() for q in range(len(toks))]
        flat += toks

    before = pace(flat, owner, minibatch, info.world_size)
    new_owner = assign_groups(flat, owner, minibatch, info.world_size) if enabled else owner
    after = pace(flat, new_owner, minibatch, info.world_size)
    if before <= 1 + BALANCE_TOLERANCE or after >= before:
        new_owner, after = owner, before
    metrics = {"perf/rank_token_imbalance": after, "perf/rank_token_imbalance_unbalanced": before}
    if new_owner == owner:
        return Balanced(gen, None, metrics | {"perf/balance_moved_groups": 0.0})

    me, start = info.rank, sum(len(t) for t in per_rank[:info.rank])

    def group(q: int) -> tuple:
        enc = gen.prompts[q]  # the pictures' pixels go along; the PIL images are the engine's, not needed now
        light = replace(enc, images=[], prompt=replace(enc.prompt, images=[]))
        rewards = None if gen.rewards is None else gen.rewards[q * n:(q + 1) * n]
        return light, gen.rollouts[q * n:(q + 1) * n], rewards

    outgoing = {g: group(g - start) for g in range(start, start + len(tokens)) if new_owner[g] != me}
    arriving = distributed.gather_dicts(outgoing)
    mine = sorted((g for g in range(len(flat)) if new_owner[g] == me), key=lambda g: (minibatch[g], g))
    groups = [group(g - start) if owner[g] == me else arriving[g] for g in mine]
    prompts = [enc for enc, _, _ in groups]
    rollouts = [replace(x, prompt_index=p) for p, (_, rs, _) in enumerate(groups) for x in rs]
    rewards = None if gen.rewards is None else torch.cat([rw for _, _, rw in groups])
    first_pass = [[p * n + s for p, g in enumerate(mine) if minibatch[g] == k for s in range(n)]
                  for k in sorted(set(minibatch))]
    moved = float(sum(a != b for a, b in zip(owner, new_owner, strict=True)))
    return Balanced(replace(gen, prompts=prompts, rollouts=rollouts, rewards=rewards), first_pass,
                    metrics | {"perf/balance_moved_groups": moved})


def eval_stage(engine, prompts: list[EncodedPrompt], cfg: Config, sampling: SamplingParams, device,
               rf: RewardFunction | None, seed: int,
               layout: distributed.RolloutLayout | None = None) -> tuple[dict, list]:
    """This engine group's share of the validation prompts, ``rollout.val_n`` answers each at
    ``rollout.val_temperature`` (greedy by default); each rank scores its own part (every ``tp``-th prompt);
    global means, mean@k / pass@k when val_n > 1, and a few sample records."""
    k = sampling.n
    if prompts:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            rollouts = engine.generate(prompts, sampling)
        if layout is not None and layout.tp > 1:  # this rank's part: every tp-th prompt of the group's share
            prompts = prompts[layout.tp_rank::layout.tp]
            rollouts = [replace(x, prompt_index=x.prompt_index // layout.tp) for x in rollouts
                        if x.prompt_index % layout.tp == layout.tp_rank]
    if prompts:
        rewards, accuracy, _ = reward_stage(prompts, rollouts, cfg, rf)
        passed = accuracy.view(-1, k).max(-1).values.gt(0).float().sum().item()
        sums = [float(rewards.sum()), float(accuracy.sum()),
                float(sum(len(x.response_ids) for x in rollouts)), float(len(rollouts)), passed,
                float(len(prompts))]
    else:
        rollouts, rewards, sums = [], torch.zeros(0), [0.0] * 6
    total_r, total_acc, total_len, n, n_pass, n_prompts = distributed.all_reduce_sum(sums, device)
    metrics = {"eval/reward_mean": total_r / max(n, 1), "eval/accuracy": total_acc / max(n, 1),
               "eval/response_len_mean": total_len / max(n, 1), "eval/prompts": n_prompts}
    if k > 1:
        metrics |= {f"eval/mean@{k}": total_acc / max(n, 1), f"eval/pass@{k}": n_pass / max(n_prompts, 1)}
    samples = [{"id": prompts[x.prompt_index].prompt.id, "images": len(prompts[x.prompt_index].images),
                "ground_truth": prompts[x.prompt_index].prompt.ground_truth, "response": x.text,
                "reward": float(rewards[i])} for i, x in enumerate(rollouts[:cfg.logging.sample_generations])]
    return metrics, samples


def train_samples(prompts: list[EncodedPrompt], rollouts: list[Rollout], rewards: torch.Tensor,
                  advantages: torch.Tensor, k: int) -> list[dict]:
    """The first ``k`` rollouts of this rank's batch as samples.jsonl records: prompt text, response, reward,
    advantage."""
    return [{"id": prompts[x.prompt_index].prompt.id, "images": prompts[x.prompt_index].n_images,
             "prompt": prompts[x.prompt_index].text, "response": x.text, "reward": float(rewards[i]),
             "advantage": float(advantages[i])} for i, x in enumerate(rollouts[:k])]


def gpu_used_gib(device: torch.device) -> float:
    """Memory in use on this rank's GPU, whoever holds it (torch's allocator and vLLM's pool alike); 0 on a CPU."""
    if device.type != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**30


def memory_metrics(device: torch.device, rollout_used_gib: float = 0.0) -> dict[str, float]:
    """Peak GPU memory allocated and reserved by torch since start, the GPU's use at the end of the rollout (vLLM
    awake beside the trainer's resident state: the binding phase on one GPU), each the largest over ranks, and
    the largest host RSS of any rank."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB
    out = {"perf/host_rss_gib": distributed.all_reduce_max(rss, device)}
    if device.type == "cuda":
        for key, value in (("perf/max_memory_allocated_gib", torch.cuda.max_memory_allocated(device) / 2**30),
                           ("perf/max_memory_reserved_gib", torch.cuda.max_memory_reserved(device) / 2**30),
                           ("perf/rollout_gpu_used_gib", rollout_used_gib)):
            out[key] = distributed.all_reduce_max(value, device)
    return out


def mismatch_metrics(sampler_lp: torch.Tensor, trainer_lp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """|log p_sampler - log p_trainer| over response tokens: the train/inference mismatch."""
    m = mask.bool()
    if not m.any() or not (sampler_lp[m] != 0).any():
        return {}
    d = (sampler_lp - trainer_lp)[m].abs()
    return {"rollout/logprob_diff_mean": d.mean().item(), "rollout/logprob_diff_max": d.max().item()}


# ---------------------------------------------------------------- the loop


def lock_run_folder(out: Path):
    """One trainer per run folder: an exclusive ``flock`` on ``<out>/.lock``, which the kernel releases when the
    process dies (no stale locks after a crash or a kill). Returns the open file (keep it open), or raises
    ConfigError naming the holder's host and pid."""
    import fcntl
    import socket

    f = open(out / ".lock", "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"trainer.output_dir: {out} is in use by a running trainer ({holder}); wait for it or stop "
                          "it, or choose another trainer.output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f


def check_shared_folder(out: Path, info: distributed.DistInfo) -> None:
    """Every rank must see the files rank 0 writes into ``out`` (checkpoints are written into folders rank 0
    creates, and resuming reads them on every rank): on several nodes ``trainer.output_dir`` must be on a shared
    filesystem. Raises ConfigError naming the ranks (and hosts) that cannot see it."""
    blind = distributed.ranks_not_seeing(out)
    if blind:
        ranks = ", ".join(f"rank {k} on {v}" for k, v in sorted(blind.items())[:4])
        raise ConfigError(f"trainer.output_dir: {out.resolve()} is not shared by every rank: {ranks} cannot see "
                          "the file rank 0 wrote there. On several nodes put output_dir on a filesystem every "
                          "node mounts at the same path (NFS, Lustre, ...)")


def train(cfg: Config) -> dict[str, float]:
    info = distributed.init_distributed(cpu_collectives=cfg.trainer.cpu_offload)
    validate(cfg, world_size=info.world_size,
             local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    layout = distributed.rollout_layout(info.rank, info.world_size,
                                        r.tensor_parallel_size if r.backend == "vllm" else 1)
    # data (read only: the run folder is made once the inputs are known to be good)
    inputs = prepare_inputs(cfg, layout)
    processor, tokenizer, train_prompts, rf = inputs.processor, inputs.tokenizer, inputs.train_prompts, inputs.rf
    val_encoded, allowed = inputs.val_encoded, inputs.allowed
    sampler = PromptSampler(len(train_prompts), seed=t.seed)
    total_steps = t.total_steps or max(1, t.epochs * len(train_prompts) // t.rollout_batch_size)

    # the run folder: one trainer at a time, visible to every rank
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    out = Path(t.output_dir)
    lock, busy = None, None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = lock_run_folder(out)
        except ConfigError as e:
            busy = str(e)
    busy = distributed.broadcast_object(busy)  # every rank stops, none waits in a collective
    if busy:
        raise ConfigError(busy)
    if info.world_size > 1:
        check_shared_folder(out, info)
    if info.is_main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
    log = MetricsLogger(out, enabled=info.is_main, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                        wandb_project=cfg.logging.wandb_project, run_name=cfg.logging.run_name, config=to_dict(cfg))

    # policy (FSDP2), reference (KL), optimizer, engine
    attn = resolve_attention(cfg.model.attn_implementation)
    packed = use_packing(cfg.model.layout, attn)
    if info.is_main:
        print(f"attention: {attn}; micro-batches: {'packed (padding-free)' if packed else 'padded'}")
    policy = build_policy(cfg, info, packed)
    optimizer = build_optimizer(policy, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=tuple(cfg.optim.betas), name=cfg.optim.name)
    n_updates = total_steps * t.ppo_epochs * (t.rollout_batch_size // t.mini_batch_size)
    scheduler = build_scheduler(optimizer, schedule=cfg.optim.lr_schedule, warmup_steps=cfg.optim.warmup_steps,
                                total_steps=n_updates, min_lr_ratio=cfg.optim.min_lr_ratio)
    loss_fn = get_policy_loss(a.objective)
    kl_on = a.kl_coef > 0
    loss_kwargs = {"clip_low": a.clip_low, "clip_high": a.clip_high, "entropy_coef": a.entropy_coef,
                   "kl_coef": 0.0 if a.kl_in_reward else a.kl_coef, "kl_penalty": a.kl_penalty}
    if a.objective == "grpo":
        loss_kwargs |= {"loss_agg": a.loss_agg, "clip_ratio_c": a.clip_ratio_c}
    normalize_by = "tokens" if a.objective == "grpo" and a.loss_agg == "token_mean" else "sequences"
    # the reference for the KL term: the initial weights; with LoRA the base (adapters off), no second copy
    reference = build_policy(cfg, info, packed, reference=True) if kl_on and not cfg.model.lora.rank else None
    if kl_on and info.is_main:
        print("KL reference: " + ("the base model (LoRA adapters off), no second copy" if reference is None else
                                  "a frozen FSDP2 copy of the initial policy"))
    offload = {"params": t.offload_params, "optimizer_state": t.offload_optimizer}
    cpu = torch.device("cpu")
    if any(offload.values()):  # the engine is created (and sizes its KV cache) without the trainer's state
        distributed.move_train_state(policy, optimizer, cpu, **offload)
        if reference is not None and t.offload_params:
            distributed.move_train_state(reference, None, cpu, optimizer_state=False)
    engine = _make_engine(cfg, processor, info.device, seed=t.seed + layout.dp_rank, progress=info.is_main)
    pool_s = start_workers(t.reward_workers, rf)  # warm scoring processes now, not inside step 1
    if info.is_main and pool_s:
        print(f"reward workers: {t.reward_workers} started in {pool_s:.1f} s")

    # resume
    state = TrainerState()
    ckpt_dir = out / "checkpoints"
    if info.is_main:  # partial folders of a save that was killed or failed
        for stale in ckpt_dir.glob(".tmp_*"):
            shutil.rmtree(stale, ignore_errors=True)
    distributed.barrier()
    resume_from = None
    if t.resume == "auto":
        resume_from, skipped = resume_point(ckpt_dir)
        if skipped and info.is_main:
            print("resume: skipped damaged checkpoint(s): " + "; ".join(skipped))
    elif t.resume != "none":
        resume_from = Path(t.resume)
        problem = verify_checkpoint(resume_from)
        if problem:
            raise ConfigError(f"trainer.resume: {resume_from} cannot be resumed from: {problem}")
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer, scheduler)
        stored = state.extra.get("config")
        if stored is not None:
            maths, harmless = config_changes(stored, to_dict(cfg))
            if maths and not t.resume_allow_changes:
                raise ConfigError(f"resume from {resume_from}: these settings differ from the checkpoint's and change "
                                  f"the maths or the data order: {'; '.join(maths)}. Restore them, or set "
                                  "trainer.resume_allow_changes=true to go on with the new values")
            if info.is_main and (maths or harmless):
                print(f"resume: settings changed since the checkpoint: {'; '.join(maths + harmless)}")
            if maths:  # the new learning rate applies from here on (the restored schedule keeps its position)
                for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
                    factor = float(group["lr"]) / base if base else 1.0
                    group["initial_lr"] = cfg.optim.lr
                    if torch.is_tensor(group["lr"]):  # torchao keeps it as a tensor
                        group["lr"].fill_(cfg.optim.lr * factor)
                    else:
                        group["lr"] = cfg.optim.lr * factor
                scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
        sampler.load_state_dict(state.data_position)
        log.rewind(state.step)  # steps logged after that checkpoint are redone: log each once
        if info.is_main:
            print(f"resumed from {resume_from} at step {state.step}")
    sync_dtype = torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32
    sync_weights(policy, engine, dtype=sync_dtype)

    n_mini = t.rollout_batch_size // t.mini_batch_size
    sampling = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
                              allowed_token_ids=allowed)
    val_sampling = SamplingParams(n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p,
                                  max_tokens=r.max_tokens, allowed_token_ids=allowed)
    # every engine group evaluates, also one whose share is empty: the others wait for it in eval_stage's sums
    has_val = distributed.all_reduce_max(float(bool(val_encoded)), info.device) > 0
    if t.val_before_train and state.step == 0 and has_val:
        t0 = time.perf_counter()
        eval_metrics, samples = eval_stage(engine, val_encoded, cfg, val_sampling, info.device, rf, seed=t.seed,
                                           layout=layout)
        log.log(0, {**eval_metrics, "timing/eval_s": time.perf_counter() - t0})
        log.samples(0, samples)
        if info.is_main:
            print(f"before training: eval/accuracy {eval_metrics['eval/accuracy']:.3f}")
    state.extra["config"] = to_dict(cfg)  # saved with every checkpoint: a resume compares its settings with these
    watch = distributed.LauncherWatch()
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not info.is_main)
    last: dict[str, float] = {}
    first_step = state.step + 1  # its timings include one-off costs (first sleep, optimizer state, compilation)
    for step in range(state.step + 1, total_steps + 1):
        watch.check()  # torchrun's launcher gone: stop rather than train on into its run folder
        t_step = time.perf_counter()

        # 1-2. prompts, rollout (online filtering scores here too, and rolls out more rounds until the batch is
        # full of signal)
        gen = generate(engine, sampler, train_prompts, processor, sampling, cfg, rf, step, info, layout)
        timings = dict(gen.timings)
        n_mini_step = n_mini
        if a.online_filtering:  # every rank takes the same number of optimizer steps, each at least a group
            n_mini_step = min(n_mini, -int(distributed.all_reduce_max(-float(len(gen.prompts)), info.device)))
        # even out the ranks' tokens: prompt groups move between ranks within their mini-batch
        t0 = time.perf_counter()
        balanced = balance_stage(gen, r.n, n_mini_step, step, info, enabled=t.balance_ranks)
        gen = balanced.gen
        timings["timing/balance_s"] = time.perf_counter() - t0
        # scoring starts now and runs beside sleep and the old-log-prob pass; the advantages wait for it
        scoring = (PendingRewards(gen.prompts, gen.rollouts, cfg, rf) if gen.rewards is None else
                   PendingRewards.scored(gen.rewards, {}, timings["timing/reward_s"]))
        t0 = time.perf_counter()
        rollout_used = gpu_used_gib(info.device)  # the engine still awake beside the trainer's resident state
        engine.sleep()  # vLLM: give the GPU memory to the update
        timings["timing/rollout_s"] += time.perf_counter() - t0
        rollouts = gen.rollouts
        batch, sampler_lp = to_batch(gen.prompts, rollouts, tokenizer.pad_token_id)
        if info.device.type == "cuda":  # micro-batches cut from page-locked pixels are copied asynchronously
            batch = batch.pin_memory()
        pixel_in_before, pixel_saved_before = policy.pixel_bytes_in, policy.pixel_bytes_saved
        if any(offload.values()):  # trainer.offload_*: parameters and optimizer state back for the update
            t0 = time.perf_counter()
            distributed.move_train_state(policy, optimizer, info.device, **offload)
            timings["timing/reload_s"] = time.perf_counter() - t0

        # 4. old log-probs (the policy that sampled, as the trainer computes it), reference log-probs (KL)
        t0 = time.perf_counter()
        lp_kwargs = dict(max_tokens_per_micro_batch=t.max_tokens_per_micro_batch, temperature=r.temperature,
                         allowed_token_ids=allowed, device=info.device, group_size=r.n)
        old_lp = compute_logprobs(policy, batch, **lp_kwargs)
        timings["timing/old_logprob_s"] = time.perf_counter() - t0
        ref_lp = None
        if kl_on:
            t0 = time.perf_counter()
            if reference is None:  # LoRA: the base model is the policy with its adapters switched off
                with adapters_disabled(policy.model):
                    ref_lp = compute_logprobs(policy, batch, **lp_kwargs)
            else:
                if t.offload_params:
                    distributed.move_train_state(reference, None, info.device, optimizer_state=False)
                ref_lp = compute_logprobs(reference, batch, **lp_kwargs)
                if t.offload_params:
                    distributed.move_train_state(reference, None, cpu, optimizer_state=False)
            timings["timing/ref_logprob_s"] = time.perf_counter() - t0
        is_w, tis_metrics = None, {}
        if a.tis_cap > 0:  # correct for sampling from the engine's distribution, not the trainer's
            is_w, tis_metrics = truncated_is_weights(old_lp, sampler_lp, batch.response_mask, a.tis_cap)

        # 5. rewards (waited for only now), group advantages (of the rewards, or with kl_in_reward of the rewards
        # less the summed KL)
        scores, reward_metrics, timings["timing/reward_busy_s"], timings["timing/reward_s"] = scoring.result()
        t0 = time.perf_counter()
        rewards, kl_metrics = scores, {}
        if kl_on:
            kl_metrics["actor/kl_coef"] = a.kl_coef
            if a.kl_in_reward:
                rewards, shaped = kl_shaped_rewards(rewards, kl_penalty(old_lp, ref_lp, a.kl_penalty),
                                                    batch.response_mask, a.kl_coef)
                kl_metrics |= shaped
        advantages, adv_metrics = group_advantages(rewards, r.n, normalize_std=a.normalize_std, eps=a.adv_eps)
        if rewards is not scores:  # reward/* statistics stay those of the rewards, not of the shaped ones
            plain = group_advantages(scores, r.n, normalize_std=a.normalize_std, eps=a.adv_eps)[1]
            adv_metrics |= {k: v for k, v in plain.items() if k.startswith("reward/")}
        timings["timing/advantage_s"] = time.perf_counter() - t0

        # 6. mini-batch updates
        t0 = time.perf_counter()
        patches_before = policy.vision_patches
        data = UpdateBatch(batch, old_lp, advantages, ref_lp, is_w)
        schedule = update_schedule(batch.batch_size, r.n, n_mini_step, t.ppo_epochs, step)  # whole prompt groups
        if balanced.first_pass is not None:  # the same global mini-batches, their groups on other ranks
            schedule = balanced.first_pass + schedule[n_mini_step:]
        update_metrics: dict[str, float] = {}
        with profiled(info.device, enabled=step == t.profile_step) as prof:  # trainer.profile_step
            for part in schedule:
                update_metrics = policy_update(policy, optimizer, data.select(part), loss_fn,
                                               loss_kwargs=loss_kwargs, normalize_by=normalize_by,
                                               max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                                               max_grad_norm=cfg.optim.max_grad_norm, temperature=r.temperature,
                                               with_entropy=True, allowed_token_ids=allowed, device=info.device,
                                               group_size=r.n)
                scheduler.step()
        timings["timing/update_s"] = prof["wall_s"] if prof else time.perf_counter() - t0  # not the summary's time
        if prof:
            write_profile(prof, Path(t.output_dir) / f"profile_update_step{step}", info.is_main)

        # 7. weight sync (the engine wakes up first; it must forget everything computed with the old weights)
        if any(offload.values()):  # to the CPU before the engine takes its memory back; sync reads them there
            t0 = time.perf_counter()
            timings["perf/offloaded_gb"] = distributed.move_train_state(policy, optimizer, cpu, **offload) / 1e9
            timings["timing/offload_s"] = time.perf_counter() - t0
        sync_metrics = sync_weights(policy, engine, dtype=sync_dtype)  # wakes the engine: weights, then KV cache

        # 8. eval / log / checkpoint
        eval_metrics: dict[str, float] = {}
        if t.eval_every and (step % t.eval_every == 0 or step == total_steps):
            t0 = time.perf_counter()
            eval_metrics, samples = eval_stage(engine, val_encoded, cfg, val_sampling, info.device, rf,
                                               seed=t.seed * 100_003 + step, layout=layout)
            eval_metrics["timing/eval_s"] = time.perf_counter() - t0
            log.samples(step, samples)
        timings["timing/step_s"] = time.perf_counter() - t_step
        held = batch.pixel_bytes()[0]
        tokens, patches, held, moved, saved = distributed.all_reduce_sum(
            [float(batch.n_tokens()) * t.ppo_epochs, float(policy.vision_patches - patches_before), float(held),
             float(policy.pixel_bytes_in - pixel_in_before), float(policy.pixel_bytes_saved - pixel_saved_before)],
            info.device)
        perf = {"perf/update_tokens_per_s": tokens / max(timings["timing/update_s"], 1e-9),
                "perf/update_vision_patches": patches, **memory_metrics(info.device, rollout_used),
                # pixel data: the step's batch (each picture once), what its forwards were given (old log-probs and
                # updates), and what a copy per sample would have added to that
                "perf/pixel_mb_held": held / 1e6, "perf/pixel_mb_moved": moved / 1e6,
                "perf/pixel_mb_dedup_saved": saved / 1e6}
        peak = peak_bf16_flops(info.device)
        if peak:
            flops = training_flops(policy, tokens, patches)
            perf["perf/mfu"] = flops / timings["timing/update_s"] / (peak * info.world_size)
        resp_len = batch.response_mask.sum(-1)
        gm = gen.metrics | reward_metrics  # reward/* over every sampled response (all filtering rounds), data/*, ...
        reward_keys = distributed.union_keys([k for k in gm if k.startswith("reward/")
                                              and k not in COUNTED and k != "reward/overall"])
        reward_counts = dict(zip(COUNTED, distributed.all_reduce_sum([gm.get(k, 0.0) for k in COUNTED],
                                                                     info.device), strict=True))
        local = {
            **adv_metrics, **{k: gm.get(k, 0.0) for k in reward_keys},
            **({"reward/sampled_mean": gm["reward/overall"]} if a.online_filtering else {}),
            "rollout/response_len_mean": resp_len.mean().item(),
            "rollout/truncated_frac": sum(x.finish_reason == "length" for x in rollouts) / len(rollouts),
            **mismatch_metrics(sampler_lp, old_lp, batch.response_mask), **tis_metrics,
            **{k: v for k, v in gm.items() if k.startswith("data/")},
        }
        filter_metrics = {k: v for k, v in gm.items() if k.startswith("filter/")}  # already global
        metrics = {**distributed.all_reduce_mean_metrics(local, info.device), **reward_counts, **update_metrics,
                   **sync_metrics, **timings, **perf, **balanced.metrics, **eval_metrics, **kl_metrics, **filter_metrics,
                   "train/epoch": float(sampler.epoch), "timing/warmup_step": float(step == first_step)}
        log.log(step, metrics)
        if info.is_main and cfg.logging.train_samples:
            log.samples(step, train_samples(gen.prompts, rollouts, scores, advantages, cfg.logging.train_samples),
                        split="train")
        if info.is_main and eval_metrics:  # the plot follows the run, not only its end
            plot_training(out / "metrics.jsonl", out / "training.png")
        if info.is_main and cfg.logging.console_every and step % cfg.logging.console_every == 0:
            bar.write(step_summary(step, total_steps, metrics))
        last = metrics
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.3f}")
        state.step = step
        state.data_position = sampler.state_dict()
        # with offload the state stays on the CPU for the save: the engine is awake and holds the GPU memory
        if t.save_every >= 0 and ((t.save_every and step % t.save_every == 0) or step == total_steps):
            try:
                save_checkpoint(ckpt_dir, policy, optimizer, scheduler, state, keep_last=t.keep_last)
            except CheckpointError as e:
                if t.save_errors != "warn":
                    raise
                if info.is_main:
                    print(f"warning: {e}; training on (trainer.save_errors=warn)")
    bar.close()

    if t.export_hf:  # gathered a tensor at a time, from wherever the shards are (the CPU with offload)
        export_hf(policy, out / "hf_export", processor=processor, save_adapter=cfg.model.lora.save_adapter)
    if info.is_main:
        png = plot_training(out / "metrics.jsonl", out / "training.png")
        table = run_summary(read_metrics(out / "metrics.jsonl"))
        if table:
            (out / "summary.md").write_text(table)
            print(table)
        made = [p.name + ("/" if p.is_dir() else "") for p in sorted(out.iterdir()) if not p.name.startswith(".")]
        print(f"run folder: {out} ({', '.join(made)}){'' if png else ' (no training.png: nothing to plot)'}")
    log.close()
    if lock is not None:
        lock.close()
    return last
