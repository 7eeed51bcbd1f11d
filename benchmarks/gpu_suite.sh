#!/usr/bin/env bash
# The GPU checks and benchmarks of issues 6, 9 and 18, in priority order, each under its own time limit so one hang
# cannot eat the rest. Run from the repository root on a GPU machine with vLLM installed:
#
#   bash benchmarks/gpu_suite.sh env gputests plan7b update profile  # needs no vLLM: before carrying it
#   bash benchmarks/gpu_suite.sh parity rollout step sync  # with vLLM installed (../shared/gpu/)
#
# Logs and benchmarks/results.jsonl rows go to $OUT (default: runs/gpu_suite); SUITE_BUDGET_S (seconds) skips
# the stages that no longer fit. Stages:
#   gputests pytest -m gpu tests/test_gpu_update.py (packed, grouped, compiled paths on CUDA vs float64; bf16 packed
#            as close to the reference as padded); tests/test_offload.py round trips (shards and optimizer state to
#            the CPU and back, the run unchanged)
#   parity   pytest -m gpu tests/test_vllm_engine.py (vLLM log-probs == trainer's after a sync, fresh + seen + two-image prompts)
#   update   bench_update.py, Qwen2.5-VL-3B, 8 x 1024 tokens, 448x448 images, grouped vision attention: packed
#            and padded micro-batches; packed with compiled MLPs and norms (--compile); packed recomputing every
#            2nd layer only (--ac-every 2: 26.8 GiB of activations at 8192 tokens is over what fp32 AdamW leaves
#            free, so 4096-token micro-batches; benchmarks/activation_memory.py); lengths spread over 384..1024
#            with 4 sequences per image (a prompt's samples: one vision pass)
#   layouts  padded vs packed with lengths spread over 384..1024 (what packing saves on uneven responses)
#   update7b Qwen2.5-VL-7B, 4 x 1024 tokens, FSDP2 CPU offload, frozen vision tower (fp32 AdamW state of the
#            whole 8.3B model, 133 GB, fits neither the GPU nor this machine's 128 GiB of host memory)
#   plan7b   Qwen2.5-VL-7B update with the memory plan's one-H200 setting (optim.name=adamw_8bit, 4096-token
#            micro-batches): measured peak memory, then the plan's update total for the same setting (issue 18:
#            within 10%)
#   profile  one 3B update step (packed) under the torch profiler: time per category (matmul, attention,
#            optimizer, FSDP, copies, other ops), busy vs wall, matmul TFLOP/s; $OUT/profile.md
#   sync     bench_sync.py, Qwen2.5-VL-7B FSDP2 -> vLLM
#   rollout  bench_rollout.py, Qwen2.5-VL-3B, 32 prompts x n=8 x 512 tokens, CUDA graphs: bare LLM.generate vs
#            mm_gmpo's engine on the same LLM (same engine arguments), alternating, 3 repeats each (issue 20)
#   step     GMPO steps (STEPS, default 3) of the geo3k 3B config (random weights, reduced batch, CUDA graphs on:
#            rollout.enforce_eager=false) for the steady-state stage breakdown (summary: step_metrics.jsonl),
#            reward wait vs busy, pixel MB, in-loop MFU against the update stage's; step 2's update profiled
#            (step_profile_update.md); vLLM sleeps at level 2 (issue 23: weights dropped, woken weights-first by
#            the sync); step_sleep1 repeats it (eager) at level 1 for the comparison
#   multigpu (2+ GPUs; issue 23) the same run on 2 ranks with TP 1 (each rank its own engine) and with TP 2 (one
#            engine over both ranks: same prompts and seed, outputs split), evaluated on the 300 val problems; each
#            must finish without a hang and log eval/prompts == 300
# PARITY_K=bfloat16 (or float32) runs one dtype of the parity test.
set -uo pipefail
OUT="${OUT:-runs/gpu_suite}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MM_GMPO_BENCH_OUT="$OUT/results.jsonl" VLLM_ENABLE_V1_MULTIPROCESSING=0
PY="${PYTHON:-python3}"
U=("$PY" benchmarks/bench_update.py --model qwen2_5_vl_3b --batch 8 --seq 1024 --image 448 --steps 3
   --vision-attention grouped)
# the random-weight 3B geo3k run of the step and multigpu stages (reduced batch, no checkpoints)
STEP_ARGS=(--config configs/geo3k_qwen2_5_vl_3b_gmpo.yaml model.path=random:qwen2_5_vl_3b data.train_source=data/geometry3k
  data.train_split=val trainer.rollout_batch_size=32 trainer.mini_batch_size=32 rollout.max_tokens=512
  rollout.enforce_eager=true rollout.gpu_memory_utilization=0.2 trainer.eval_every=0 trainer.save_every=-1
  trainer.export_hf=false logging.tensorboard=false)
t_start=$(date +%s)

stage() {  # stage NAME LIMIT_S COMMAND...; the limit is cut to what is left of SUITE_BUDGET_S
  local name=$1 limit=$2; shift 2
  local left=$(( ${SUITE_BUDGET_S:-100000} - ($(date +%s) - t_start) ))
  if (( left < 45 )); then echo "=== $name skipped: ${left}s left of SUITE_BUDGET_S"; return 0; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - t_start ))s): $*"
  local t0=$(date +%s)
  timeout --signal=KILL "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"
  grep -E "^\| |passed|failed|error|Error|mean \|logp|^step|timing" "$OUT/$name.log" | tail -40
  return 0
}

for what in "$@"; do
  case "$what" in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
      "$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1 ;;
    gputests)
      stage gputests 240 "$PY" -m pytest -m gpu tests/test_gpu_update.py -q -p no:cacheprovider
      stage offload 120 "$PY" -m pytest tests/test_offload.py -k round_trip -q -p no:cacheprovider ;;
    parity)
      stage parity 300 "$PY" -m pytest -m gpu tests/test_vllm_engine.py -s -q -p no:cacheprovider ${PARITY_K:+-k "$PARITY_K"} ;;
    update)
      stage update_packed 100 "${U[@]}" --layout packed
      stage update_padded 100 "${U[@]}" --layout padded
      stage update_packed_compile 160 "${U[@]}" --layout packed --compile
      stage update_packed_ac2_mt4096 100 "${U[@]}" --layout packed --ac-every 2 --micro-tokens 4096
      stage update_spread_packed_n4 100 "${U[@]}" --min-seq 384 --layout packed --group 4 ;;
    layouts)
      stage update_spread_padded 100 "${U[@]}" --min-seq 384 --layout padded
      stage update_spread_packed 100 "${U[@]}" --min-seq 384 --layout packed ;;
    update7b)
      stage update7b 420 "$PY" benchmarks/bench_update.py --model qwen2_5_vl_7b --batch 4 --seq 1024 --image 448 \
        --steps 1 --vision-attention grouped --layout packed --cpu-offload --freeze-vision ;;
    plan7b)
      stage plan7b 300 "$PY" benchmarks/bench_update.py --model qwen2_5_vl_7b --batch 4 --seq 1024 --image 448 \
        --steps 1 --vision-attention grouped --layout packed --optim adamw_8bit --micro-tokens 4096
      "$PY" benchmarks/memory_plan.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml --gpus 1 --gpu-gib 141 \
        --patches-per-token 0.25 optim.name=adamw_8bit trainer.max_tokens_per_micro_batch=4096 | grep "update |" ;;
    profile)
      stage profile 200 "$PY" benchmarks/bench_update.py --model qwen2_5_vl_3b --batch 8 --seq 1024 --image 448 \
        --steps 1 --vision-attention grouped --layout packed --profile "$OUT"
      grep -A40 "^Profiled step" "$OUT/profile.md" ;;
    sync)
      stage sync 200 "$PY" benchmarks/bench_sync.py --model qwen2_5_vl_7b --repeats 3 ;;
    rollout)
      stage rollout 330 "$PY" benchmarks/bench_rollout.py --model qwen2_5_vl_3b --prompts 32 --n 8 --max-tokens 512 \
        --image 448 --gpu-mem 0.4 --repeats 3 ;;
    step)
      stage step 270 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train_mm.py \
        --config configs/geo3k_qwen2_5_vl_3b_gmpo.yaml model.path=random:qwen2_5_vl_3b \
        data.train_source=data/geometry3k data.train_split=val trainer.total_steps=${STEPS:-3} trainer.rollout_batch_size=32 \
        trainer.mini_batch_size=32 rollout.max_tokens=512 rollout.enforce_eager=false rollout.gpu_memory_utilization=0.2 trainer.eval_every=0 \
        trainer.save_every=-1 trainer.export_hf=false logging.tensorboard=false trainer.output_dir="$OUT/step_run" \
        trainer.profile_step=2
      cp "$OUT/step_run/metrics.jsonl" "$OUT/step_metrics.jsonl" 2>/dev/null
      cp "$OUT/step_run/profile_update_step2.md" "$OUT/step_profile_update.md" 2>/dev/null
      rm -rf "$OUT/step_run"
      stage step_sleep1 270 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train_mm.py \
        "${STEP_ARGS[@]}" trainer.total_steps=${STEPS:-3} rollout.sleep_level=1 trainer.output_dir="$OUT/step_run1"
      cp "$OUT/step_run1/metrics.jsonl" "$OUT/step_sleep1_metrics.jsonl" 2>/dev/null
      rm -rf "$OUT/step_run1" ;;
    multigpu)
      for tp in 1 2; do
        stage "multigpu_tp$tp" 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 scripts/train_mm.py \
          "${STEP_ARGS[@]}" trainer.total_steps=2 rollout.tensor_parallel_size=$tp trainer.eval_every=2 \
          data.val_source=data/geometry3k data.val_split=val trainer.output_dir="$OUT/mg_run$tp"
        tail -1 "$OUT/mg_run$tp/metrics.jsonl" 2>/dev/null | "$PY" -c "import json,sys; r=json.loads(sys.stdin.read()); print('eval/prompts', r.get('eval/prompts'), 'reward', r.get('reward/mean'))"
        rm -rf "$OUT/mg_run$tp"
      done ;;
    *) echo "unknown stage $what (env gputests parity update layouts update7b plan7b profile sync rollout step multigpu)"; exit 2 ;;
  esac
done
echo "=== done at +$(( $(date +%s) - t_start ))s"
