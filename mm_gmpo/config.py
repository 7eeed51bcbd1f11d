"""Experiment configuration: nested dataclasses, one YAML per experiment, dotted overrides (``key.sub=value``).

Every field has a doc (``python -m mm_gmpo.config`` prints the reference). Unknown keys, wrong types and
inconsistent settings raise :class:`ConfigError` naming the key and what to change, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the key and the fix."""


def f(default: Any, doc: str) -> Any:
    """A config field with its documentation (immutable defaults; lists use field(default_factory=...))."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class LoraConfig:
    rank: int = f(0, "LoRA rank (peft); 0 = full fine-tuning. Only the adapters train and hold optimizer state")
    alpha: float = f(0.0, "LoRA alpha (scaling = alpha / rank); 0 = 2 x rank")
    target_modules: list = field(default_factory=list, metadata={
        "doc": "Linear layers of the language model's decoder layers to adapt (e.g. [q_proj, v_proj]); empty = the "
               "model family's default: q/k/v/o and the MLP's gate/up/down, or q/k/v/o for a mixture of experts "
               "(its experts are fused 3-D tensors, not linear layers: frozen under LoRA)"})
    vision: bool = f(False, "Also adapt the vision blocks (qkv, proj, MLP); false = vision tower frozen (EasyR1)")
    modules_to_save: list = field(default_factory=list, metadata={
        "doc": "Modules trained in full beside the adapters (peft's modules_to_save; full-match module names, e.g. "
               "model.language_model.norm)"})
    save_adapter: bool = f(True, "With trainer.export_hf: also write the PEFT adapter folder (hf_export/adapter)")


@dataclass
class ModelConfig:
    path: str = f("tiny-random", "Policy: an HF folder or hub name of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense or "
                                 "MoE) model (e.g. Qwen/Qwen3-VL-8B-Instruct), or 'tiny-random' (random tiny Qwen2.5-VL: "
                                 "plumbing only; tiny-random-qwen2-vl, tiny-random-qwen3-vl, tiny-random-qwen3-vl-moe: "
                                 "the other families), or 'random:NAME' (random weights from a bundled config, "
                                 "qwen2_5_vl_7b / qwen3_vl_8b / qwen3_vl_30b_a3b / qwen2_vl_2b ..., or a config.json: "
                                 "speed only)")
    processor: str = f("", "Processor/tokenizer folder or hub name; empty = same as path (bundled for tiny-random and random:NAME)")
    dtype: str = f("bf16", "Parameter dtype for compute: bf16 or fp32 (use fp32 on CPU)")
    load: str = f("auto", "sharded: build on the meta device, shard, then each rank reads only its rows of every "
                          "safetensors tensor (random models: initialises them), so a rank never holds the whole "
                          "model; full: every rank builds the whole model first (any checkpoint format); auto: "
                          "sharded, except tiny-random")
    attn_implementation: str = f("auto", "auto (flash_attention_2 when flash-attn is installed and a GPU is present, "
                                         "else sdpa), sdpa, flash_attention_2, or eager")
    layout: str = f("auto", "How a micro-batch enters the trainer's model: packed (one padding-free row; each "
                            "sequence attends to itself: varlen kernels under flash_attention_2, one SDPA call per "
                            "sequence under sdpa), padded, or auto (packed unless attention is eager)")
    vision_attention: str = f("auto", "Vision tower attention without flash-attn: transformers (one SDPA call per "
                                      "window), grouped (one call per window length: fewer, larger kernels; mm_gmpo/attention.py), "
                                      "or auto (grouped on a GPU, transformers on CPU)")
    freeze_vision: bool = f(False, "Do not train the vision tower")
    activation_checkpointing: bool = f(True, "Recompute activations in backward (less memory, ~30% more compute)")
    checkpoint_every: int = f(1, "With activation_checkpointing: recompute only every k-th layer (vision blocks, then "
                                 "decoder layers, counted together; transformers' every_n_layers): 1 = all, 2 = "
                                 "half (less recompute, more activation memory: benchmarks/activation_memory.py)")
    compile: bool = f(False, "torch.compile each decoder layer's and vision block's MLP and RMSNorms (fused "
                             "elementwise kernels; the first step pays the compile; models.compile_blocks)")
    logprob_chunk_size: int = f(1024, "Response tokens per chunk of the LM head / log-softmax (memory bound)")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    dataset: str = f("synthetic", "files (your own data: data.train_files / val_files), geometry3k, math, "
                                  "synthetic (the built-in shapes task), flashes (the built-in video task: how many "
                                  "times does a square flash) or arithmetic (the built-in text-math task)")
    train_files: str = f("", "files: a .jsonl / .json / .parquet file, a folder of them, or a hub dataset id, "
                             "optionally with @split (hiyouga/geometry3k@train; the hub default is train)")
    val_files: str = f("", "files: validation data, same forms (e.g. hiyouga/geometry3k@test); needed when "
                           "trainer.eval_every > 0")
    prompt_key: str = f("problem", "files: the field holding the prompt text; <image> marks where each image goes "
                                   "(no placeholder: images first)")
    answer_key: str = f("answer", "files: the field holding the ground truth (text or a number)")
    image_key: str = f("images", "files: the field holding the images: one or a list of paths, bytes, "
                                 "{bytes|path} dicts; missing or [] = text-only")
    video_key: str = f("videos", "files: the field holding video clips (EasyR1's): one or a list of video files "
                                 "(MP4/MOV, MKV/WebM, AVI), folders of frame images or lists of frame paths; "
                                 "<video> marks where each goes")
    image_dir: str = f("", "files: base folder of relative image and video paths (empty: the data file's folder)")
    system_prompt: str = f("", "files: a system prompt (empty: the template's own, if it has one)")
    task: str = f("math", "files: built-in reward for the rows when algorithm.reward_function is empty: math "
                          "(math-verify equivalence), geometry3k (answer text), exact (first word)")
    max_images: int = f(4, "Prompts with more images are dropped (counted, warned); also vLLM's "
                           "limit_mm_per_prompt")
    train_source: str = f("", "geometry3k: Inter-GPS folder, parquet, or hub name (hiyouga/geometry3k); "
                              "math: a name in data/math, a jsonl/parquet path, or a hub name")
    train_split: str = f("train", "Split of train_source")
    val_source: str = f("", "Validation source (empty: the committed Geometry3K test split / MATH500)")
    val_split: str = f("test", "Split of val_source")
    template: str = f("think_boxed", "Prompt template in mm_gmpo/templates (think_boxed, qwen_math, plain: the text "
                                     "as it is)")
    show_choices: bool = f(False, "Geometry3K: list the choices in the prompt")
    levels: list = field(default_factory=list, metadata={"doc": "MATH levels to keep, e.g. [3, 4, 5]; empty = all"})
    max_prompt_length: int = f(2048, "Prompts longer than this (tokens, images included) are dropped and counted")
    min_pixels: int = f(262_144, "Images are resized to at least this many pixels (EasyR1: 512*512)")
    max_pixels: int = f(4_194_304, "... and at most this many (EasyR1: 2048*2048)")
    video_fps: float = f(2.0, "Clips: frames sampled per second of video (qwen-vl-utils' rule; EasyR1's video_fps)")
    video_max_frames: int = f(64, "Clips: at most this many frames (evenly spaced over the clip)")
    video_min_pixels: int = f(3136, "Clips: each frame resized to at least this many pixels ...")
    video_max_pixels: int = f(262_144, "... and at most this many (EasyR1's video recipes: 262144), and within the "
                                       "prompt's token budget (data.max_prompt_length) over all its frames")
    max_videos: int = f(1, "Prompts with more clips are dropped (counted, warned); also vLLM's limit_mm_per_prompt")
    on_bad_sample: str = f("error", "error (stop, naming file and field) or skip (drop, count, warn)")


@dataclass
class RolloutConfig:
    backend: str = f("hf", "hf (transformers generate) or vllm")
    n: int = f(5, "Samples per prompt (the GRPO/GMPO group size)")
    temperature: float = f(1.0, "Sampling temperature for training rollouts (> 0)")
    top_p: float = f(1.0, "Nucleus sampling")
    max_tokens: int = f(2048, "Maximum response tokens")
    gpu_memory_utilization: float = f(0.6, "vLLM: fraction of GPU memory for weights + KV cache")
    tensor_parallel_size: int = f(1, "vLLM: tensor-parallel ranks per engine (consecutive ranks on one node; must "
                                     "divide the GPUs per node)")
    enforce_eager: bool = f(False, "vLLM: no CUDA graphs / torch.compile (faster start, slower decode)")
    enable_sleep_mode: bool = f(True, "vLLM: sleep (KV cache freed, weights as sleep_level says) while the policy "
                                      "updates")
    sleep_level: int = f(2, "vLLM sleep level: 2 drops the weights (the next sync rewrites them all; no host copy), "
                            "1 keeps a pinned host copy per rank")
    val_temperature: float = f(0.0, "Validation sampling temperature; 0 = greedy (the paper's multimodal eval: 0.5 "
                                    "with val_n=16)")
    val_top_p: float = f(1.0, "Validation nucleus sampling")
    val_n: int = f(1, "Validation samples per prompt; > 1 logs eval/mean@k and eval/pass@k")
    allowed_tokens: list = field(default_factory=list, metadata={
        "doc": "Restricted sampling: only these words (each one token) may be generated, and the trainer scores the "
               "same restricted distribution (classification-style tasks; the built-in task uses its 4 colours)"})


@dataclass
class AlgorithmConfig:
    objective: str = f("gmpo", "gmpo (geometric mean), grpo (PPO-clip per token), gspo (sequence ratio), "
                               "gspo_token, cispo (clipped IS weight), sapo (soft gate); README 'Objectives'")
    clip_low: float | None = f(None, "Clip below; null = the objective's paper value. gmpo: log space, for A < 0 "
                                     "(0.4 = e^-0.4); grpo, gspo(_token), cispo: ratio epsilon, bound 1 - clip_low "
                                     "(0.2, 3e-4, 3e-4, 1.0 = none); sapo: none")
    clip_high: float | None = f(None, "Clip above; null = the objective's paper value. gmpo: log space, for A > 0 "
                                      "(0.4); grpo, gspo(_token), cispo: bound 1 + clip_high (0.2, 4e-4, 4e-4, 0.2)")
    loss_agg: str = f("auto", "grpo, gspo_token, cispo, sapo: token_mean or seq_mean_token_mean; auto = the "
                              "objective's paper (token_mean for grpo and cispo, seq_mean_token_mean for gspo_token "
                              "and sapo); gmpo and gspo are per sequence")
    sapo_tau_pos: float = f(1.0, "sapo: gate temperature for A > 0 (the SAPO paper's 1.0)")
    sapo_tau_neg: float = f(1.05, "sapo: gate temperature for A <= 0 (the SAPO paper's 1.05; larger fades faster)")
    normalize_std: bool = f(True, "Divide advantages by the group std (False = Dr. GRPO)")
    adv_eps: float = f(1e-6, "Added to the group std")
    clip_ratio_c: float | None = f(3.0, "grpo only: dual-clip, for A < 0 the token loss is at most -A x c (verl's "
                                       "default 3.0); null = off. GMPO's log-space clip already bounds its ratio")
    kl_coef: float = f(0.0, "KL to the reference policy (the initial policy; with LoRA the base with adapters "
                            "off): its weight. 0 = no reference is built (the GMPO paper uses none; EasyR1's "
                            "GRPO recipe 1e-2)")
    kl_penalty: str = f("low_var_kl", "Per-token KL estimator: k1 (logp - ref), k2 / mse ((logp - ref)^2 / 2), "
                                      "k3 / low_var_kl (exp(ref - logp) - (ref - logp) - 1, clamped as EasyR1), abs")
    kl_in_reward: bool = f(False, "false: KL is a loss term (GRPO/EasyR1); true: kl_coef x the response's summed "
                                  "KL is subtracted from its reward before the group advantages (PPO-style)")
    online_filtering: bool = f(False, "DAPO-style: keep the prompt groups with filter_low < mean filter_key < "
                                      "filter_high (drop all wrong, all right: no signal) and roll out more prompts "
                                      "until rollout_batch_size groups are found or max_filter_rounds is reached")
    filter_key: str = f("accuracy", "online_filtering: accuracy (the verifier's 0/1; EasyR1's example: overall) "
                                    "or overall (the reward, format included)")
    filter_low: float = f(0.01, "online_filtering: keep groups whose mean is > this (exclusive, as EasyR1)")
    filter_high: float = f(0.99, "online_filtering: ... and < this")
    max_filter_rounds: int = f(4, "online_filtering: rollout rounds per step at most; then train on what there is "
                                  "(EasyR1 and verl raise instead)")
    entropy_coef: float = f(0.0, "Entropy bonus")
    tis_cap: float = f(0.0, "Truncated importance sampling for the sampler/trainer mismatch: weight min(p_trainer / "
                            "p_sampler, cap) per token; 0 = off (2.0 is a common cap)")
    format_weight: float = f(0.1, "Reward = (1 - w) accuracy + w format (EasyR1: 0.1; paper's text setting: 0)")
    reward_function: str = f("", "Your reward: path/to/file.py:fn or package.module:fn (runs as code: name only "
                                 "files you trust); empty = the built-in verifier of the data's task")
    reward_kwargs: dict = field(default_factory=dict, metadata={"doc": "Keyword arguments passed to "
                                                                        "reward_function on every call"})
    reward_type: str = f("auto", "reward_function contract: batch (fn(reward_inputs: list[dict]) -> list[dict], "
                                 "EasyR1), item (fn(response, ground_truth, **kwargs) -> float | dict), or auto "
                                 "(batch when fn takes one positional argument)")
    reward_timeout_s: float = f(10.0, "reward_function: seconds per item before it scores 0 (a batch call gets "
                                      "this times its size)")


@dataclass
class OptimConfig:
    name: str = f("adamw", "adamw (fp32 weights and moments: 16 bytes per trained parameter with its gradient), "
                           "adamw_8bit (torchao AdamW8bit: 8-bit moments, ~10 bytes; fp32 weights keep updates at "
                           "lr 1e-6), or adamw_bf16 (optimi AdamW: bf16 weights, gradients and moments with a Kahan-"
                           "compensated update, 10 bytes, also for frozen weights; needs model.dtype=bf16)")
    lr: float = f(1e-6, "AdamW learning rate")
    weight_decay: float = f(0.01, "AdamW weight decay (not on biases and norms)")
    betas: list = field(default_factory=lambda: [0.9, 0.999], metadata={"doc": "AdamW betas"})
    max_grad_norm: float = f(1.0, "Global gradient-norm clip; 0 = off")
    lr_schedule: str = f("constant", "constant or cosine")
    warmup_steps: int = f(0, "Linear warmup steps")
    min_lr_ratio: float = f(0.0, "cosine: final lr / lr")


@dataclass
class TrainerConfig:
    rollout_batch_size: int = f(512, "Prompts per step (each sampled n times)")
    mini_batch_size: int = f(128, "Prompts per optimizer update, each with all n samples; rollout_batch_size / "
                                    "mini_batch_size updates per step")
    ppo_epochs: int = f(1, "Passes over each rollout batch")
    max_tokens_per_micro_batch: int = f(16_384, "Token budget of one forward/backward (dynamic micro-batching)")
    total_steps: int = f(0, "Steps to train; 0 = epochs x (train size / rollout_batch_size)")
    epochs: int = f(15, "Epochs over the train set when total_steps is 0")
    seed: int = f(1, "Seed for data order, sampling and initialisation")
    cpu_offload: bool = f(False, "FSDP2: keep sharded params and optimizer state on the CPU")
    offload_params: bool = f(False, "Move this rank's parameter shards to the CPU while the engine generates (its KV "
                                    "cache gets the memory) and back for the log-probs and update (EasyR1's "
                                    "offload_params); the weight sync reads them from the CPU. Costs two copies a step")
    offload_optimizer: bool = f(False, "The same for the optimizer state (EasyR1's offload_optimizer)")
    output_dir: str = f("runs/default", "Run folder: checkpoints, metrics.jsonl, TensorBoard, plots")
    save_every: int = f(20, "Checkpoint every N steps (and at the end); 0 = only at the end; "
                                 "-1 = never (benchmark runs)")
    keep_last: int = f(2, "Finished checkpoints to keep")
    eval_every: int = f(5, "Validate every N steps; 0 = never")
    val_before_train: bool = f(False, "Validate once before the first step (logged as step 0), as EasyR1 does")
    resume: str = f("auto", "auto (latest checkpoint in output_dir if any), none (a new run: refused where "
                            "output_dir holds an earlier run, unless trainer.overwrite), or a checkpoint path")
    overwrite: bool = f(False, "Start a new run in an output_dir that holds an earlier one: its files (checkpoints, "
                               "metrics, exports) are first moved to output_dir/replaced_<time>/")
    save_errors: str = f("error", "A checkpoint that cannot be written (full disk, permissions): error stops the "
                                  "run with the cause; warn says so and trains on (the previous checkpoint stays)")
    resume_allow_changes: bool = f(False, "Resume although settings that change the maths or the data order differ "
                                          "from the checkpoint's (the new values apply, the learning rate too)")
    export_hf: bool = f(True, "Write an HF-format copy (safetensors + processor) at the end")
    profile_step: int = f(0, "Profile the update of this step with the torch profiler (time per category: matmul, "
                             "attention, optimizer, FSDP, copies, other ops; busy vs wall) into "
                             "output_dir/profile_update_stepN.md and .json; that step's timings include the "
                             "profiler's overhead; 0 = never")
    reward_workers: int = f(2, "Reward scoring processes per rank (0 = in the training process: built-in "
                               "verifiers only; a reward_function needs >= 1)")
    balance_ranks: bool = f(True, "After the rollout, move prompt groups between ranks within their mini-batch so "
                                  "every rank has about as many tokens (the busiest rank sets the pace); the "
                                  "mini-batches keep their samples, so the maths is unchanged")


@dataclass
class LoggingConfig:
    tensorboard: bool = f(True, "Write TensorBoard event files")
    wandb: bool = f(False, "Log to Weights & Biases (when installed)")
    wandb_project: str = f("mm_gmpo", "W&B project")
    run_name: str = f("", "Run name (default: the output_dir name)")
    sample_generations: int = f(4, "Generations (with image ids) written per eval to samples.jsonl")
    train_samples: int = f(2, "Training rollouts (prompt, response, reward, advantage) written per step to "
                              "samples.jsonl")
    console_every: int = f(1, "Print a one-line summary (reward, accuracy, length, clip fractions, entropy, seconds "
                              "per stage) every this many steps; 0 = progress bar only")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "model.dtype": ("bf16", "fp32"),
    "model.attn_implementation": ("auto", "sdpa", "flash_attention_2", "eager"),
    "model.layout": ("auto", "packed", "padded"),
    "model.load": ("auto", "sharded", "full"),
    "trainer.save_errors": ("error", "warn"),
    "model.vision_attention": ("auto", "transformers", "grouped"),
    "data.dataset": ("files", "geometry3k", "math", "synthetic", "arithmetic", "flashes"),
    "data.task": ("math", "geometry3k", "exact"),
    "algorithm.reward_type": ("auto", "batch", "item"),
    "data.on_bad_sample": ("error", "skip"),
    "rollout.backend": ("hf", "vllm"),
    "algorithm.objective": ("gmpo", "grpo", "gspo", "gspo_token", "cispo", "sapo"),
    "algorithm.loss_agg": ("auto", "token_mean", "seq_mean_token_mean"),
    "algorithm.kl_penalty": ("k1", "k2", "k3", "low_var_kl", "abs", "mse"),
    "algorithm.filter_key": ("accuracy", "overall"),
    "optim.lr_schedule": ("constant", "cosine"),
    "optim.name": ("adamw", "adamw_8bit", "adamw_bf16"),
}


# ---------------------------------------------------------------- building from dicts


def _hint(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:  # float | None: YAML null (or "null"/"none" on the command line) turns it off
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif tp is list or typing.get_origin(tp) is list:
        if isinstance(value, list):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__}) from {origin}")


def _build(cls, raw: dict, prefix: str, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {raw!r} from {origin}")
    hints = typing.get_type_hints(cls)
    fields = {fl.name: fl for fl in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{dotted}: no such config key{_hint(key, fields)}; valid keys under "
                              f"'{prefix.rstrip('.') or 'top level'}': {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.", origin)
        else:
            kwargs[key] = _coerce(value, tp, dotted, origin)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is a value, not a section")
    node[parts[-1]] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _ConfigLoader(yaml.SafeLoader):
    """YAML for configs: plain data, no aliases (``*name``: a 600-byte file of nested aliases expands to gigabytes,
    a billion laughs), and dates stay text (a date in reward_kwargs would not survive the checkpoint's JSON)."""

    yaml_implicit_resolvers: typing.ClassVar[dict] = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
                               for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: the alias *{event.anchor} is not allowed in a "
                              "config (aliases can expand without bound); write the value out")
        return super().compose_node(parent, index)


MAX_CONFIG_BYTES = 1 << 20


def parse_yaml(text: str) -> Any:
    """A config file's (or an override's) YAML, read with :class:`_ConfigLoader`."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (optional) plus ``key.sub=value`` overrides (values parsed as YAML scalars)."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        if not p.is_file():
            raise ConfigError(f"config file {p} is a {'folder' if p.is_dir() else 'special file'}; name a .yaml file "
                              "(the configs/ folder has examples)")
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {p} has {p.stat().st_size >> 20} MiB; a config is a few KiB of YAML")
        try:
            tree = parse_yaml(p.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e)[:300]})") from None
        origin = str(p)
    cfg = _build(Config, tree, "", origin)  # report file errors as file errors
    over: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. optim.lr=1e-6)")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        except (yaml.YAMLError, RecursionError):
            value = raw
        _set_dotted(over, key.strip(), value)
    if over:
        cfg = _build(Config, _merge(to_dict(cfg), over), "", "the command line")
    _check_path_names(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- cross-field checks


def validate(cfg: Config, world_size: int = 1, local_world_size: int | None = None) -> None:
    """Raise ConfigError for settings that cannot work together, saying what to change."""
    _check_choices_and_ranges(cfg)
    _check_batches(cfg, world_size)
    _check_algorithm(cfg)
    _check_run_and_data(cfg)
    _check_model_and_engine(cfg, world_size, world_size if local_world_size is None else local_world_size)
    _check_paths(cfg)


PATH_KEYS = ("model.path", "model.processor", "data.train_files", "data.val_files", "data.image_dir",
             "data.train_source", "data.val_source", "trainer.output_dir", "trainer.resume",
             "algorithm.reward_function")


def _check_path_names(cfg: Config) -> None:
    """Paths every file system can hold: no name over 255 bytes (an OSError from the first ``exists()``
    otherwise), no NUL. Checked as the config loads: nothing may touch such a path first."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        long = next((part for part in Path(value).parts if len(part.encode()) > 255), None) if value else None
        if long is not None:
            raise ConfigError(f"{key}: the name {long[:40]}... has {len(long.encode())} bytes; file systems take "
                              "at most 255 per file or folder name: shorten it")
        if "\0" in value:
            raise ConfigError(f"{key}: holds a NUL character; not a path")


def _check_paths(cfg: Config) -> None:
    """Path names (as when loading), and an output_dir that is, or can become, a folder this user writes."""
    _check_path_names(cfg)
    out = Path(cfg.trainer.output_dir)
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"trainer.output_dir: {existing} is a file, not a folder; choose another "
                          "trainer.output_dir")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"trainer.output_dir: {existing} is not writable by this user; choose another "
                          "trainer.output_dir or fix its permissions")


def _check_choices_and_ranges(cfg: Config) -> None:
    """Every setting with a fixed set of values, and every number in its range."""
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(options)}{_hint(str(value), options)}")
    _check_finite(cfg)
    for key, value in (("trainer.rollout_batch_size", t.rollout_batch_size),
                       ("trainer.mini_batch_size", t.mini_batch_size), ("trainer.ppo_epochs", t.ppo_epochs),
                       ("trainer.epochs", t.epochs), ("trainer.keep_last", t.keep_last),
                       ("data.max_prompt_length", cfg.data.max_prompt_length), ("rollout.max_tokens", r.max_tokens),
                       ("model.logprob_chunk_size", cfg.model.logprob_chunk_size)):
        if value < 1:
            raise ConfigError(f"{key} = {value}: must be >= 1")
    for key, value in (("trainer.total_steps", t.total_steps), ("trainer.eval_every", t.eval_every),
                       ("trainer.reward_workers", t.reward_workers), ("trainer.profile_step", t.profile_step),
                       ("optim.warmup_steps", cfg.optim.warmup_steps)):
        if value < 0:
            raise ConfigError(f"{key} = {value}: must be >= 0")
    if r.n < 2:
        raise ConfigError(f"rollout.n = {r.n}: GMPO and GRPO normalise rewards within each prompt's group of n "
                          "samples; with fewer than 2 every advantage is 0 and nothing trains (EasyR1: 5)")
    for key, value in (("rollout.top_p", r.top_p), ("rollout.val_top_p", r.val_top_p),
                       ("rollout.gpu_memory_utilization", r.gpu_memory_utilization)):
        if not 0 < value <= 1:
            raise ConfigError(f"{key} = {value}: a fraction in (0, 1]")
    o = cfg.optim
    if o.lr <= 0:
        raise ConfigError(f"optim.lr = {o.lr}: must be > 0 (the paper: 1e-6)")
    if len(o.betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas = {o.betas}: two numbers in [0, 1), e.g. [0.9, 0.999]")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio = {o.min_lr_ratio}: the final lr as a fraction of optim.lr, in [0, 1]")
    for key, value in (("optim.max_grad_norm", o.max_grad_norm), ("optim.weight_decay", o.weight_decay),
                       ("algorithm.entropy_coef", a.entropy_coef), ("algorithm.adv_eps", a.adv_eps)):
        if value < 0:
            raise ConfigError(f"{key} = {value}: must be >= 0" + (" (0 = no clipping)" if "grad" in key else ""))


def _check_batches(cfg: Config, world_size: int) -> None:
    """Batch sizes that split into mini-batches and over the ranks."""
    t, r = cfg.trainer, cfg.rollout
    if r.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 for training: greedy samples of one prompt are identical, "
                          "so every group has advantage 0")
    if t.rollout_batch_size % t.mini_batch_size:
        raise ConfigError(f"trainer.rollout_batch_size ({t.rollout_batch_size}) must be a multiple of "
                          f"trainer.mini_batch_size ({t.mini_batch_size}); e.g. set trainer.mini_batch_size="
                          f"{_divisor_near(t.rollout_batch_size, t.mini_batch_size)}")
    if (t.mini_batch_size * r.n) % world_size:
        raise ConfigError(f"trainer.mini_batch_size x rollout.n = {t.mini_batch_size * r.n} samples per update cannot "
                          f"be split evenly over {world_size} ranks; make it a multiple of {world_size}")
    if t.rollout_batch_size % world_size:
        raise ConfigError(f"trainer.rollout_batch_size ({t.rollout_batch_size}) must be a multiple of the number "
                          f"of ranks ({world_size}) so every rank gets whole prompt groups")


def _check_objective(a: AlgorithmConfig) -> None:
    """The objective's own settings: the clips it reads, in its space; loss_agg where it has a choice."""
    clips = {"clip_low": a.clip_low, "clip_high": a.clip_high}
    if a.objective == "sapo":
        for key, value in clips.items():
            if value is not None:
                raise ConfigError(f"algorithm.{key} = {value}: sapo has no clip (its soft gate takes "
                                  "algorithm.sapo_tau_pos / sapo_tau_neg); remove the key or set it to null")
    for key, value in clips.items():
        if value is not None and not value > 0:
            raise ConfigError(f"algorithm.{key} = {value}: must be > 0 (or null for the objective's paper value)")
    if a.objective in ("grpo", "gspo", "gspo_token") and a.clip_low is not None and not a.clip_low < 1:
        raise ConfigError(f"algorithm.clip_low = {a.clip_low}: for {a.objective} it is a ratio epsilon in (0, 1), "
                          "e.g. 0.2 for grpo, 3e-4 for gspo (0.4 is GMPO's log-space clip)")
    if a.objective in ("gmpo", "gspo") and a.loss_agg != "auto":
        raise ConfigError(f"algorithm.loss_agg = {a.loss_agg}: {a.objective} averages per sequence and has no "
                          "other aggregation; remove the key or set it to auto")
    if a.sapo_tau_pos <= 0 or a.sapo_tau_neg <= 0:
        raise ConfigError(f"algorithm.sapo_tau_pos / sapo_tau_neg = {a.sapo_tau_pos} / {a.sapo_tau_neg}: must be "
                          "> 0 (the SAPO paper: 1.0 / 1.05)")


def _check_algorithm(cfg: Config) -> None:
    """The objective, rewards, KL, online filtering and validation sampling."""
    r, a = cfg.rollout, cfg.algorithm
    _check_objective(a)
    if not 0 <= a.format_weight <= 1:
        raise ConfigError(f"algorithm.format_weight = {a.format_weight}: must be within [0, 1]")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError(f"data.min_pixels ({cfg.data.min_pixels}) is larger than data.max_pixels "
                          f"({cfg.data.max_pixels})")
    if a.kl_coef < 0:
        raise ConfigError(f"algorithm.kl_coef = {a.kl_coef}: must be >= 0 (0 = no KL, e.g. 0.01 as EasyR1)")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        raise ConfigError(f"algorithm.clip_ratio_c = {a.clip_ratio_c}: must be > 1 (verl: 3.0), or null for no "
                          "dual-clip")
    if a.online_filtering and not 0 <= a.filter_low < a.filter_high <= 1:
        raise ConfigError(f"algorithm.filter_low ({a.filter_low}) and filter_high ({a.filter_high}) must satisfy "
                          "0 <= filter_low < filter_high <= 1: groups with filter_low < mean < filter_high are kept "
                          "(e.g. 0.01 and 0.99, or 0 and 1: drop the all-wrong and all-right groups)")
    if a.max_filter_rounds < 1:
        raise ConfigError(f"algorithm.max_filter_rounds = {a.max_filter_rounds}: must be >= 1")
    if a.kl_coef > 0 and cfg.model.lora.rank and cfg.model.lora.modules_to_save:
        raise ConfigError("algorithm.kl_coef > 0 with LoRA takes the base model (adapters off) as the reference, "
                          "but model.lora.modules_to_save trains modules in full, which have no frozen copy; "
                          "drop modules_to_save or set algorithm.kl_coef=0")
    if r.val_n < 1 or r.val_temperature < 0:
        raise ConfigError(f"rollout.val_n = {r.val_n}, val_temperature = {r.val_temperature}: need val_n >= 1 and "
                          "val_temperature >= 0 (0 = greedy)")
    if r.val_n > 1 and r.val_temperature == 0:
        raise ConfigError(f"rollout.val_n = {r.val_n} with val_temperature = 0: greedy samples are identical; set "
                          "rollout.val_temperature (the paper: 0.5) or val_n=1")


def _check_run_and_data(cfg: Config) -> None:
    """Saving, micro-batches, TIS, the data source and the reward function."""
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    if t.save_every < -1:
        raise ConfigError(f"trainer.save_every = {t.save_every}: use N > 0 (every N steps), 0 (only at the end) or "
                          "-1 (never)")
    if cfg.model.checkpoint_every < 1:
        raise ConfigError(f"model.checkpoint_every = {cfg.model.checkpoint_every}: use 1 (recompute every layer), "
                          "k > 1 (every k-th layer), or model.activation_checkpointing=false (none)")
    if t.max_tokens_per_micro_batch < 1:
        raise ConfigError("trainer.max_tokens_per_micro_batch must be >= 1")
    if a.tis_cap < 0 or 0 < a.tis_cap < 1:
        raise ConfigError(f"algorithm.tis_cap = {a.tis_cap}: 0 turns truncated importance sampling off; otherwise it "
                          "is the largest token weight and must be >= 1 (e.g. 2.0)")
    d = cfg.data
    if d.dataset == "files" and not d.train_files:
        raise ConfigError("data.dataset=files needs data.train_files: a .jsonl/.json/.parquet file, a folder of "
                          "them, or a hub id such as hiyouga/geometry3k@train")
    if d.dataset == "files" and t.eval_every and not d.val_files:
        raise ConfigError("data.dataset=files with trainer.eval_every > 0 needs data.val_files; set it, or "
                          "trainer.eval_every=0")
    if d.max_images < 0:
        raise ConfigError(f"data.max_images = {d.max_images}: must be >= 0 (0 = text-only prompts)")
    if d.max_videos < 0:
        raise ConfigError(f"data.max_videos = {d.max_videos}: must be >= 0")
    if not (0 < d.video_fps <= 60) or not math.isfinite(d.video_fps):
        raise ConfigError(f"data.video_fps = {d.video_fps}: frames per second of video, in (0, 60]")
    if d.video_max_frames < 2:
        raise ConfigError(f"data.video_max_frames = {d.video_max_frames}: at least 2 (Qwen-VL's temporal patch)")
    if not (1 <= d.video_min_pixels <= d.video_max_pixels):
        raise ConfigError(f"data.video_min_pixels = {d.video_min_pixels}, data.video_max_pixels = "
                          f"{d.video_max_pixels}: need 1 <= min <= max")
    if d.min_pixels < 1 or d.max_pixels < 1:
        raise ConfigError(f"data.min_pixels = {d.min_pixels}, data.max_pixels = {d.max_pixels}: pixel budgets must "
                          "be >= 1 (Qwen-VL's defaults: 3136 and 12845056; this trainer's: see python -m "
                          "mm_gmpo.config)")
    if not 0 <= t.seed < 2**63:
        raise ConfigError(f"trainer.seed = {t.seed}: must be within [0, 2**63) (torch and numpy take 64-bit seeds)")
    bad_keys = [k for k in a.reward_kwargs if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"algorithm.reward_kwargs: the key {bad_keys[0]!r} is a {type(bad_keys[0]).__name__}; keys "
                          "are argument names, text (quote it in the YAML)")
    if a.reward_function and ":" not in a.reward_function:
        raise ConfigError(f"algorithm.reward_function = {a.reward_function!r}: expected path/to/file.py:function "
                          "or package.module:function")
    if a.reward_function and t.reward_workers < 1:
        raise ConfigError(f"trainer.reward_workers = {t.reward_workers} would run algorithm.reward_function inside "
                          "the trainer, where a call stuck in C code (no signal reaches it) cannot be stopped and an "
                          "exit ends the run; set trainer.reward_workers=1 or more (its time limit is then enforced "
                          "by killing the worker)")
    if any(not isinstance(w, str) or not w for w in r.allowed_tokens):
        raise ConfigError(f"rollout.allowed_tokens: {[w for w in r.allowed_tokens if not isinstance(w, str) or not w]}"
                          " are not words; quote them (YAML reads yes/no/on/off as booleans and 1 as a number)")


def _check_model_and_engine(cfg: Config, world_size: int, local: int) -> None:
    """LoRA, offload, optimizer dtype, and the rollout engine's layout over the ranks."""
    t, r, a = cfg.trainer, cfg.rollout, cfg.algorithm
    lo = cfg.model.lora
    if lo.rank < 0 or lo.alpha < 0:
        raise ConfigError(f"model.lora.rank = {lo.rank}, alpha = {lo.alpha}: use rank > 0 (e.g. 64) for LoRA or 0 for "
                          "full fine-tuning, alpha >= 0 (0 = 2 x rank)")
    if a.reward_timeout_s <= 0:
        raise ConfigError(f"algorithm.reward_timeout_s = {a.reward_timeout_s}: must be > 0")
    if t.cpu_offload and (t.offload_params or t.offload_optimizer):
        raise ConfigError("trainer.cpu_offload already keeps parameters and optimizer state on the CPU for the "
                          "whole run; set trainer.offload_params=false and trainer.offload_optimizer=false")
    if cfg.optim.name == "adamw_bf16" and cfg.model.dtype != "bf16":
        raise ConfigError("optim.name=adamw_bf16 keeps the weights in bf16, so the model computes in bf16: set "
                          "model.dtype=bf16, or use optim.name=adamw_8bit to keep fp32 weights")
    if r.backend == "vllm" and world_size % r.tensor_parallel_size:
        raise ConfigError(f"rollout.tensor_parallel_size ({r.tensor_parallel_size}) must divide the number of "
                          f"ranks ({world_size})")
    if r.backend == "vllm" and local % r.tensor_parallel_size:
        raise ConfigError(f"rollout.tensor_parallel_size ({r.tensor_parallel_size}) must divide the GPUs per node "
                          f"({local}): a tensor-parallel engine spans consecutive ranks of one node")
    if r.backend == "vllm" and r.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.sleep_level={r.sleep_level}: use 2 (weights dropped while asleep) or 1 (kept in "
                          "host memory)")
    if r.backend != "vllm" and r.tensor_parallel_size != 1:
        raise ConfigError(f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs rollout.backend=vllm (the hf "
                          "engine runs one full copy per rank); set it to 1")


def _check_finite(cfg: Config) -> None:
    """No NaN or infinity in any float setting (they pass type checks and poison the run later)."""
    def walk(node, prefix: str) -> None:
        for fl in dataclasses.fields(node):
            value = getattr(node, fl.name)
            key = f"{prefix}{fl.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            elif isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} = {value}: must be a finite number")
            elif isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
                raise ConfigError(f"{key} = {value}: every entry must be a finite number")

    walk(cfg, "")


# settings a resumed run may change freely: where it logs, how often it evaluates or saves, how the engine runs,
# how the same maths is laid out (micro-batches, kernels, recomputation, offloading)
HARMLESS = ("logging.", "trainer.eval_every", "trainer.save_every", "trainer.keep_last", "trainer.output_dir",
            "trainer.resume", "trainer.resume_allow_changes", "trainer.overwrite", "trainer.save_errors", "trainer.profile_step", "trainer.reward_workers",
            "trainer.val_before_train", "trainer.export_hf", "rollout.val_", "rollout.gpu_memory_utilization",
            "rollout.enforce_eager", "rollout.enable_sleep_mode", "trainer.offload_", "model.compile",
            "model.attn_implementation", "model.vision_attention", "model.logprob_chunk_size", "model.layout",
            "model.activation_checkpointing", "model.checkpoint_every", "model.load", "trainer.cpu_offload",
            "trainer.max_tokens_per_micro_batch", "trainer.total_steps", "trainer.epochs", "trainer.balance_ranks")


def normal_form(value: Any) -> Any:
    """A setting as it compares after a trip through the checkpoint's JSON: NaN and infinities as text (NaN never
    equals itself), dates as ISO text, tuples as lists, keys as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): normal_form(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normal_form(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


# the config's keys of an objective's settings and the loss functions' argument names for them
OBJECTIVE_ARGS = {"clip_low": "clip_low", "clip_high": "clip_high", "loss_agg": "loss_agg",
                  "clip_ratio_c": "clip_ratio_c", "sapo_tau_pos": "tau_pos", "sapo_tau_neg": "tau_neg"}


def _effective(d: dict) -> dict:
    """The objective's settings as its loss function receives them: null clips and auto loss_agg resolved to the
    objective's defaults, settings it does not read dropped (a checkpoint written when clips had numeric defaults
    and loss_agg was token_mean resumes without a spurious change)."""
    alg = d.get("algorithm")
    if not isinstance(alg, dict) or alg.get("objective") not in CHOICES["algorithm.objective"]:
        return d
    from mm_gmpo.loss import objective_kwargs  # torch: only when a resume compares settings

    resolved = objective_kwargs(alg["objective"], {arg: alg.get(key) for key, arg in OBJECTIVE_ARGS.items()})
    kept = {k: v for k, v in alg.items() if k not in OBJECTIVE_ARGS}
    return {**d, "algorithm": kept | {key: resolved[arg] for key, arg in OBJECTIVE_ARGS.items() if arg in resolved}}


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changes that alter the maths or the data order, harmless changes) between two ``to_dict`` configs, each
    as 'key: old -> new'."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k != "reward_kwargs":
                out |= flat(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(_effective(normal_form(old))), flat(_effective(normal_form(new)))
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    harmless = [c for c in changed if c.startswith(HARMLESS)]
    return [c for c in changed if c not in harmless], harmless


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: abs(d - target))


def reference() -> str:
    """A markdown table of every key, its default and its doc."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for fl in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[fl.name]):
                walk(hints[fl.name], f"{prefix}{fl.name}.")
                continue
            default = fl.default if fl.default is not dataclasses.MISSING else fl.default_factory()
            rows.append(f"| `{prefix}{fl.name}` | `{default}` | {fl.metadata.get('doc', '')} |")

    walk(Config, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference())

