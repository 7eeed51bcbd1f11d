"""What a run trains with, built once from its config: the FSDP2 policy, the KL reference, the optimizer and its
schedule, the loss and its settings, and the colocated rollout engine. Each has one owner here: LoRA
(``build_policy``), the KL reference (``KLReference``), the update (``Components.optimizer_step``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mm_gmpo import distributed
from mm_gmpo.attention import use_grouped_vision_attention
from mm_gmpo.config import OBJECTIVE_ARGS, Config, ConfigError
from mm_gmpo.logprobs import compute_logprobs
from mm_gmpo.lora import adapters_disabled, add_lora
from mm_gmpo.loss import PolicyLossFn, get_policy_loss, objective_kwargs
from mm_gmpo.models import (
    CheckpointSource,
    RandomSource,
    build_model,
    compile_blocks,
    empty_model,
    loads_sharded,
    model_config,
    random_model_config,
    resolve_attention,
    torch_dtype,
)
from mm_gmpo.offload import Offloader
from mm_gmpo.optim import build_optimizer, build_scheduler, master_dtype
from mm_gmpo.policy import Policy, PolicyBatch, use_packing
from mm_gmpo.rollout.factory import make_engine
from mm_gmpo.rollout.layout import RolloutLayout
from mm_gmpo.update import UpdateBatch, policy_update


@dataclass
class LossSettings:
    """The objective and how its loss is normalised (see ``mm_gmpo.update``)."""

    fn: PolicyLossFn
    kwargs: dict = field(default_factory=dict)
    normalize_by: str = "sequences"  # GRPO token_mean: "tokens"


def loss_settings(cfg: Config) -> LossSettings:
    """The objective's function and keyword arguments: the configured clips, aggregation and SAPO temperatures
    where the objective takes them, its paper's defaults (the function's own) where the config says null/auto."""
    alg = cfg.algorithm
    kwargs = {"entropy_coef": alg.entropy_coef, "kl_coef": 0.0 if alg.kl_in_reward else alg.kl_coef,
              "kl_penalty": alg.kl_penalty}
    kwargs |= objective_kwargs(alg.objective, {arg: getattr(alg, key) for key, arg in OBJECTIVE_ARGS.items()})
    by_tokens = kwargs.get("loss_agg") == "token_mean"
    return LossSettings(get_policy_loss(alg.objective), kwargs, "tokens" if by_tokens else "sequences")


def _add_lora(cfg: Config, model: torch.nn.Module, info: distributed.DistInfo) -> None:
    """Adapters only: base weights and (unless lora.vision) the vision tower frozen."""
    lo = cfg.model.lora
    try:
        n_adapted = add_lora(model, rank=lo.rank, alpha=lo.alpha or 2 * lo.rank, target_modules=lo.target_modules,
                             vision=lo.vision, modules_to_save=lo.modules_to_save)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if info.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA rank {lo.rank}: {n_adapted} linear layers, {trainable:,} trainable parameters")


def build_policy(cfg: Config, info: distributed.DistInfo, packed: bool, *, reference: bool = False) -> Policy:
    """The FSDP2-sharded policy, built and loaded as ``model.load`` says; with ``reference=True`` the frozen
    reference for the KL term: the same initial weights, held in the compute dtype, no LoRA, no gradients."""
    m, t = cfg.model, cfg.trainer
    # the dtype of the trained (sharded) weights: fp32, bf16 for adamw_bf16; the reference keeps compute's
    master = torch_dtype(m.dtype) if reference else master_dtype(cfg.optim.name)
    rand = random_model_config(m.path)
    sharded = loads_sharded(m.load, m.path)
    if sharded:  # parameters on the meta device until parallelize has sharded them; then each rank fills its own
        model = empty_model(rand or model_config(m.path), dtype=master, attn_implementation=m.attn_implementation)
    else:  # the reference is built like the policy (fp32 init, same seed), then cast
        model = build_model(m.path, random_init=rand is not None, config=rand, dtype=master_dtype(cfg.optim.name),
                            attn_implementation=m.attn_implementation, seed=t.seed, device=info.device).to(master)
    if m.lora.rank and not reference:
        _add_lora(cfg, model, info)
    if reference:
        model.requires_grad_(False)
    if m.vision_attention == "grouped" or (m.vision_attention == "auto" and info.device.type == "cuda"):
        use_grouped_vision_attention(model)
    if m.compile:
        compile_blocks(model)
    if sharded:
        try:
            source = RandomSource(model, t.seed) if rand else CheckpointSource(model, m.path, seed=t.seed)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.path: {e}") from None
    policy = Policy(model, chunk_size=m.logprob_chunk_size, packed=packed)
    if not sharded:
        policy.to(info.device)
    distributed.parallelize(policy, param_dtype=None if reference or m.dtype != "bf16" else torch.bfloat16,
                            reduce_dtype=torch.float32,
                            activation_checkpointing=m.activation_checkpointing and not reference,
                            checkpoint_every=m.checkpoint_every, cpu_offload=t.cpu_offload,
                            freeze_vision=m.freeze_vision)
    if sharded:
        t_load = time.perf_counter()
        loaded = distributed.materialize(policy, source, torch.device("cpu") if t.cpu_offload else info.device)
        if info.is_main:
            print(f"sharded load{' (reference)' if reference else ''}: {'initialised' if rand else 'read'} "
                  f"{loaded['bytes_read'] / 2**30:.2f} GiB on this rank in {time.perf_counter() - t_load:.1f} s "
                  f"(largest tensor held: {loaded['largest_held'] / 2**30:.2f} GiB)")
    return policy


class KLReference:
    """Owner of the KL term's reference log-probs (``algorithm.kl_coef`` > 0): the initial weights, as a frozen
    FSDP2 copy, or with LoRA the base model (the policy with its adapters switched off), no second copy."""

    def __init__(self, cfg: Config, info: distributed.DistInfo, policy: Policy, packed: bool):
        self.policy = policy
        self.model = None if cfg.model.lora.rank else build_policy(cfg, info, packed, reference=True)
        if info.is_main:
            print("KL reference: " + ("the base model (LoRA adapters off), no second copy" if self.model is None
                                      else "a frozen FSDP2 copy of the initial policy"))

    def logprobs(self, batch: PolicyBatch, offloader: Offloader, **kwargs) -> torch.Tensor:
        if self.model is None:
            with adapters_disabled(self.policy.model):
                return compute_logprobs(self.policy, batch, **kwargs)
        with offloader.reference_on_device():
            return compute_logprobs(self.model, batch, **kwargs)


@dataclass
class Components:
    """The trained policy and what updates it; ``logprobs`` and ``optimizer_step`` carry the run's settings."""

    cfg: Config
    device: torch.device
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss: LossSettings
    kl: KLReference | None
    allowed: tuple[int, ...] | None
    sync_dtype: torch.dtype

    def _pass_kwargs(self) -> dict:
        t, r = self.cfg.trainer, self.cfg.rollout
        return dict(max_tokens_per_micro_batch=t.max_tokens_per_micro_batch, temperature=r.temperature,
                    allowed_token_ids=self.allowed, device=self.device, group_size=r.n)

    def logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """The old log-probs: the policy that sampled, as the trainer computes it."""
        return compute_logprobs(self.policy, batch, **self._pass_kwargs())

    def reference_logprobs(self, batch: PolicyBatch, offloader: Offloader) -> torch.Tensor:
        return self.kl.logprobs(batch, offloader, **self._pass_kwargs())

    def optimizer_step(self, data: UpdateBatch) -> dict[str, float]:
        """One GMPO/GRPO optimizer step over a mini-batch, and the schedule's step."""
        metrics = policy_update(self.policy, self.optimizer, data, self.loss.fn, loss_kwargs=self.loss.kwargs,
                                normalize_by=self.loss.normalize_by, max_grad_norm=self.cfg.optim.max_grad_norm,
                                with_entropy=True, **self._pass_kwargs())
        self.scheduler.step()
        return metrics


def build_components(cfg: Config, info: distributed.DistInfo, total_steps: int,
                     allowed: tuple[int, ...] | None) -> Components:
    attn = resolve_attention(cfg.model.attn_implementation)
    packed = use_packing(cfg.model.layout, attn)
    if info.is_main:
        print(f"attention: {attn}; micro-batches: {'packed (padding-free)' if packed else 'padded'}")
    policy = build_policy(cfg, info, packed)
    o, t = cfg.optim, cfg.trainer
    optimizer = build_optimizer(policy, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), name=o.name)
    n_updates = total_steps * t.ppo_epochs * (t.rollout_batch_size // t.mini_batch_size)
    scheduler = build_scheduler(optimizer, schedule=o.lr_schedule, warmup_steps=o.warmup_steps,
                                total_steps=n_updates, min_lr_ratio=o.min_lr_ratio)
    loss = loss_settings(cfg)
    kl = KLReference(cfg, info, policy, packed) if cfg.algorithm.kl_coef > 0 else None
    return Components(cfg, info.device, policy, optimizer, scheduler, loss, kl, allowed, torch_dtype(cfg.model.dtype))


def make_trainer_engine(cfg: Config, processor, info: distributed.DistInfo, layout: RolloutLayout,
                        clips: bool = False):
    """This rank's colocated rollout engine (the ranks of one tensor-parallel engine seeded alike). Its initial
    weights do not matter: the weight sync runs first. ``clips``: the data has video clips (else vLLM is told to
    expect none, and does not profile video at start-up)."""
    r, d = cfg.rollout, cfg.data
    vllm = {} if r.backend != "vllm" else dict(
        gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
        enforce_eager=r.enforce_eager, enable_sleep_mode=r.enable_sleep_mode, sleep_level=r.sleep_level,
        load_format="dummy", max_model_len=d.max_prompt_length + r.max_tokens, min_pixels=d.min_pixels,
        max_pixels=d.max_pixels, max_images_per_prompt=d.max_images,
        max_videos_per_prompt=d.max_videos if clips else 0)
    seed = cfg.trainer.seed + layout.dp_rank if r.backend == "vllm" else cfg.trainer.seed
    return make_engine(r.backend, cfg.model.path, processor=processor, dtype=torch_dtype(cfg.model.dtype),
                       device=info.device, seed=seed, batch_size=max(16, r.n * 4), progress=info.is_main,
                       attn_implementation=cfg.model.attn_implementation, **vllm)
