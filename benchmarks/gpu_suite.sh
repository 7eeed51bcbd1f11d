#!/usr/bin/env bash
# The GPU checks, in order of value, each under its own time limit, for a lent one-GPU machine (one H200 here: 15
# device-minutes per issue, at most 10 minutes a call, nothing reachable from it). Run from the repository root:
#
#   bash benchmarks/gpu_suite.sh --dry-run                 # on a CPU: every stage's imports, files and flags, and
#                                                          # the plan with each stage's time limit; runs nothing
#   bash benchmarks/gpu_suite.sh --install env plan7b      # device call 1 (carry .carry/suite-wheels.tar.xz and
#                                                          # .carry/vllm-wheels.tar.xz.p00): no vLLM needed
#   bash benchmarks/gpu_suite.sh --install parity step rollout   # call 2 (carry the last part) within 30 s
#
# The machine has torch 2.11 and transformers 5.17 but no registry: `bash benchmarks/stage_gpu.sh` packs the wheels
# it lacks (benchmarks/gpu_wheels.txt: vLLM 0.25.1 and what the stages import) into .carry/ as parts that fit the
# 64 MiB a call carries beside the repository; take data/ out of what travels for those calls (no stage reads it:
# `git rm -r -q --cached data && echo /data/ >> .git/info/exclude`, undone by `git reset -q data` and deleting the
# line). `--install` keeps each call's parts in /tmp/stage (the machine keeps /tmp while warm, 30 s after a call)
# and installs an archive into /tmp/site once all its parts are there. With no stage named: env plan7b parity step
# rollout.
#
# Stages (limits in seconds; SUITE_BUDGET_S, default 540, skips what no longer fits):
#   env     GPU, driver, python, torch, transformers, vLLM versions
#   plan7b  Qwen2.5-VL-7B update with the memory plan's one-H200 setting (adamw_8bit, 4096-token micro-batches,
#           4 x 1024 tokens with one 448x448 image = 1024 patches each): peak allocated and reserved, then the
#           plan of the same setting at the same patches per token (1.0), both phases (the rollout phase binds)
#   parity  fp32 log-probs of vLLM vs the trainer after a sync (3B; seen, fresh and two-image prompts), with
#           TRITON_F32_DEFAULT=ieee: vLLM's fp32 attention is Triton, which defaults to TF32
#   step    2 GMPO steps of the geo3k 3B config (random weights) on one GPU, eager, vLLM asleep at level 2 during
#           the update (weights dropped, woken weights-first by the sync): stage times, rollout/logprob_diff,
#           MFU, peak memory and the GPU's use at the end of the rollout, then the memory plan of that run
#   rollout bare LLM.generate vs mm_gmpo's engine on the same LLM (3B, 32 prompts x 8 x 256 tokens, eager), alternating
#   selftest (not in the default list) a command over its 3 s whose own-session child ignores TERM: both stopped
# Never here: several GPUs (multigpu needs 2+) and the 7B with CPU offload (its fp32 AdamW state is over a 128 GiB
# host). A stage over its limit is stopped with TERM (torchrun passes it on to its workers, which run in their own
# session), then KILL for what is left of it; the next stage starts once the GPU is empty again.
# Logs go to $SUITE_WORK (default /tmp/gpu_suite) and end up in one file, $OUT/gpu_suite.tgz (OUT default:
# runs/gpu_suite), with results.jsonl rows of the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0 install=0 stages=()
for a in "$@"; do
  case "$a" in --dry-run) dry=1 ;; --install) install=1 ;; *) stages+=("$a") ;; esac
done
(( ${#stages[@]} )) || stages=(env plan7b parity step rollout)
if [ -z "${PYTHON:-}" ] && (( dry )) && [ -x .venv-vllm/bin/python ]; then PYTHON=.venv-vllm/bin/python; fi
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_suite}"
WORK="${SUITE_WORK:-/tmp/gpu_suite}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export VLLM_ENABLE_V1_MULTIPROCESSING=0 MM_GMPO_BENCH_OUT="$WORK/results.jsonl"
budget=${SUITE_BUDGET_S:-540}
t_start=$(date +%s)
failed=0

# ---------------------------------------------------------------- wheels (device only)

unxz() {  # xz on all cores where the machine has xz, else Python's lzma
  if command -v xz >/dev/null; then xz -T0 -dc; else
    "$PY" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.LZMAFile(sys.stdin.buffer), sys.stdout.buffer, 1 << 24)"
  fi
}

install_wheels() {
  mkdir -p /tmp/stage /tmp/site
  cp .carry/*.tar.xz* .carry/SHA256SUMS /tmp/stage/ 2>/dev/null
  (cd /tmp/stage && sha256sum --quiet --ignore-missing -c SHA256SUMS) || { echo "install: a part is damaged"; return 1; }
  local archive parts t0 dest
  for archive in suite-wheels vllm-wheels; do
    [ -e "/tmp/stage/$archive.installed" ] && continue
    parts=$(awk -v a="$archive" '$2 ~ "^"a {print $2}' /tmp/stage/SHA256SUMS)
    if ! (cd /tmp/stage && ls $parts >/dev/null 2>&1); then
      echo "install: $archive: $(cd /tmp/stage && ls $parts 2>/dev/null | wc -l) of $(echo $parts | wc -w) part(s) here"
      continue
    fi
    t0=$(date +%s) dest="/tmp/wheels/$archive"
    mkdir -p "$dest"
    if (cd /tmp/stage && cat $parts) | unxz | tar -x -C "$dest" &&
       "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
         "$dest"/*.whl > "$WORK/install_$archive.log" 2>&1; then
      touch "/tmp/stage/$archive.installed"
      echo "install: $archive in $(( $(date +%s) - t0 ))s"
    else
      echo "install: $archive failed"; tail -5 "$WORK/install_$archive.log"
    fi
    rm -rf "$dest"
  done
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
}

# ---------------------------------------------------------------- stage runner

check() {  # dry run: one suite_check.py call (imports / files / script flags); failures are counted
  (( dry )) || return 0
  "$PY" benchmarks/suite_check.py "$@" 2>&1 | tail -3 | sed 's/^/  /'
  (( PIPESTATUS[0] == 0 )) || failed=$((failed + 1))
}

procs_of() {  # the processes of a stage: every one inherits MM_GMPO_STAGE=<name>, whatever session it is in
  local p
  for p in /proc/[0-9]*; do
    tr '\0' '\n' < "$p/environ" 2>/dev/null | grep -qx "MM_GMPO_STAGE=$1" && echo "${p#/proc/}"
  done
}

stop_stage() {  # TERM (torchrun passes it to its workers), up to SUITE_TERM_WAIT_S (20), then KILL what is left
  local name=$1 pid=$2 i left
  kill -TERM -- "-$pid" 2>/dev/null; kill -TERM $(procs_of "$name") 2>/dev/null
  for i in $(seq "${SUITE_TERM_WAIT_S:-20}"); do left=$(procs_of "$name"); [ -z "$left" ] && return 0; sleep 1; done
  echo "=== $name: KILL $(echo $left)"; kill -KILL $left 2>/dev/null
}

gpu_empty() {  # wait (30 s at most) until no process holds the GPU's memory; say what is still used
  local i used=0
  command -v nvidia-smi >/dev/null || return 0
  for i in $(seq 30); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    (( used < 2048 )) && return 0
    sleep 1
  done
  echo "=== warning: ${used} MiB still in use on the GPU before the next stage"
}

stage() {  # stage NAME LIMIT_S COMMAND...: the limit is cut to what is left of the budget
  local name=$1 limit=$2; shift 2
  local left=$(( budget - ($(date +%s) - t_start) ))
  if (( dry )); then echo "plan: $name, limit ${limit}s: $*"; return 0; fi
  if (( left < 40 )); then echo "=== $name skipped: ${left}s left of SUITE_BUDGET_S=$budget"; return 0; fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - t_start ))s): $*"
  local t0=$(date +%s)
  MM_GMPO_STAGE=$name setsid "$@" > "$WORK/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && (( $(date +%s) - t0 < limit )); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then echo "=== $name: over its ${limit}s, stopping it"; stop_stage "$name" "$pid"; fi
  wait "$pid"; local rc=$?
  local rest; rest=$(procs_of "$name"); [ -n "$rest" ] && stop_stage "$name" "$pid"
  gpu_empty
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"
  grep -E "^\| |passed|failed|rror|mean \||max \||^fp32|^\[" "$WORK/$name.log" | grep -v "^\[transformers\]" | tail -30
}

needs_vllm() {
  (( dry )) && return 0
  "$PY" -c "import vllm" 2>/dev/null && return 0
  echo "=== $1 skipped: no vLLM here (carry every part of .carry/vllm-wheels.tar.xz.p* and pass --install)"
  return 1
}

# ---------------------------------------------------------------- stages

(( install && !dry )) && install_wheels
(( dry )) && { echo "dry run with $PY: checks and the plan, nothing runs"; check files benchmarks/gpu_wheels.txt \
  benchmarks/stage_gpu.sh; for w in vllm== datasets== math-verify== qwen-vl-utils== torchao==; do
    grep -q "^$w" benchmarks/gpu_wheels.txt || { echo "  gpu_wheels.txt names no $w"; failed=$((failed + 1)); }; done; }
U7=(benchmarks/bench_update.py --model qwen2_5_vl_7b --batch 4 --seq 1024 --image 448 --steps 1
    --vision-attention grouped --layout packed --optim adamw_8bit --micro-tokens 4096)
PLAN7=(benchmarks/memory_plan.py --config configs/geo3k_qwen2_5_vl_7b_gmpo.yaml --gpus 1 --gpu-gib 141
       --patches-per-token 1.0 optim.name=adamw_8bit trainer.max_tokens_per_micro_batch=4096)
STEP_DATA="$WORK/step_data"
STEP=(--config configs/geo3k_qwen2_5_vl_3b_gmpo.yaml model.path=random:qwen2_5_vl_3b data.dataset=files
      "data.train_files=$STEP_DATA/train.jsonl" data.task=math trainer.total_steps=2 trainer.rollout_batch_size=16
      trainer.mini_batch_size=16 rollout.max_tokens=256 rollout.enforce_eager=true rollout.sleep_level=2
      rollout.gpu_memory_utilization=0.3 trainer.eval_every=0 trainer.save_every=-1 trainer.export_hf=false
      logging.tensorboard=false "trainer.output_dir=$WORK/step_run")
# 512x512 pictures: 37 x 37 = 1369 patches, 342 image tokens + ~60 of text + 256 of response per sequence
PLAN_STEP=(benchmarks/memory_plan.py --config configs/geo3k_qwen2_5_vl_3b_gmpo.yaml --gpus 1 --gpu-gib 141
           --patches-per-token 2.1 model.path=random:qwen2_5_vl_3b trainer.rollout_batch_size=16
           trainer.mini_batch_size=16 rollout.max_tokens=256 rollout.gpu_memory_utilization=0.3)
ROLL=(benchmarks/bench_rollout.py --model qwen2_5_vl_3b --prompts 32 --n 8 --max-tokens 256 --image 448 --gpu-mem 0.4
      --repeats 2 --eager)

for what in "${stages[@]}"; do
  case "$what" in
    env)
      check imports torch transformers
      if (( !dry )); then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| transformers', transformers.__version__)"
        "$PY" -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tail -1
      fi ;;
    plan7b)
      check imports torchao mm_gmpo.update
      check script "${U7[@]}"
      check script "${PLAN7[@]}"
      stage plan7b 200 "$PY" "${U7[@]}"
      stage plan7b_plan 60 "$PY" "${PLAN7[@]}" ;;
    parity)
      needs_vllm parity || continue
      check imports vllm
      (( dry )) && { "$PY" -m pytest --collect-only -q -m gpu tests/test_vllm_engine.py -k float32 -p no:cacheprovider \
        2>&1 | grep -q "1/.* tests collected\|1 test collected" && echo "  ok: parity test collected" ||
        { echo "  parity test not collected"; failed=$((failed + 1)); }; }
      stage parity 200 env TRITON_F32_DEFAULT=ieee "$PY" -m pytest -m gpu tests/test_vllm_engine.py -k float32 -s -q \
        -p no:cacheprovider ;;
    step)
      needs_vllm step || continue
      check imports vllm datasets math_verify qwen_vl_utils
      check script benchmarks/step_data.py --out "$STEP_DATA" --prompts 32 --side 512
      if (( dry )); then
        "$PY" benchmarks/step_data.py --out "$STEP_DATA" --prompts 32 --side 512 >/dev/null &&
        "$PY" scripts/train_mm.py "${STEP[@]}" --check 2>&1 | tail -2 | sed 's/^/  /'
        (( PIPESTATUS[0] == 0 )) || failed=$((failed + 1))
        check script "${PLAN_STEP[@]}"
      else
        "$PY" benchmarks/step_data.py --out "$STEP_DATA" --prompts 32 --side 512 >/dev/null
      fi
      stage step 260 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/train_mm.py "${STEP[@]}"
      if (( !dry )) && [ -f "$WORK/step_run/metrics.jsonl" ]; then
        cp "$WORK/step_run/metrics.jsonl" "$WORK/step_metrics.jsonl"
        "$PY" - "$WORK/step_metrics.jsonl" <<'PY'
import json, sys
keys = ["timing/step_s", "timing/rollout_s", "timing/old_logprob_s", "timing/update_s", "timing/weight_sync_s",
        "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "perf/mfu", "perf/max_memory_allocated_gib",
        "perf/max_memory_reserved_gib", "perf/rollout_gpu_used_gib", "rollout/response_len_mean"]
rows = [json.loads(x) for x in open(sys.argv[1])]
print("| step | " + " | ".join(keys) + " |")
for r in rows:
    print(f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-" for k in keys) + " |")
PY
      fi
      rm -rf "$WORK/step_run"
      stage step_plan 60 "$PY" "${PLAN_STEP[@]}" ;;
    rollout)
      needs_vllm rollout || continue
      check script "${ROLL[@]}"
      stage rollout 240 "$PY" "${ROLL[@]}" ;;
    selftest)  # the runner's stop: a command over its limit whose child, in a session of its own, ignores TERM
      stage selftest "${SELFTEST_LIMIT_S:-3}" "$PY" -c "import subprocess, time
subprocess.Popen(['setsid', '$PY', '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])
time.sleep(600)"
      left=$(procs_of selftest); echo "=== selftest: ${left:-no} process left" ;;
    multigpu|update7b)
      echo "=== $what: not on one GPU with a 128 GiB host (see the header)" ;;
    *) echo "unknown stage $what (env plan7b parity step rollout selftest)"; exit 2 ;;
  esac
done

if (( dry )); then
  echo "dry run: $failed problem(s)"
  exit $(( failed > 0 ))
fi
tar -czf "$OUT/gpu_suite.tgz" -C "$WORK" --exclude=step_data . && echo "=== results: $OUT/gpu_suite.tgz"
echo "=== done at +$(( $(date +%s) - t_start ))s"
