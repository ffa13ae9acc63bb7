#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in phases that each fit one 10-minute device call.
#
#   bench/tools/gpu_session.sh tests       # every gpu-marked test (about 2-3 minutes on an H100)
#   bench/tools/gpu_session.sh overhead    # eager-step host-time breakdown and the threshold split sweep (~2 minutes)
#   bench/tools/gpu_session.sh bench-step  # fastddim bench --only step (3-6 minutes with the inverse, per-sample and
#                                          # backward kinds, estimated; torch.compile cases bounded)
#   bench/tools/gpu_session.sh bench-loop  # fastddim bench --only loop, unthresholded (about 6 minutes on an H100)
#   bench/tools/gpu_session.sh bench-threshold-loop  # pixel-space loops with thresholding, no compile (~1 minute)
#   bench/tools/gpu_session.sh bench-seeds # per-seed noise vs one generator, cifar10-32 b256 fp16 (~3 minutes)
#   bench/tools/gpu_session.sh eager       # diffusers' and fastddim's eager loops interleaved, then profiled (~3 min)
#   bench/tools/gpu_session.sh bench-sd    # text-to-image loops, SD1.5 architecture fp16 (about 5 minutes on an H100)
#   bench/tools/gpu_session.sh bench-sdxl  # text-to-image loops, SDXL architecture and SD1.5 in fp32 (about 4 minutes)
#   bench/tools/gpu_session.sh regression  # pytest bench/ against the committed baseline, saving this run (~2 min)
#
# Several phases run in turn in one call (e.g. `gpu_session.sh tests overhead`): a device machine goes back after
# a short idle time, so fewer, fuller calls spend less device time on starting machines.
# At most 8 files come back from one device call: bench-step and bench-loop each write up to 5 (results.json,
# results.md and plots), so they do not fit in one call together.
#
# Results go to $RESULTS (default: ${OUT:-bench-out}/<device-slug>/), ready to copy into bench/results/<device-slug>/
# (the step, loop, text-to-image and per-seed runs write separate results.json files under step/, loop/, loop-threshold/,
# sd/, sdxl/, seeds/ and eager/: merge them as the committed
# bench/results/nvidia-h100-80gb-hbm3/results.json was, see its "runs" and "notes"). The device's copy of the
# repository may carry a stale .git: results.json records `git describe --dirty`, so check the commit you sent.
# On a lent device machine (torch and Triton installed, diffusers not), with diffusers' wheel in the ignored .whl/
# folder (`pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1`) carried:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
#       && PYTHONUNBUFFERED=1 OUT=$OUT bash bench/tools/gpu_session.sh bench-sd tests
#
# The interpreter is $PYTHON (default python3: on the lent machine a plain `python3` is the one that holds PyTorch, and
# a `python` may be missing or another interpreter).
set -uo pipefail
: "${1:?usage: gpu_session.sh PHASE... (tests, overhead, eager, bench-step, bench-loop, bench-threshold-loop, bench-seeds, bench-sd, bench-sdxl, regression)}"
python=${PYTHON:-python3}
# Without a device slug every phase would fail and write beside $OUT's other runs: stop before spending device time.
slug=$("$python" -m fastddim.benchmark --print-device-slug) && [ -n "$slug" ] || {
    echo "gpu_session.sh: '$python -m fastddim.benchmark --print-device-slug' failed (is fastddim on PYTHONPATH?)" >&2
    exit 2
}
results=${RESULTS:-${OUT:-bench-out}/$slug}
mkdir -p "$results"
for phase in "$@"; do
    echo "== gpu_session.sh $phase ($(date -u +%H:%M:%S))"
    case $phase in
    tests)
        "$python" -m pytest -m gpu -p no:cacheprovider -q -rs tests 2>&1 | tee "$results/gpu_tests.txt"
        ;;
    overhead)
        "$python" bench/tools/profile_step_overhead.py 2>&1 | tee "$results/step_host_overhead.txt"
        "$python" bench/tools/threshold_split_sweep.py 2>&1 | tee "$results/threshold_split_sweep.txt"
        ;;
    bench-step)
        "$python" -m fastddim.benchmark --only step --budget-s 240 --out "$results/step" 2>&1 | tail -n 80
        "$python" bench/targets.py "$results/step/results.json"
        ;;
    bench-loop)
        "$python" -m fastddim.benchmark --only loop --loop-cases '^(?!.*thresholding)' --budget-s 420 \
            --out "$results/loop" 2>&1 | tail -n 50
        "$python" bench/targets.py "$results/loop/results.json"
        ;;
    bench-threshold-loop)
        # The thresholded step inside pixel-space loops (cifar10-32 and digits, batch 16, fp16): the scheduler's
        # share of loop time, with diffusers' loop, the eager and captured loops and the limit; no torch.compile.
        "$python" -m fastddim.benchmark --only loop --loop-cases thresholding --no-compile --no-plots \
            --out "$results/loop-threshold" 2>&1 | tail -n 20
        "$python" bench/targets.py "$results/loop-threshold/results.json"
        ;;
    bench-seeds)
        # fastddim sample --seeds 0-4095's pipeline calls (no files written) at batch 256, cifar10-32 architecture,
        # fp16, 10 and 50 steps, eta 0 and 1: seeds=[...] against one generator and against none, interleaved.
        "$python" -m fastddim.benchmark --only seeds --no-plots --out "$results/seeds" 2>&1 | tail -n 30
        "$python" bench/targets.py "$results/seeds/results.json"
        ;;
    eager)
        # The pipelines issue's eager-loop question: the two eager loops alternating round by round on one UNet
        # (fastddim.benchmark.eager), then a torch.profiler view of one call of each, in both orders.
        "$python" -m fastddim.benchmark --only eager --no-plots --out "$results/eager" 2>&1 | tail -n 25
        "$python" bench/targets.py "$results/eager/results.json" | grep -i eager
        "$python" bench/tools/profile_eager_loop.py 2>&1 | tee "$results/eager_loop_profile.txt" | tail -n 60
        ;;
    bench-sd)
        # SD1.5 architecture, fp16, batch 1 and 4, 30 and 50 steps: the eager and graph loops and the limit (about
        # 2-3 minutes), then the torch.compile loops, batch 1 first, each starting only within --budget-s of the
        # run's start (each compile takes about a minute): the batch-1 comparison with reduce-overhead fits.
        "$python" -m fastddim.benchmark --only sd --sd-cases 'sd15 .* fp16' --budget-s 240 --no-plots \
            --out "$results/sd" 2>&1 | tail -n 40
        "$python" bench/targets.py "$results/sd/results.json"
        ;;
    bench-sdxl)
        # SDXL architecture at batch 1 (5 GiB of fp16 weights) and the SD1.5 architecture in fp32 (the eager loops'
        # comparison); SDXL's torch.compile loops only within the budget.
        "$python" -m fastddim.benchmark --only sd --sd-cases 'sdxl|fp32' --budget-s 150 --no-plots \
            --out "$results/sdxl" 2>&1 | tail -n 30
        "$python" bench/targets.py "$results/sdxl/results.json"
        ;;
    regression)
        # Compare with the newest committed run, then save this one next to copies of the committed ones (in
        # ${OUT}/storage/<machine>/: the device tool returns files at most two folders below $OUT).
        storage=${OUT:-bench-out}/storage
        mkdir -p "$storage"
        compare=()
        if compgen -G "bench/results/$slug/*-64bit" >/dev/null; then
            cp -r "bench/results/$slug/"*-64bit "$storage/"
            compare=(--benchmark-compare --benchmark-compare-fail=median:10%)
        else
            # pytest-benchmark refuses --benchmark-compare-fail with nothing to compare (a usage error, exit 4).
            echo "no committed baseline in bench/results/$slug/: this run is saved as the device's first, nothing compared"
        fi
        "$python" -m pytest bench/ -m gpu -p no:cacheprovider -q --benchmark-only --benchmark-storage="$storage" \
            ${compare[@]+"${compare[@]}"} --benchmark-save=baseline \
            --benchmark-columns=median,iqr,rounds 2>&1 | tee "$results/regression.txt" | tail -n 40
        ;;
    *)
        echo "unknown phase: $phase" >&2
        exit 2
        ;;
    esac
done
