#!/usr/bin/env bash
# What a lent GPU machine runs, step by step: bash bench/gpu_session.sh STEP...
#
#   env        the GPU, driver, torch, triton
#   build      the extension in place for this GPU's architecture, then `vpfast info`
#   gpu        the gpu test tier (compose, token_mix CUDA kernels, torch.compile, CUDA graphs)
#   suite      every other tier on this machine's torch (xdist), a check that nothing depends on torch 2.14
#   bench-mix  bench/test_token_mix_bench.py      bench-compose  bench/test_compose_bench.py
#   bench-evp  bench/test_evp_step_bench.py       wheel          the gpu tier against dist/*.whl, outside the tree
#   bench-host bench/test_host_overhead_bench.py  (host time per call: checks, dispatch, autograd, launches)
#   bench-transform  the compose cases with the per-sample transform, vpfast only (to compose-transform-vpfast.json)
#   bench-train  bench/test_train_bench.py (the real `vpfast train` loop against released/eager/floor, per method)
#   wheels     (here, before a lease: PIP_PY=.venv/bin/python) the wheels the machine lacks, into .whl/:
#              open_clip_torch at the installed version, ftfy, wcwidth; pass .whl to the device tool's carry
#   lease      what one 15-minute lease runs, in <= 8 minutes of wall time: env, build, gpu, bench-evp, bench-train
#              with tighter limits (open_clip, ftfy and wcwidth must travel as wheels in .whl/)
#   lease-kernels  the same budget for the kernels' targets (issue 18): env, build, gpu, then compose at B=256 and
#              1024 (vpfast, and eager without the per-sample loop) and token_mix, with the copy bandwidth
#
# Each step has its own time limit and log; logs and bench/results/*.json land in $OUT (default
# /tmp/vpfast-gpu). Python packages the machine lacks travel as wheels in .whl/ (installed first).
set -uo pipefail
OUT=${OUT:-/tmp/vpfast-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=python3
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
PYTEST=($PY -m pytest -p no:cacheprovider -q)
MARK=$(mktemp)  # results written after this are copied to $OUT

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, report the status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    tail -n 25 "$OUT/$name.log"
}

gpu_files() {  # the gpu tier's files, the kernels' first: the step tests compile models, so a short limit cuts them
    local first=(tests/test_compose_gpu.py tests/test_token_mix_gpu.py)
    echo "${first[@]}" $(grep -l "mark.gpu" tests/test_*.py | grep -v -e test_compose_gpu -e test_token_mix_gpu)
}

lease_start() {  # lease_start [MODULE]: what both leases begin with (env, MODULE imported too, build, gpu tier)
    step env 15 bash -c "nvidia-smi -L; $PY -c 'import torch${1:+, $1}; print(torch.__version__)'"
    step build 100 bash -c "TORCH_CUDA_ARCH_LIST=\$($PY -c 'import torch; print(\"%d.%d\" % \
torch.cuda.get_device_capability())') $PY -m pip install -q --no-build-isolation --no-deps -e ."
    step gpu 60 "${PYTEST[@]}" -m gpu --durations=15 $(gpu_files)
}

for name in "$@"; do
    case $name in
        wheels) ${PIP_PY:-$PY} -m pip download -q --no-deps --only-binary=:all: -d .whl \
                "open_clip_torch==$(${PIP_PY:-$PY} -c 'import open_clip; print(open_clip.__version__)')" ftfy wcwidth \
            && ls .whl ;;
        env) step env 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, torch.version.cuda, \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'" ;;
        build) step build 400 bash -c "TORCH_CUDA_ARCH_LIST=\$($PY -c 'import torch; print(\"%d.%d\" % \
torch.cuda.get_device_capability())') $PY -m pip install --no-build-isolation --no-deps -e . && $PY -m vpfast info" ;;
        gpu) step gpu 400 "${PYTEST[@]}" -m gpu tests ;;
        suite) step suite 400 "${PYTEST[@]}" -m "not gpu and not aot" -n 8 tests ;;
        bench-mix) step bench-mix 500 "${PYTEST[@]}" bench/test_token_mix_bench.py ;;
        bench-compose) step bench-compose 550 "${PYTEST[@]}" bench/test_compose_bench.py ;;
        bench-evp) step bench-evp 400 "${PYTEST[@]}" bench/test_evp_step_bench.py ;;
        bench-train) step bench-train 300 "${PYTEST[@]}" bench/test_train_bench.py ;;
        lease) lease_start open_clip
            step bench-evp 60 "${PYTEST[@]}" bench/test_evp_step_bench.py
            step bench-train 240 "${PYTEST[@]}" bench/test_train_bench.py ;;
        lease-kernels) lease_start
            step bench-compose 180 "${PYTEST[@]}" bench/test_compose_bench.py \
                -k "(vpfast or (eager and plain)) and (256 or 1024)"
            step bench-mix 120 "${PYTEST[@]}" bench/test_token_mix_bench.py ;;
        bench-host) step bench-host 120 "${PYTEST[@]}" bench/test_host_overhead_bench.py ;;
        bench-transform) step bench-transform 300 "${PYTEST[@]}" bench/test_compose_bench.py -k "transform and vpfast"
            mv bench/results/compose-*.json "$OUT/compose-transform-vpfast.json" ;;
        wheel) step wheel 400 bash -c "$PY -m pip install -q --no-deps --no-compile --target /tmp/wheel dist/*.whl \
&& cp -r tests /tmp/wheel-tests && cd /tmp && PYTHONPATH=/tmp/wheel:\${PYTHONPATH:-} $PY -m vpfast info \
&& PYTHONPATH=/tmp/wheel:\${PYTHONPATH:-} ${PYTEST[*]} -m gpu --rootdir /tmp/wheel-tests /tmp/wheel-tests" ;;
        *) echo "unknown step $name" >&2; exit 2 ;;
    esac
    find bench/results -name "*.json" -newer "$MARK" -exec cp {} "$OUT"/ \;
done
