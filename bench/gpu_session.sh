#!/usr/bin/env bash
# One GPU session, everything in one go: the GPU tests, the GPU benchmark, the MPI-on-a-GPU checks.
#
# Meant for the device machine (one H200, 15 minutes of device time in all, a start included),
# run from the repository root as ONE call:
#
#     run(command="bash bench/gpu_session.sh", carry=["gpu-carry"], timeout_s=600)
#
# Steps, in this order, each bounded by `timeout` and run even when an earlier one failed:
#   env      nvidia-smi, Python/NumPy/CuPy/PyTorch/mpi4py versions, mpiexec    (≤ 30 s)
#   pytest   python -m pytest -m gpu -q -rA tests   (first: correctness matters most)  (≤ 180 s)
#   bench    python bench/bench_gpu.py --json $OUT/bench_gpu.json --budget-s 200      (≤ 240 s)
#   mpi      a short Fashion-MNIST job on the GPU: 1 MPI rank, 2 ranks `allreduce`, 2 ranks
#            `central` (the 2 ranks share the GPU), then max |ΔΘ| between their final
#            checkpoints                                                              (≤ 90 s)
# Worst case ~9 min; on a healthy H200 about 5. Everything lands in $OUT (default
# /tmp/gpu-out): summary.txt (each step's exit code and seconds, "TIMED OUT" for a step that
# ran out of time, the pytest tally, the bench's failure line, the ΔΘ lines), env.log,
# pytest.log, pytest-junit.xml, bench.log, bench_gpu.json, mpi.log: 7 files, within the
# device tool's 8 that come back. LIMIT_PYTEST, LIMIT_BENCH and LIMIT_MPI (seconds) override
# the step limits (the bench's own --budget-s is its limit less 40 s); MPI_GPU=false runs the
# MPI checks on the CPU (a dry run of their plumbing: `OUT=/tmp/x MPI_GPU=false bash
# bench/gpu_session.sh --mpi-checks`).
#
# The carried folder. The GPU machine has no Fashion-MNIST and no network. Before the call,
# once, in the repository root on this machine:
#
#     grep -qx '/gpu-carry/' .git/info/exclude 2>/dev/null || echo '/gpu-carry/' >> .git/info/exclude
#     mkdir -p gpu-carry/fashion-mnist
#     cp /usr/share/datasets/fashion-mnist/*-ubyte.gz gpu-carry/fashion-mnist/   # 4 files, 30 MB
#     mkdir -p gpu-carry/wheels && cd gpu-carry/wheels
#     pip download --no-deps pytest pluggy iniconfig packaging pygments exceptiongroup tomli
#     for v in 310 311 312 313; do pip download --no-deps --only-binary=:all: --python-version $v \
#         --platform manylinux2014_x86_64 pyyaml; done                            # 4 MB
#
# (the device machine has NumPy, numba, CuPy, PyTorch and mpi4py, maybe not PyYAML or pytest;
# the GPU tests use Fashion-MNIST only, so scikit-learn is not needed there)
#
# and name "gpu-carry" in the run's carry. When /usr/share/datasets/fashion-mnist lacks the
# files, this script sets DISTFFN_DATA=<repo>/gpu-carry (distffn reads $DISTFFN_DATA/fashion-mnist).
# distffn is not installed there: PYTHONPATH is the repository. Python is $PY (default python3,
# the one that holds PyTorch on the device machine).
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-/tmp/gpu-out}
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$REPO" || exit 1
mkdir -p "$OUT"

# ---------------------------------------------------------------- the MPI checks (run as a step)
mpi_checks() {
    # Open MPI refuses root without these; the device machine runs commands as root
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    if ! command -v mpiexec >/dev/null; then     # Open MPI beside mpi4py's library, if not on PATH
        local found
        found=$(timeout 10 find /usr /opt "$(dirname "$(command -v "$PY")")/.." -name mpiexec -type f \
                -perm -u+x 2>/dev/null | head -1)
        [ -n "$found" ] && export PATH="$(dirname "$found"):$PATH"
    fi
    echo "mpiexec: $(command -v mpiexec || echo 'not found')"
    local tmp job rc=0
    tmp=$(mktemp -d /tmp/gpu-mpi.XXXXXX)
    job=(jobs/fashion-mnist-mlp.yaml --set training.epochs=1 --set data.limit_train=4096
         --set training.batch_size=256 --set scaling.use_gpu="${MPI_GPU:-true}" --set scaling.backend=mpi --no-progress)
    for cfg in "1 allreduce" "2 allreduce" "2 central"; do
        set -- $cfg
        local name="n$1-$2" t0 r
        t0=$(date +%s)
        echo "=== $name: python -m distffn run ${job[*]} --set scaling.num_workers=$1 --set scaling.aggregation=$2"
        timeout -k 3 25 "$PY" -m distffn run "${job[@]}" --set scaling.num_workers="$1" \
            --set scaling.aggregation="$2" --out "$tmp/$name" 2>&1 | tee "$tmp/$name.log"
        r=${PIPESTATUS[0]}
        [ "$r" -eq 0 ] || rc=$r
        printf '  mpi %-12s exit %3s  %4ss%s\n' "$name" "$r" "$(( $(date +%s) - t0 ))" \
            "$({ [ "$r" -eq 124 ] || [ "$r" -eq 137 ]; } && echo '  TIMED OUT (25 s)')" >> "$SUMMARY"
        if [ "$r" -ne 0 ]; then
            printf '         last line: %s\n' "$(grep -v '^\s*$' "$tmp/$name.log" | tail -1 | cut -c1-300)" >> "$SUMMARY"
        fi
    done
    timeout -k 3 12 "$PY" - "$tmp" <<'EOF' | tee -a "$SUMMARY"
import os, sys
import numpy as np
from distffn.training.checkpoint import newest_valid_checkpoint
tmp = sys.argv[1]
theta = {}
for name in ("n1-allreduce", "n2-allreduce", "n2-central"):
    found = newest_valid_checkpoint(os.path.join(tmp, name, "checkpoints"))
    if found is None:
        print(f"  mpi ΔΘ: {name}: no checkpoint")
        continue
    path, arrays, meta = found
    # Θ: the layer arrays (W0, b0, ...); the optimizer's buffers are named "<buffer>.<array>"
    theta[name] = (meta.get("step"), {k: np.asarray(v, np.float64) for k, v in arrays.items() if "." not in k})
for a, b in (("n2-allreduce", "n1-allreduce"), ("n2-central", "n1-allreduce"), ("n2-central", "n2-allreduce")):
    if a in theta and b in theta:
        (sa, ta), (sb, tb) = theta[a], theta[b]
        d = max(float(np.max(np.abs(ta[k] - tb[k]))) for k in tb)
        scale = max(float(np.max(np.abs(tb[k]))) for k in tb)
        print(f"  mpi ΔΘ: max |Θ({a}) − Θ({b})| = {d:.3e}  (max |Θ| {scale:.3g}; steps {sa} / {sb})")
EOF
    local cr=${PIPESTATUS[0]}
    [ "$cr" -eq 0 ] || rc=$cr
    rm -rf "$tmp"
    return $rc
}

if [ "${1:-}" = "--mpi-checks" ]; then
    mpi_checks
    exit $?
fi

# ---------------------------------------------------------------- step runner
# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log (also echoed), under
# `timeout LIMIT_S` (SIGKILL 10 s later), and appends "NAME exit RC SECONDS" to the summary.
step() {
    local name=$1 limit=$2 t0 t1 rc note=""
    shift 2
    echo "=== [$name] (at most ${limit} s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        note="  TIMED OUT: $name ran out of its ${limit} s"
    fi
    printf '%-8s exit %3s  %4ss%s\n' "$name" "$rc" "$((t1 - t0))" "$note" >> "$SUMMARY"
    if [ "$rc" -ne 0 ] && [ -z "$note" ]; then    # the failure's own last words
        printf '         last line: %s\n' "$(grep -v '^\s*$' "$OUT/$name.log" | tail -1 | cut -c1-300)" >> "$SUMMARY"
    fi
    echo "=== [$name] exit $rc after $((t1 - t0)) s"
    return 0
}

: > "$SUMMARY"
echo "gpu_session.sh on ${HOSTNAME:-?} at $(date -u +%FT%TZ), git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')" >> "$SUMMARY"

# Fashion-MNIST: the system folder, else the carried copy
FM=/usr/share/datasets/fashion-mnist
if ls "$FM"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    echo "data: Fashion-MNIST from $FM" >> "$SUMMARY"
elif ls "$REPO"/gpu-carry/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then
    export DISTFFN_DATA="$REPO/gpu-carry"
    echo "data: Fashion-MNIST from the carried $DISTFFN_DATA/fashion-mnist" >> "$SUMMARY"
else
    echo "data: NO Fashion-MNIST (neither $FM nor gpu-carry/fashion-mnist: carry gpu-carry, see the top of this script); the bench and MPI steps will fail" >> "$SUMMARY"
fi

# PyYAML and pytest, where the device machine lacks them: from the carried wheels into a folder
# of the checkout's own (no network there, and the system Python may refuse pip installs)
if ! "$PY" -c "import yaml, pytest" 2>/dev/null; then
    if [ -d "$REPO/gpu-carry/wheels" ]; then
        "$PY" -m pip install -q --no-index --find-links "$REPO/gpu-carry/wheels" \
            --target "$REPO/gpu-carry/site" pyyaml pytest 2>&1 | tail -3
        export PYTHONPATH="$PYTHONPATH:$REPO/gpu-carry/site"
        echo "deps: pyyaml and pytest from gpu-carry/wheels" >> "$SUMMARY"
    else
        echo "deps: PyYAML or pytest MISSING and no gpu-carry/wheels (see the top of this script)" >> "$SUMMARY"
    fi
fi

step env 30 bash -c '
    nvidia-smi || echo "nvidia-smi: not available"
    "$0" -c "
import sys, platform
print(\"python\", sys.version.split()[0], platform.platform())
for mod in (\"numpy\", \"cupy\", \"torch\", \"numba\", \"mpi4py\", \"pytest\", \"yaml\"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, \"__version__\", \"?\"))
    except Exception as e:
        print(mod, \"MISSING:\", type(e).__name__, e)
try:
    import torch
    print(\"torch CUDA\", torch.version.cuda, \"available\", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")
except Exception as e:
    print(\"torch CUDA: \", e)
try:
    import cupy
    print(\"cupy CUDA runtime\", cupy.cuda.runtime.runtimeGetVersion(), \"driver API\", cupy.cuda.runtime.driverGetVersion())
except Exception as e:
    print(\"cupy CUDA: \", type(e).__name__, e)
try:
    from mpi4py import MPI
    print(\"MPI library:\", MPI.Get_library_version().splitlines()[0])
except Exception as e:
    print(\"mpi4py MPI: \", type(e).__name__, e)
"
    echo "mpiexec: $(command -v mpiexec || echo "not on PATH")"; mpiexec --version 2>&1 | head -2
' "$PY"

step pytest "${LIMIT_PYTEST:-180}" "$PY" -m pytest -m gpu -q -rA tests/gpu tests/optim/test_momentum.py \
    -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest-junit.xml"
tally=$(grep -E '^=*.*[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran' "$OUT/pytest.log" | tail -1)
printf '         pytest: %s\n' "${tally:-no tally (pytest did not finish)}" >> "$SUMMARY"

step bench "${LIMIT_BENCH:-240}" "$PY" bench/bench_gpu.py --json "$OUT/bench_gpu.json" \
    --budget-s "$(( ${LIMIT_BENCH:-240} - 40 ))"

step mpi "${LIMIT_MPI:-90}" bash "$REPO/bench/gpu_session.sh" --mpi-checks

late=$(grep -o 'TIMED OUT: [a-z]*' "$SUMMARY" | sed 's/TIMED OUT: //' | tr '\n' ' ')
echo "ran out of time: ${late:-none}" >> "$SUMMARY"
echo
echo "==================== summary ($SUMMARY)"
cat "$SUMMARY"
