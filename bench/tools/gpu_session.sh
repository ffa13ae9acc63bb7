#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in phases that each fit one 10-minute device call.
#
#   bench/tools/gpu_session.sh tests       # every gpu-marked test (about 3 minutes on an H100)
#   bench/tools/gpu_session.sh overhead    # eager-step host-time breakdown (seconds)
#   bench/tools/gpu_session.sh bench       # fastddim bench, full matrix (about 6-8 minutes; compile cases bounded)
#   bench/tools/gpu_session.sh regression  # pytest bench/ against the committed baseline (about 2 minutes)
#
# Results go to $RESULTS (default: ${OUT:-bench-out}/<device-slug>/), ready to copy into bench/results/<device-slug>/.
set -uo pipefail
phase=${1:?usage: gpu_session.sh tests|overhead|bench|regression}
slug=$(python -m fastddim.benchmark --print-device-slug)
results=${RESULTS:-${OUT:-bench-out}/$slug}
mkdir -p "$results"
case $phase in
tests)
    python -m pytest -m gpu -p no:cacheprovider -q -rs tests 2>&1 | tee "$results/gpu_tests.txt"
    ;;
overhead)
    python bench/tools/profile_step_overhead.py 2>&1 | tee "$results/step_host_overhead.txt"
    ;;
bench)
    python -m fastddim.benchmark --out "$results" 2>&1 | tail -n 120
    ;;
regression)
    python -m pytest bench/ -m gpu -p no:cacheprovider -q --benchmark-only --benchmark-storage="bench/results/$slug" \
        --benchmark-compare --benchmark-compare-fail=median:10% 2>&1 | tee "$results/regression.txt"
    ;;
*)
    echo "unknown phase: $phase" >&2
    exit 2
    ;;
esac
