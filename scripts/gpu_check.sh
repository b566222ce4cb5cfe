#!/usr/bin/env bash
# GPU readiness check: the CUDA paths that the CPU test suite cannot run (issue 19), on one
# CUDA GPU in under 10 minutes, with nothing but the repository and its venv (`make venv`).
#
#   make venv && scripts/gpu_check.sh [WORK_DIR]          # default WORK_DIR: work/gpu_check
#
# What it does (each step is a row of the summary table printed at the end: PASS, WARN, SKIP
# or FAIL, with what was measured; logs in WORK_DIR/logs/STEP.log; exit status 1 if any FAIL):
#   env           torch sees CUDA; CTranslate2 sees a CUDA device
#   data          synthetic tiny corpus (tests/tiny_data.py: en/de/fr, fairseq-preprocess), or
#                 Multi30k when $MULTI30K_DIR holds its raw files (scripts/prepare_multi30k.py)
#   train_fp16    fairseq-train task_moe_small, target/target routing, 8 experts, --fp16
#                 (fairseq's flattened FP16Optimizer), --clip-norm, $UPDATES updates validating
#                 every $VALID_EVERY: exits 0, valid losses finite and falling, weights finite
#   validate_fp16 fairseq-validate --fp16 on its checkpoint_last = the last valid loss it
#                 logged (validation during training must not use stale merged experts)
#   train_amp / validate_amp   the same with --amp (fp32 weights, autocast), validated in fp32
#   prune         taskmoe-prune of one pair from each run
#   gen_fp32      fairseq-generate on CUDA (fp32), full vs pruned (--amp run): hypotheses must
#                 be identical (the equivalence claim of docs/pruning.md)
#   gen_fp16      the same with --fp16 (--fp16 run); differences are counted (WARN, not FAIL)
#   ct2_cuda      taskmoe-export --format ctranslate2 (float32) of the --amp run's pair, then
#                 fairseq_taskmoe.ct2 on device="cuda": hypotheses vs the pruned model's under
#                 fairseq-generate (>= 95% identical; CTranslate2 scores the forced target
#                 language tag differently, so near-ties may flip, see tests/test_export.py)
#   ct2_cuda_fp16 the same model run with compute_type float16: agreement reported (>= 80%)
#   ep_*          expert parallelism, $EP_UPDATES updates validating halfway and at the end,
#                 2 ranks on this ONE GPU with the gloo backend (both ranks on cuda:0, tensors
#                 staged through host memory): NCCL cannot put two ranks on one GPU, while
#                 gloo still runs the sharded layers' all-to-all, dtype agreement
#                 under --amp (idle experts are the rule with target routing) and the expert
#                 gradient norm with CUDA tensors, --fp16 (+ --fp16-no-flatten-grads, required
#                 with sharded experts) and --amp. Sharded vs replicated experts
#                 (--moe-expert-parallel off) must reach the same valid loss (within 0.05),
#                 and the consolidated sharded checkpoint must validate as it logged
#   ep_nccl       with 2+ GPUs only: fairseq's own multi-GPU launch (spawn, NCCL), 2 ranks,
#                 --fp16 --fp16-no-flatten-grads, sharded experts; otherwise SKIP
#
# Environment: PYTHON (default .venv/bin/python), UPDATES (300), VALID_EVERY (100), EP_UPDATES
# (100), MULTI30K_DIR (raw Multi30k; default: the synthetic corpus), TRAIN_SIZE (synthetic:
# sentences per language, 4000; Multi30k: training lines, 10000), STEP_TIMEOUT (seconds per
# command, 300), ONLY (a regex of step names to run, e.g. 'ep_.*', reusing the files of an
# earlier run in the same WORK_DIR). GPU_CHECK_DEVICE=cpu runs the same pipeline on CPU as a
# smoke test of the script itself (no --fp16/--amp, few updates, CTranslate2 on CPU): it checks
# the plumbing, not the GPU paths.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-$REPO/.venv/bin/python}
BIN=$(dirname "$PY")
WORK=$(mkdir -p "${1:-$REPO/work/gpu_check}" && cd "${1:-$REPO/work/gpu_check}" && pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK/logs"
START=$SECONDS

if [ "$DEVICE" = cpu ]; then  # smoke test of the script: precision flags off, a few updates
  UPDATES=${UPDATES:-20} VALID_EVERY=${VALID_EVERY:-10} EP_UPDATES=${EP_UPDATES:-10}
  FP16=() AMP=() EP_FP16=() ON=(--cpu) CT2_DEVICE=cpu
  CT2_MIN=0  # a 20-update model is all near-ties: CTranslate2 agreement means nothing
else
  UPDATES=${UPDATES:-300} VALID_EVERY=${VALID_EVERY:-100} EP_UPDATES=${EP_UPDATES:-100}
  FP16=(--fp16) AMP=(--amp) EP_FP16=(--fp16 --fp16-no-flatten-grads) ON=() CT2_DEVICE=cuda
  CT2_MIN=0.95
  # CTranslate2's CUDA build loads libcublas at run time; torch's CUDA wheels ship it under
  # site-packages/nvidia/*/lib, where the loader does not look by itself
  NV_LIBS=$("$PY" -c 'import glob, os, site
print(":".join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], "nvidia", "*", "lib")))))')
  export LD_LIBRARY_PATH=$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi

# --- data settings (the files are made by the `data` step) -------------------------------------
M30K=${MULTI30K_DIR:-}
if [ -n "$M30K" ] && [ -d "$M30K" ]; then
  DATA_KIND=multi30k DATA=$WORK/multi30k/bin LANGS=en,de,fr,cs
  PAIRS=en-de,de-en,en-fr,fr-en,en-cs,cs-en PAIR=en-de TRAIN_SIZE=${TRAIN_SIZE:-10000}
  SRC_TEXT=$WORK/multi30k/text/test.en SPM=(--spm-model "$WORK/multi30k/spm.model")
  POST=(--post-process sentencepiece)
else
  DATA_KIND=synthetic DATA=$WORK/tiny/bin LANGS=en,de,fr PAIRS=en-de,de-en,en-fr PAIR=en-fr
  TRAIN_SIZE=${TRAIN_SIZE:-4000} SRC_TEXT=$WORK/tiny/text/test.en SPM=() POST=()
fi
SRC=${PAIR%-*} TGT=${PAIR#*-}
TASK=(--user-dir user_dir --task translation_task_moe --langs "$LANGS" --lang-pairs "$PAIRS"
      --encoder-langtok tgt --decoder-langtok)
MODEL=(--arch task_moe_small --encoder-moe-routing target --decoder-moe-routing target
       --moe-expert-count 8 --moe-top-k 2)
RECIPE=(--criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1
        --moe-gate-loss-wt 0.01 --optimizer adam --adam-betas '(0.9, 0.98)' --lr 0.003
        --lr-scheduler inverse_sqrt --warmup-updates 50 --dropout 0.1 --clip-norm 1.0
        --max-tokens 4096 --seed 1 --log-format simple --log-interval 50 --num-workers 0
        --no-epoch-checkpoints --validate-interval 1000 --save-interval 1000
        --validate-interval-updates "$VALID_EVERY")
GEN=(--gen-subset test --beam 4 --max-tokens 8000 --source-lang "$SRC" --target-lang "$TGT"
     "${POST[@]}")

# --- step runner --------------------------------------------------------------------------------
ROWS=()
FAILED=0
DETAIL=  # set per step: the file a step writes its one-line result to

# run_step NAME FUNCTION [ARGS...]: FUNCTION runs in a subshell with `set -e`, its output in
# logs/NAME.log. Exit 0: PASS; `skip MSG`: SKIP; `warn MSG`: WARN; anything else: FAIL. The
# detail column is what the step wrote with `note`, else the log's last line.
run_step() {
  local name=$1 rc status detail start=$SECONDS
  shift
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ ^($ONLY)$ ]]; then return 0; fi
  DETAIL=$WORK/logs/$name.detail
  rm -f "$DETAIL"
  echo "== $name" >&2
  set +e
  (set -e; "$@") >"$WORK/logs/$name.log" 2>&1
  rc=$?
  set -e
  case $rc in
    0) status=PASS ;;
    75) status=SKIP ;;
    76) status=WARN ;;
    *) status=FAIL; FAILED=1 ;;
  esac
  detail=$(cat "$DETAIL" 2>/dev/null || tail -n 1 "$WORK/logs/$name.log" | cut -c1-150)
  [ $rc -ne 0 ] && [ $rc -ne 75 ] && [ $rc -ne 76 ] && detail="exit $rc: $detail"
  ROWS+=("$(printf '%-14s %-5s %4ss  %s' "$name" "$status" "$((SECONDS - start))" "$detail")")
  echo "   $status: $detail" >&2
}
note() { echo "$*" >"$DETAIL"; }
skip() { note "$*"; exit 75; }
warn() { note "$*"; exit 76; }
need() { for f in "$@"; do [ -e "$f" ] || skip "needs $f (an earlier step failed)"; done; }
t() { timeout "$STEP_TIMEOUT" "$@"; }  # every tool call, so that a hung collective fails
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# valid_losses LOG: the `valid on 'valid' subset | loss X` values of a fairseq log, in order
valid_losses() {
  "$PY" - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1], errors="replace").read()
print(" ".join(re.findall(r"valid on 'valid' subset \| loss (\S+)", text)))
EOF
}

# check_training LOG CHECKPOINT: finite falling valid losses, finite weights (any layout)
check_training() {
  local losses
  losses=$(valid_losses "$1")
  "$PY" - "$2" $losses <<'EOF'
import math, sys
import torch
from fairseq_taskmoe.distributed.checkpoints import load_any
path, losses = sys.argv[1], [float(x) for x in sys.argv[2:]]
assert len(losses) >= 2, f"expected 2+ validations, the log has {losses}"
assert all(math.isfinite(x) for x in losses), f"non-finite valid loss: {losses}"
assert losses[-1] < losses[0], f"valid loss did not fall: {losses}"
state = load_any(path)
bad = [k for k, v in state["model"].items()
       if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
assert not bad, f"non-finite weights in {path}: {bad[:3]}"
dtype = next(v.dtype for v in state["model"].values()
             if torch.is_tensor(v) and v.is_floating_point())
print(f"valid loss {' -> '.join(f'{x:.3f}' for x in losses)}; weights finite ({dtype})")
EOF
}

train() {  # train SAVE_DIR [extra fairseq-train flags]: one process
  local dir=$1
  shift
  t "$BIN/fairseq-train" "$DATA" "${TASK[@]}" "${MODEL[@]}" "${RECIPE[@]}" "${ON[@]}" \
    --max-update "$UPDATES" --save-dir "$dir" "$@"
}

train_two_ranks() {  # train_two_ranks SAVE_DIR [extra flags]: 2 gloo ranks on this one device
  local dir=$1 port pids=() rc=0
  shift
  port=$(free_port)
  mkdir -p "$dir"
  for r in 0 1; do
    t "$BIN/fairseq-train" "$DATA" "${TASK[@]}" "${MODEL[@]}" "${RECIPE[@]}" "${ON[@]}" \
      --max-update "$EP_UPDATES" --save-dir "$dir" --distributed-world-size 2 \
      --distributed-rank "$r" --distributed-backend gloo --distributed-no-spawn \
      --distributed-init-method "tcp://127.0.0.1:$port" --device-id 0 \
      --ddp-backend legacy_ddp --validate-interval-updates "$((EP_UPDATES / 2))" "$@" \
      >"$dir/rank$r.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  cat "$dir/rank0.log"
  [ $rc -eq 0 ] || { tail -n 30 "$dir/rank1.log"; return $rc; }
}

# same_loss LOG CHECKPOINT [fairseq-validate flags]: fairseq-validate = the last logged loss
same_loss() {
  local logged got
  logged=$(valid_losses "$1" | awk '{print $NF}')
  [ -n "$logged" ] || { note "no valid loss in $1"; return 1; }
  t "$BIN/fairseq-validate" "$DATA" "${TASK[@]}" --path "$2" --valid-subset valid \
    --max-tokens 4096 --num-workers 0 "${ON[@]}" "${@:3}" >"$2.validate.log" 2>&1 \
    || { cat "$2.validate.log"; return 1; }
  got=$(valid_losses "$2.validate.log")
  got=${got##* }
  [ -n "$got" ] || { cat "$2.validate.log"; note "no loss from fairseq-validate"; return 1; }
  "$PY" -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(abs(a - b) > 0.02)" \
    "$logged" "$got" || { note "logged $logged, fairseq-validate $got"; return 1; }
  note "logged $logged = fairseq-validate $got"
}

# compare_hyps A B: fairseq-generate outputs -> "N of M identical"; exit 1 unless all are
compare_hyps() {
  "$PY" - "$1" "$2" <<'EOF'
import sys
def hyps(path):
    out = {}
    for line in open(path, errors="replace"):
        if line.startswith("H-"):
            key, _score, *hyp = line.rstrip("\n").split("\t")
            out[int(key[2:])] = hyp[0] if hyp else ""
    return out
a, b = hyps(sys.argv[1]), hyps(sys.argv[2])
assert a and a.keys() == b.keys(), f"{len(a)} vs {len(b)} hypotheses"
same = sum(a[i] == b[i] for i in a)
print(f"{same} of {len(a)} hypotheses identical")
sys.exit(0 if same == len(a) else 1)
EOF
}

# --- steps --------------------------------------------------------------------------------------
step_env() {
  "$PY" - "$DEVICE" <<'EOF'
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, devices "
      f"{torch.cuda.device_count()}")
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA device"
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: "
          f"{torch.cuda.is_bf16_supported()}")
import ctranslate2
n = ctranslate2.get_cuda_device_count()
print(f"ctranslate2 {ctranslate2.__version__}: {n} CUDA device(s)")
assert device == "cpu" or n > 0, "CTranslate2 sees no CUDA device (a CPU-only wheel?)"
EOF
  note "$(tail -n 3 "$WORK/logs/env.log" | tr '\n' ' ')"
}

step_data() {
  if [ "$DATA_KIND" = multi30k ]; then
    t "$PY" scripts/prepare_multi30k.py --multi30k-dir "$M30K" --out "$WORK/multi30k" \
      --train-size "$TRAIN_SIZE" --workers 4
  else
    "$PY" - "$WORK/tiny" "$TRAIN_SIZE" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_data import make_tiny_data
root = Path(sys.argv[1])
if not (root / "bin" / "dict.en.txt").exists():
    make_tiny_data(root, train_size=int(sys.argv[2]), valid_size=200)
EOF
  fi
  need "$DATA" "$SRC_TEXT"
  note "$DATA_KIND data in $DATA ($(wc -l <"$SRC_TEXT") test sentences per language)"
}

step_train() {  # step_train NAME precision-flags...
  local name=$1
  shift
  need "$DATA"
  rm -rf "${WORK:?}/$name" && mkdir -p "$WORK/$name"  # a fresh run, never a resumed one
  train "$WORK/$name" "$@" | tee "$WORK/$name/train.log"
  local result
  result=$(check_training "$WORK/$name/train.log" "$WORK/$name/checkpoint_last.pt")
  note "$result"
}

step_validate() {  # step_validate NAME fairseq-validate-precision-flags...
  local name=$1
  shift
  need "$WORK/$name/checkpoint_last.pt"
  same_loss "$WORK/$name/train.log" "$WORK/$name/checkpoint_last.pt" "$@"
}

step_prune() {
  local name
  for name in fp16 amp; do
    need "$WORK/$name/checkpoint_last.pt"
    t "$BIN/taskmoe-prune" "$WORK/$name/checkpoint_last.pt" --lang-pair "$PAIR" \
      --output "$WORK/$name/$PAIR.pt" --force
  done
  local log=$WORK/logs/prune.log
  note "$(grep -m1 '^serves' "$log"); $(grep -m1 '^parameters' "$log")"
}

# step_generate RUN MODE STRICT [flags]: fairseq-generate full and pruned (gen.CKPT.MODE.txt);
# differing hypotheses FAIL when STRICT is 1, else WARN (counted)
step_generate() {
  local run=$1 mode=$2 strict=$3 ckpt result rc=0
  shift 3
  need "$WORK/$run/checkpoint_last.pt" "$WORK/$run/$PAIR.pt"
  for ckpt in checkpoint_last "$PAIR"; do
    t "$BIN/fairseq-generate" "$DATA" "${TASK[@]}" "${GEN[@]}" "${ON[@]}" "$@" \
      --path "$WORK/$run/$ckpt.pt" >"$WORK/$run/gen.$ckpt.$mode.txt"
    tail -n 1 "$WORK/$run/gen.$ckpt.$mode.txt"
  done
  result=$(compare_hyps "$WORK/$run/gen.checkpoint_last.$mode.txt" \
           "$WORK/$run/gen.$PAIR.$mode.txt") || rc=$?
  result="full vs pruned $PAIR ($mode): $result, $(grep -m1 -o 'BLEU4 = [0-9.]*' \
          "$WORK/$run/gen.$PAIR.$mode.txt" || echo no BLEU)"
  note "$result"
  [ $rc -eq 0 ] || [ "$strict" = 1 ] || warn "$result"
  [ $rc -eq 0 ]
}

step_ct2() {  # step_ct2 COMPUTE_TYPE MIN_SHARE: export (once), translate, compare
  local out=$WORK/amp/$PAIR.ct2 result
  need "$WORK/amp/checkpoint_last.pt" "$WORK/amp/gen.$PAIR.fp32.txt"
  if [ ! -f "$out/model.bin" ]; then
    t "$BIN/taskmoe-export" "$WORK/amp/checkpoint_last.pt" --lang-pair "$PAIR" \
      --format ctranslate2 --data "$DATA" "${SPM[@]}" --quantization float32 --output "$out" \
      --force
  fi
  result=$(t "$PY" - "$out" "$CT2_DEVICE" "$1" "$2" "$SRC_TEXT" \
           "$WORK/amp/gen.$PAIR.fp32.txt" <<'EOF'
import sys, time
from fairseq_taskmoe.ct2 import load_ct2_translator
out, device, compute_type, min_share, src_text, gen = sys.argv[1:]
mt = load_ct2_translator(out, device=device, compute_type=compute_type)
source = open(src_text).read().splitlines()
start = time.perf_counter()
ct2 = mt.translate(source, beam=4, max_batch_size=64)
seconds = time.perf_counter() - start
want = {}
for line in open(gen, errors="replace"):
    if line.startswith("H-"):
        key, _score, *hyp = line.rstrip("\n").split("\t")
        want[int(key[2:])] = hyp[0] if hyp else ""
same = sum(ct2[i] == want.get(i) for i in range(len(ct2)))
share = same / len(ct2)
print(f"CTranslate2 {device} {compute_type}: {same} of {len(ct2)} identical to the pruned "
      f"fairseq hypotheses ({len(ct2) / seconds:.0f} sentences/s)")
sys.exit(0 if share >= float(min_share) else 1)
EOF
) || { note "$result (below $2)"; return 1; }
  note "$result"
}

step_ep_train() {  # step_ep_train NAME extra flags...: 2 gloo ranks on this device
  local name=$1
  shift
  need "$DATA"
  rm -rf "${WORK:?}/$name" && mkdir -p "$WORK/$name"  # a fresh run, never a resumed one
  train_two_ranks "$WORK/$name" "$@" | tee "$WORK/$name/train.log"
  local prefix=$WORK/$name/checkpoint_last result
  [ -f "$prefix-shared.pt" ] || [ -f "$prefix.pt" ]
  result=$(check_training "$WORK/$name/train.log" "$prefix")
  note "$result"
}

step_ep_compare() {  # sharded vs replicated experts: same valid loss; consolidated validates
  need "$WORK/ep_fp16/checkpoint_last-shared.pt" "$WORK/ep_fp16_replicated/checkpoint_last.pt"
  local a b
  a=$(valid_losses "$WORK/ep_fp16/train.log" | awk '{print $NF}')
  b=$(valid_losses "$WORK/ep_fp16_replicated/train.log" | awk '{print $NF}')
  "$PY" -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(abs(a - b) > 0.05)" "$a" "$b" \
    || { note "sharded $a vs replicated $b"; return 1; }
  t "$BIN/taskmoe-consolidate" "$WORK/ep_fp16/checkpoint_last" \
    --output "$WORK/ep_fp16/consolidated.pt" --force
  same_loss "$WORK/ep_fp16/train.log" "$WORK/ep_fp16/consolidated.pt" "${FP16[@]}" \
    || { note "sharded $a, replicated $b; consolidated: $(cat "$DETAIL")"; return 1; }
  note "sharded $a = replicated $b; consolidated: $(cat "$DETAIL")"
}

step_ep_nccl() {
  local gpus
  gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
  [ "$DEVICE" = cuda ] && [ "$gpus" -ge 2 ] \
    || skip "needs 2 GPUs ($gpus here): NCCL cannot put two ranks on one GPU (ep_* used gloo)"
  local dir=$WORK/ep_nccl result
  rm -rf "$dir"
  # fairseq's own multi-GPU launch: one process per GPU (spawn), NCCL
  CUDA_VISIBLE_DEVICES=0,1 t "$BIN/fairseq-train" "$DATA" "${TASK[@]}" "${MODEL[@]}" \
    "${RECIPE[@]}" --max-update "$EP_UPDATES" --save-dir "$dir" --distributed-world-size 2 \
    --ddp-backend legacy_ddp --fp16 --fp16-no-flatten-grads | tee "$dir.log"
  result=$(check_training "$dir.log" "$dir/checkpoint_last")
  note "$result"
}

# --- run ----------------------------------------------------------------------------------------
echo "GPU check: device $DEVICE, work dir $WORK, $UPDATES updates" \
  "(expert parallel: $EP_UPDATES)" >&2
run_step env step_env
if [ "$DEVICE" = cuda ] && ! grep -q "^GPU:" "$WORK/logs/env.log"; then
  echo "no CUDA device: nothing to check (GPU_CHECK_DEVICE=cpu runs a CPU smoke test)" >&2
  exit 2
fi
run_step data step_data
run_step train_fp16 step_train fp16 "${FP16[@]}"
run_step validate_fp16 step_validate fp16 "${FP16[@]}"
run_step train_amp step_train amp "${AMP[@]}"
run_step validate_amp step_validate amp  # fp32: fairseq validates --amp runs without autocast
run_step prune step_prune
run_step gen_fp32 step_generate amp fp32 1
if [ "$DEVICE" = cuda ]; then  # fp16 differences are counted, not fatal
  run_step gen_fp16 step_generate fp16 fp16 0 --fp16
fi
run_step ct2_cuda step_ct2 float32 "$CT2_MIN"
if [ "$DEVICE" = cuda ]; then
  run_step ct2_cuda_fp16 step_ct2 float16 0.80
fi
run_step ep_fp16 step_ep_train ep_fp16 "${EP_FP16[@]}"
run_step ep_fp16_repl step_ep_train ep_fp16_replicated "${EP_FP16[@]}" --moe-expert-parallel off
run_step ep_compare step_ep_compare
run_step ep_amp step_ep_train ep_amp "${AMP[@]}" --moe-record-a2a-time
run_step ep_nccl step_ep_nccl

# --- summary ------------------------------------------------------------------------------------
{
  echo
  echo "GPU check summary ($DEVICE, $((SECONDS - START)) s, logs in $WORK/logs)"
  printf '%-14s %-5s %5s  %s\n' step result time detail
  printf '%s\n' "${ROWS[@]}"
  [ $FAILED -eq 0 ] && echo "all checks passed" || echo "SOME CHECKS FAILED"
} | tee "$WORK/summary.txt"
exit $FAILED
