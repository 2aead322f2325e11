#!/usr/bin/env bash
# One lent-GPU call that runs every single-GPU check and benchmark not covered by bench_sweep.py:
# the GPU-marked tests (all but the long sweep-kernel file), the QAT step overhead (issue 4), the
# recalibration overhead over the bare kernel (issue 5), ModelOpt's export bytes (issue 7) and the
# GPU recipe's throughput (issue 6). Each step is time-boxed and logs to $OUT/<step>.log, so one
# slow step cannot take the others down. Run from the repository root, wheels carried in .whl/:
#   bash benchmarks/gpu_session.sh                 # every step
#   bash benchmarks/gpu_session.sh qat_step gpu_tests   # only the steps named
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
# The configs map to nvfp4_qat.conf only in an installed package: install it (no deps, offline).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/pkg . \
  && export PYTHONPATH=/tmp/site:/tmp/pkg || echo "package install failed; using src/"
# At most 8 files come back from $OUT: 6 logs, the recipe's summary and plot.

WANT=" $* "
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  if [ "$WANT" != "  " ] && [[ "$WANT" != *" $name "* ]]; then return; fi
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $(( $(date +%s) - t0 )) s"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step qat_step 90 python3 benchmarks/bench_qat_step.py --configs
step qat_step_gelu 60 python3 benchmarks/bench_qat_step.py --mlp gelu --configs
step recalibration 90 python3 benchmarks/bench_recalibration.py
step gpu_tests 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests --ignore=tests/test_sweep_triton.py
step modelopt_export 60 python3 benchmarks/check_modelopt_export.py
step sweep_tests 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sweep_triton.py -k "not every_s2_mantissa"
step gpu_recipe 130 python3 -m nvfp4_qat recipe=gpu stages.fp.steps=150 stages.qat.steps=200 \
  trainer.val_check_interval=100 trainer.limit_val_batches=5 trainer.enable_progress_bar=false \
  hydra.run.dir=/tmp/gpu_recipe_run  # the command behind BENCHMARKS.md's GPU recipe figures
cp /tmp/gpu_recipe_run/summary.txt /tmp/gpu_recipe_run/nvfp4_qat.png "$OUT/" 2>/dev/null
exit 0
