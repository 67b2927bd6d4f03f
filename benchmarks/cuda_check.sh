#!/usr/bin/env bash
# The CUDA checks, as one script for a lent GPU machine (a few minutes on an H100).
#
#   MODELSEL_DATA_ROOT=... bash benchmarks/cuda_check.sh OUTDIR
#
# 0. the CUDA-only tests (stacked vs sequential, CUDA-graph steps vs eager steps);
# 1. engine_probe.py on CUDA: sequential vs stacked without and with its CUDA graph (and
#    TF32) for the 5 fold models of the D2L MLP at batch 64 and 256, then 40 members at
#    batch 256 (8 stacked sweep trials x 5 folds);
# 2. run_all.py --device cuda: the benchmark grid through the modelsel CLI, whole processes;
# 3. the quickstart study with `device: auto` (it must pick the GPU);
# 4. the test suite with a GPU present (the CUDA-only test runs; server tests are left out).
# Logs go to OUTDIR; each step has its own time limit so one hang does not cost the rest.
set -u
out=${1:?usage: cuda_check.sh OUTDIR}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
step() { echo "=== $(date +%T) $*"; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c 'import sys, torch, optuna, sklearn, modelsel; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "optuna", optuna.__version__, "sklearn", sklearn.__version__)'
  nproc; } 2>&1 | tee "$out/environment.txt"
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || { echo "no CUDA device: stop"; exit 1; }

step CUDA-only tests
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_stacked.py -k cuda 2>&1 | tee "$out/pytest_cuda.log" | tail -15

step engine probe, 5 fold models
timeout 120 python3 "$here/engine_probe.py" --device cuda --case d2l-b64 --case d2l-b256 --repeats 3 \
    --engines sequential,stacked-eager,stacked,stacked+tf32 --json 2>&1 | tee "$out/probe.log"
step engine probe, 40 members
timeout 80 python3 "$here/engine_probe.py" --device cuda --case d2l-b256 --repeats 2 --members 40 \
    --engines sequential,stacked-eager,stacked --json 2>&1 | tee -a "$out/probe.log"

step benchmark grid on CUDA
timeout 150 python3 "$here/run_all.py" --device cuda --only modelsel-1w,modelsel-stacked \
    --quiet-wait 0 --out "$out/results_cuda.md" --log-dir "$out/grid" 2>&1 | tee "$out/grid.log"
cp "$out"/grid/*/results.json "$out/results_cuda.json" 2>/dev/null
rm -rf "$out/grid"

step quickstart with device auto
work=$(mktemp -d)
started=$SECONDS
( cd "$work" && timeout 60 python3 -c 'from modelsel.cli import entry_point; entry_point()' \
    study run "$here/../studies/quickstart.yaml" --storage "sqlite:///$work/q.db" --output "$work/out" --quiet ) 2>&1 | tail -5
echo "quickstart wall $((SECONDS - started)) s" | tee -a "$out/grid.log"
grep -o "trained on [^<]*" "$work"/out/*/report.html | tee -a "$out/grid.log"
python3 - "$work/q.db" <<'PY' 2>&1 | tee -a "$out/grid.log"
import sys, optuna
for s in optuna.get_all_study_summaries(f"sqlite:///{sys.argv[1]}"):
    study = optuna.load_study(study_name=s.study_name, storage=f"sqlite:///{sys.argv[1]}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    devices = {t.user_attrs.get("device") for t in study.trials}
    print("quickstart:", s.study_name, len(study.trials), "trials,", len(done), "complete, device attrs", devices,
          "best", study.best_value if done else None)
PY

step tests with a GPU present
timeout 150 python3 -m pytest -q -n 8 -m "not server" -p no:cacheprovider tests 2>&1 | tee "$out/pytest.log" | tail -25
step done
