"""Rollouts with vLLM, colocated in the training process (one engine per rank, no Ray, no server).

* Images go in as ``multi_modal_data``; the prompt goes in as token ids with one ``<|image_pad|>`` per image,
  and vLLM's own processor expands it. The expanded ids vLLM reports must equal the trainer's
  (``EncodedPrompt.input_ids``): a mismatch would mean the trainer scores a different prompt than the sampler
  saw, so it is an error, not a warning.
* ``n`` samples per prompt, temperature / top-p / max tokens, stop at EOS, the image-pad token banned, and the
  sampler's log-prob of every sampled token after temperature (``logprobs_mode="processed_logprobs"``) kept for
  the train/inference mismatch metrics.
* No Python object per generated token: log-probs come back in vLLM's flat columns (``flat_logprobs``) instead
  of a dict and a ``Logprob`` per token, and vLLM does not detokenize as it goes (``detokenize=False``; no stop
  strings are used); each response is decoded once at the end. For 32 prompts x 8 x 512 tokens the per-token
  objects cost 0.83 s more host time than this on a 2-core development machine (``bench_output_objects.py``),
  in the in-process loop that also drives the GPU.
* ``update_weights`` streams (name, tensor) pairs into vLLM's layerwise reload (the model runner's
  ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``, made for RL weight updates: transformers
  names are accepted as they are, each layer is processed again after its weights arrive, one layer's buffers at
  a time). The same path runs on a GPU and on vLLM's CPU build; the model's bare ``load_weights`` skips that
  processing and fails on the CPU build. Then everything computed with the old weights is cleared: the prefix
  (KV) cache, the multimodal processor cache and the encoder (vision feature) cache. On an H100 with vLLM 0.25.1
  a reused image kept its old-weight vision features until the caches were cleared (``../shared/gpu/README.md``).
* Sampling follows torch's RNG: in this in-process engine vLLM draws the noise of every request without a seed
  of its own from torch's global generator of its device (``random_sample`` in vLLM's sampler), which the trainer
  seeds per step, alike on the ranks of a tensor-parallel engine. A ``sampling.seed`` seeds that generator for
  the call (and leaves it as it was). No request gets a seed of its own: vLLM would then sample those requests
  one by one through their own generators at every decoding step (its sampler's comment: "This can be slow").
* ``sleep()`` / ``wake_up()``: vLLM sleep mode so the update gets the GPU memory back between rollouts. Level 2
  (the default, ``rollout.sleep_level``) drops the weights and the KV cache: no pinned host copy of the weights
  per rank (15 GB for the 7B in bf16), which level 1 keeps although the next sync overwrites every weight. The
  sync wakes the weights alone, loads them, then the KV cache, so weights and KV cache are never both allocated
  beside the trainer's freed memory (TRL's order).
* On a CPU (vLLM's CPU build: tests, small runs) the settings such an engine needs are chosen for it and said
  once (``cpu_engine_settings``): no sleep mode (unsupported there), eager mode, and a KV cache sized in bytes.
* Several ranks: vLLM's ``external_launcher`` executor in every torchrun process, tensor parallelism inside
  groups of ``tensor_parallel_size`` consecutive ranks (on one node). No vLLM data-parallel group: with one,
  every generate step would all-reduce over all ranks, so a rank with nothing to generate (an empty validation
  share) or one that failed would hang the others; the trainer shares prompts out itself (the ranks of a TP
  group submit the same prompts with the same seed, ``mm_gmpo.rollout.layout.RolloutLayout``). vLLM's custom
  all-reduce is off for TP > 1 beside sleep mode (its buffers are not released by sleep; verl does the same).

vLLM is an optional dependency (``pip install -e '.[vllm]'``); importing this module does not import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mm_gmpo.data.processing import EncodedPrompt
from mm_gmpo.families import vllm_weights
from mm_gmpo.rollout.base import IMAGE_PAD_ID, VIDEO_PAD_ID, Rollout, SamplingParams

EOS_IDS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def collapse_image_pads(ids: list[int]) -> list[int]:
    """Prompt ids with each run of ``<|image_pad|>`` collapsed to one (what vLLM's processor expands itself)."""
    out: list[int] = []
    for t in ids:
        if t == IMAGE_PAD_ID and out and out[-1] == IMAGE_PAD_ID:
            continue
        out.append(t)
    return out


def engine_request(p: EncodedPrompt, metadata_as_kwarg: bool = False) -> dict:
    """The vLLM request for one encoded prompt (a ``TokensPrompt``-shaped dict). A prompt with clips goes as the
    chat template wrote it (``engine_ids``: one placeholder per picture and clip), its clips as the frames already
    sampled and sized (no resize, no resampling), each with its metadata: source indices and frame rate, which give
    Qwen3-VL's timestamps and Qwen2.5-VL's seconds per temporal patch. vLLM's parser keeps the metadata for Qwen3-VL
    only; for Qwen2-VL / Qwen2.5-VL (``metadata_as_kwarg``) it goes to the processor as a keyword. vLLM's expansion
    must give the trainer's ids (checked after each generate)."""
    if getattr(p, "videos", None):
        data: dict = {"video": [(c.frames.permute(0, 2, 3, 1).numpy(), c.metadata() | {"do_sample_frames": False})
                                for c in p.videos]}
        if p.images:
            data["image"] = list(p.images)
        kwargs: dict = {"do_resize": False, "do_sample_frames": False}
        if metadata_as_kwarg:
            kwargs["video_metadata"] = [c.metadata() for c in p.videos]
        return {"prompt_token_ids": list(p.engine_ids), "multi_modal_data": data, "mm_processor_kwargs": kwargs}
    if not p.images:
        return {"prompt_token_ids": list(p.input_ids)}
    return {"prompt_token_ids": collapse_image_pads(p.input_ids), "multi_modal_data": {"image": list(p.images)}}


def sampled_logprobs(logprobs, token_ids: list[int]) -> list[float] | None:
    """The sampled token's log-prob at every position, from vLLM's ``FlatLogprobs`` (the sampled token is each
    position's first entry) or from its list of ``{token_id: Logprob}`` dicts."""
    if logprobs is None:
        return None
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        ids, lps = logprobs.token_ids, logprobs.logprobs
        out = []
        for pos, (start, tok) in enumerate(zip(logprobs.start_indices, token_ids, strict=True)):
            if ids[start] != tok:
                raise RuntimeError(f"vLLM log-probs: position {pos} holds token {ids[start]}, sampled {tok}")
            out.append(float(lps[start]))
        return out
    return [float(step[t].logprob) for step, t in zip(logprobs, token_ids, strict=True)]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """With a seed: torch's generators (the CPU's and the current GPU's) seeded with it inside, restored after.
    Without: nothing changes (the caller's seeding governs)."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fast_output_kwargs(supported_fields: Iterable[str]) -> dict:
    """vLLM ``SamplingParams`` that avoid per-token Python objects, where this vLLM has them (see module doc)."""
    wanted = {"flat_logprobs": True, "detokenize": False}
    fields = set(supported_fields)
    return {k: v for k, v in wanted.items() if k in fields}


def vllm_sampling_kwargs(sampling: SamplingParams, eos_ids: Iterable[int] = EOS_IDS) -> dict:
    """Our SamplingParams as vLLM ``SamplingParams`` keyword arguments."""
    kw = {
        "n": sampling.n,
        "temperature": max(sampling.temperature, 0.0),
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
        "logprobs": 0,  # the sampled token's log-prob only
        "stop_token_ids": sorted(set(eos_ids)),
        "skip_special_tokens": True,
        "ignore_eos": sampling.ignore_eos,
    }
    if sampling.allowed_token_ids:
        kw["allowed_token_ids"] = sorted(set(sampling.allowed_token_ids))
    else:
        kw["logit_bias"] = {IMAGE_PAD_ID: -100.0, VIDEO_PAD_ID: -100.0}  # never sample a vision placeholder
    return kw


def engine_layout_kwargs(world: int, local_world: int, tp: int, sleep_mode: bool) -> dict:
    """The ``LLM`` keyword arguments for ``world`` torchrun ranks (``local_world`` on this node) and TP size ``tp``
    (see the module doc: external launcher, no data-parallel group, custom all-reduce off beside sleep mode)."""
    if tp < 1 or world % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} must divide the number of ranks ({world})")
    if local_world % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} must divide the GPUs per node ({local_world}): a "
                         "tensor-parallel group spans consecutive ranks on one node; use a divisor of "
                         f"{local_world}")
    kwargs: dict = {}
    if world > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if tp > 1 and sleep_mode:
        kwargs["disable_custom_all_reduce"] = True
    return kwargs


def on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU build here (no CUDA device)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


CPU_KV_CACHE_GIB = 1.0


def cpu_engine_settings(enable_sleep_mode: bool, enforce_eager: bool) -> tuple[dict, list[str]]:
    """What a CPU engine needs instead of the GPU settings, and a line per change: vLLM's CPU build refuses sleep
    mode ("Sleep mode is not supported on current platform"), compiles nothing worth the wait for small models,
    and reads ``gpu_memory_utilization`` as a share of host memory that must hold the whole process (the trainer
    too) besides the KV cache: the KV cache is sized in bytes instead (``kv_cache_memory_bytes``)."""
    settings = {"enable_sleep_mode": False, "enforce_eager": True,
                "kv_cache_memory_bytes": int(CPU_KV_CACHE_GIB * 2**30)}
    said = [f"KV cache {CPU_KV_CACHE_GIB:g} GiB of host memory (not gpu_memory_utilization)"]
    if enable_sleep_mode:
        said.append("sleep mode off (not supported on a CPU)")
    if not enforce_eager:
        said.append("eager mode")
    return settings, said


class VLLMEngine:
    """A colocated vLLM engine behind the RolloutEngine interface."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.6,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = True,
        load_format: str = "dummy",
        seed: int = 0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_images_per_prompt: int = 1,
        max_videos_per_prompt: int = 0,
        sleep_level: int = 2,
        progress: bool = False,
    ):
        """load_format="dummy": random weights at start, which is right for training because the trainer's
        weights are synced in before the first rollout; use "auto" to load the checkpoint (evaluation)."""
        # in-process: the weight sync reaches the model runner, and the trainer's seeding governs sampling
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ValueError("mm_gmpo runs vLLM inside the training process: unset VLLM_ENABLE_V1_MULTIPROCESSING "
                             f"(it is {os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}) or set it to 0")
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise ImportError("rollout.backend=vllm needs vLLM: pip install -e '.[vllm]' (GPU machines only); "
                              "or use rollout.backend=hf") from e
        kwargs = engine_layout_kwargs(int(os.environ.get("WORLD_SIZE", "1")),
                                      int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))),
                                      tensor_parallel_size, enable_sleep_mode)
        if sleep_level not in (1, 2):
            raise ValueError(f"rollout.sleep_level={sleep_level}: use 1 (weights to host memory) or 2 (weights dropped)")
        mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v}
        if on_cpu_platform():
            cpu, said = cpu_engine_settings(enable_sleep_mode, enforce_eager)
            enable_sleep_mode, enforce_eager = cpu.pop("enable_sleep_mode"), cpu.pop("enforce_eager")
            kwargs |= cpu
            kwargs.pop("disable_custom_all_reduce", None)
            if int(os.environ.get("RANK", "0")) == 0:
                print("vLLM on a CPU: " + "; ".join(said))
            # vLLM's own multimodal processing sets torch's thread count per request, which its CPU worker then
            # refuses with a warning every step: nothing to act on, so it is not shown
            logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
                lambda record: "torch.set_num_threads" not in record.getMessage())
        self.enable_sleep_mode, self.sleep_level = enable_sleep_mode, sleep_level
        self.progress = progress  # vLLM's own progress bar on long generates (256+ tokens)
        self.llm = LLM(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_sleep_mode=enable_sleep_mode,
            load_format=load_format,
            seed=seed,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            # clips only when the data has them: without "video": 0 vLLM also sizes its start-up profiling run for
            # a video per prompt
            limit_mm_per_prompt={"image": max_images_per_prompt, "video": max_videos_per_prompt},
            mm_processor_kwargs=mm_kwargs or None,
            **kwargs,
        )
        self.sleeping = False
        model_type = getattr(self.llm.llm_engine.model_config.hf_config, "model_type", "")
        self.metadata_as_kwarg = model_type in ("qwen2_vl", "qwen2_5_vl")

    # ------------------------------------------------------------ generate

    def generate(self, prompts: list[EncodedPrompt], sampling: SamplingParams) -> list[Rollout]:
        from vllm import SamplingParams as VSamplingParams

        self.wake_up()
        kwargs = vllm_sampling_kwargs(sampling) | fast_output_kwargs(getattr(VSamplingParams, "__struct_fields__", ()))
        t0 = time.perf_counter()
        with seeded(sampling.seed):
            outputs = self.llm.generate([engine_request(p, self.metadata_as_kwarg) for p in prompts],
                                        VSamplingParams(**kwargs),
                                        use_tqdm=self.progress and sampling.max_tokens >= 256)
        dt = time.perf_counter() - t0
        decode = None if kwargs.get("detokenize", True) else self.llm.get_tokenizer().decode
        rollouts: list[Rollout] = []
        for i, (p, out) in enumerate(zip(prompts, outputs, strict=True)):
            if list(out.prompt_token_ids) != list(p.input_ids):
                raise RuntimeError(
                    f"prompt {p.prompt.id}: vLLM expanded the prompt to {len(out.prompt_token_ids)} tokens, the "
                    f"trainer has {len(p.input_ids)}; the image or clip sizes differ (pass the same min/max pixels to "
                    "both), or this vLLM writes a clip's placeholders in another form (README 'Video prompts')")
            for s, c in enumerate(out.outputs):
                ids = list(c.token_ids)
                text = c.text if decode is None else decode(ids, skip_special_tokens=True)
                finish = "stop" if c.finish_reason == "stop" else "length"
                rollouts.append(Rollout(i, s, list(p.input_ids), ids, text, sampled_logprobs(c.logprobs, ids),
                                        finish, {"time_s": dt}))
        return rollouts

    # ------------------------------------------------------------ weights and caches

    def _model_runner(self):
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None) or engine.engine_core.engine_core.model_executor
        return executor.driver_worker.worker.model_runner

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        runner = self._model_runner()
        if self.sleeping:  # weights first, the KV cache once they are loaded
            self._wake(["weights"])
            missing = self._reload(runner, named_tensors)
            self._wake(["kv_cache"])
            self.sleeping = False
        else:
            missing = self._reload(runner, named_tensors)
        if missing:
            raise RuntimeError(f"weight sync: {len(missing)} of the engine's parameters got no new value (e.g. "
                               f"{', '.join(missing[:3])}): the names sent do not match the engine's model")
        self.reset_caches()

    @staticmethod
    def _reload(runner, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """vLLM's layerwise reload of ``named_tensors``; returns the engine parameters that got nothing (the
        check vLLM itself only logs). The model's ``load_weights`` is wrapped for the call to see what it loaded."""
        model = runner.get_model()
        loaded: set[str] = set()
        load = model.load_weights

        def recorded(weights):
            names = load(weights)
            loaded.update(names or ())
            return names

        model.load_weights = recorded
        try:
            runner.reload_weights(weights_iterator=vllm_weights(named_tensors), is_checkpoint_format=True)
        finally:
            del model.load_weights  # the class's method again
        # vLLM reports a mixture of experts' weights as mlp.experts.w13_weight; its parameter is named
        # mlp.experts.routed_experts.w13_weight (0.25.1)
        return sorted(name for name, _ in model.named_parameters()
                      if name not in loaded and name.replace(".routed_experts.", ".") not in loaded)

    def reset_caches(self) -> None:
        """Forget every result computed with the old weights: KV prefix cache, MM processor and encoder caches."""
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        if self.enable_sleep_mode and not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True

    def _wake(self, tags: list[str] | None = None) -> None:
        # vLLM maps its memory outside torch's caching allocator: hand back the blocks the update freed but torch
        # still caches, or the wake-up runs out of memory (seen on an H100 with the 3B on one GPU)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if tags is None:
            self.llm.wake_up()
        else:
            self.llm.wake_up(tags=tags)

    def wake_up(self) -> None:
        """No-op unless asleep. After a level-2 sleep the weights are garbage until the next update_weights (the
        trainer always syncs before it generates again)."""
        if self.sleeping:
            self._wake()
            self.sleeping = False
