#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one H100/H200 with no network, using that machine's PyTorch.
#
#   benchmarks/gpu_check.sh --fetch    # here, with the package registries: download the missing wheels into .whl/
#   benchmarks/gpu_check.sh            # on the GPU machine (.whl/ carried along): install them, run every check
#   benchmarks/gpu_check.sh --cpu      # tiny sizes on CPU: encoder, step, data, strategy (a slow test runs it;
#                                      # memory.py runs in tests/swinv2/test_sequential_memory.py)
#
# Steps, all logged to gpu_check.log in $OUT (or benchmarks/results/gpu_check_<date>/): the CUDA tests; 100 steps of
# `python -m simmim.pretrain` on the GPU in bf16 (its log has train/data_wait_ms); the encoder against timm and
# transformers (SwinV2-B, 192 px, batch 128, bf16); the whole pretraining step against the same peers, with and without
# torch.compile (pretrain_step.md); the data pipelines against torchvision and timm with 4 and 8 workers, pinned
# (dataloader.md); DDP against FSDP on the one GPU; the memory table up to 1536 px.
# A failing step is reported and the next one still runs; the exit code counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --fetch) MODE=fetch ;;
  "") ;;
  *) echo "usage: $0 [--cpu | --fetch]" >&2; exit 2 ;;
esac

# What the GPU image lacks (it has torch, timm, Lightning, transformers, OpenCV, numpy, scipy, PyYAML), pinned as
# requirements.txt pins them, for its Python 3.12.
WHEELS="albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 pydantic==2.14.4
pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 omegaconf==2.4.0 jsonargparse==4.53.0
docstring-parser==0.18.0 typeshed-client==2.15.0"

if [ "$MODE" = fetch ]; then
  mkdir -p .whl
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d .whl "$w" || exit 1
  done
  ls .whl
  exit 0
fi

export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "$MODE" = gpu ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
OUTDIR=${OUT:-benchmarks/results/gpu_check_$(date +%F)}
mkdir -p "$OUTDIR"
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT  # also when the check stops early or is interrupted
FAILED=0

LOG="$OUTDIR/gpu_check.log"  # one file: the device tool brings back at most 8
: >"$LOG"

step() {  # step NAME COMMAND...: run it, append its output to the log, print its tail, time and status
  local name=$1; shift
  local t0=$SECONDS part
  part=$(mktemp)
  echo "== $name: $*" | tee -a "$LOG"
  "$@" >"$part" 2>&1
  local rc=$?
  cat "$part" >>"$LOG"
  grep -v -i "warn" "$part" | tail -n 20
  rm -f "$part"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
  [ $rc -eq 0 ] || FAILED=$((FAILED + 1))
}

if [ "$MODE" = gpu ]; then
  ACCEL=(--trainer.accelerator gpu --trainer.devices 1)
  PRETRAIN=(--trainer.max_steps 100 --trainer.precision bf16-mixed --data.num_workers 8)
  ENCODER=(--model swinv2_base --img-size 192 --window 12 --batch 128 --dtypes bf16 --rounds 10 --device cuda)
  IMPLS=(ours timm transformers)
  STEP=(--device cuda --models swinv2_base --dtypes bf16 --rounds 10
        --impls ours ours+compile timm timm+compile transformers)
  LOADER=(--workers 4 8 --pin_memory)
  STRATEGY_STEPS=(--trainer.max_steps 30 --trainer.precision bf16-mixed)
  MEMORY=(--device cuda --precision bf16 --sizes 192 384 768 1536)
  STRATEGIES=(ddp zero1 fsdp2)
else
  ACCEL=(--trainer.accelerator cpu --trainer.devices 1)
  TINY=(--data.img_size 32 --data.mask_patch_size 8 --data.batch_size 4 --trainer.precision 32
        --model.encoder_kwargs '{"embed_dim": 24, "depths": [2, 2], "num_heads": [2, 4]}')
  ENCODER=(--model swinv2_tiny --img-size 64 --window 4 --batch 2 --dtypes fp32 --rounds 1 --device cpu --no-memory)
  IMPLS=(ours timm transformers)
  STEP=(--device cpu --models swinv2_tiny --img-size 64 --window 4 --batch 2 --dtypes fp32 --rounds 1 --no-memory)
  LOADER=(--count 8 --passes 1 --workers 1 --batch 4 --epochs 1)
  STRATEGY_STEPS=(--trainer.max_steps 2 --data.num_workers 0 --trainer.limit_val_batches 1 "${TINY[@]}")
  STRATEGIES=(fsdp2)  # the loop is the same for every name; DDP runs in the test suite
fi

{ date; uname -a; } 2>&1 | tee -a "$LOG"
if [ "$MODE" = gpu ]; then  # (the CPU mode skips what its other steps already run: the CLI, the imports)
  $PY -c "import torch, timm, pytorch_lightning as pl; print('torch', torch.__version__, 'timm', timm.__version__,
'lightning', pl.__version__, 'cuda', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
  step cuda_tests $PY -m pytest -q -m gpu -p no:cacheprovider tests
  step pretrain $PY -m simmim.pretrain "${ACCEL[@]}" "${PRETRAIN[@]}" --trainer.default_root_dir "$RUNS/pretrain"
fi
step encoder $PY benchmarks/encoder.py "${ENCODER[@]}" --impls "${IMPLS[@]}"
step pretrain_step $PY benchmarks/pretrain_step.py "${STEP[@]}" --out "$OUTDIR/pretrain_step.md"
step dataloader $PY benchmarks/dataloader.py "${LOADER[@]}" --out "$OUTDIR/dataloader.md"
for s in "${STRATEGIES[@]}"; do
  step "strategy_$s" $PY -m simmim.pretrain "${ACCEL[@]}" "${STRATEGY_STEPS[@]}" --trainer.strategy "$s" \
    --trainer.default_root_dir "$RUNS/$s"
done
if [ "$MODE" = gpu ]; then
  step memory $PY benchmarks/memory.py "${MEMORY[@]}" --out "$OUTDIR/memory.md"
fi
echo "gpu_check ($MODE): $FAILED step(s) failed; logs in $OUTDIR"
exit $FAILED
