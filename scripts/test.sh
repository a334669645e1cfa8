#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite, slow end-to-end runs included.
# `--fast`: the inner loop, without the slow end-to-end runs (-m "not slow"). Other arguments go to pytest and run
# it once, e.g. `bash scripts/test.sh tests/test_link.py -x`.
#
# The whole suite runs as two pytest processes side by side, each over a fixed set of whole modules in a fixed
# order (so no test depends on which modules ran before it in its process): the Ray Train runs through the console
# script (the paper config at full size among them) with the autoscaling cluster and the Ray-already-there checks,
# and the rest (cc16: 10:54 and 11:17). The slow end-to-end runs wait on processes
# and sockets much of the time, so two of them share the 2 cores well (three did not: cc8, every group slower).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu
args=()
split=1
for a in "$@"; do
    if [ "$a" = "--fast" ]; then args+=(-m "not slow"); else args+=("$a"); split=0; fi
done
.venv/bin/ruff check otmel ray_jobs bench tests
.venv/bin/mypy
if [ "$split" = 0 ]; then
    exec .venv/bin/python -m pytest -q --durations=25 "${args[@]}"
fi
GROUP_A=(tests/test_train_ray.py tests/test_local_autoscaler.py tests/test_worker_errors.py
         tests/test_ray_already_there.py tests/test_full_size.py)
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export OTMEL_TEST_THREADS=1  # one torch thread per process: two processes on 2 cores
set +e
.venv/bin/python -m pytest -q --durations=15 "${args[@]}" "${GROUP_A[@]}" > "$logs/a.log" 2>&1 &
pid_a=$!
.venv/bin/python -m pytest -q --durations=15 "${args[@]}" "${GROUP_A[@]/#/--ignore=}" > "$logs/b.log" 2>&1 &
pid_b=$!
wait "$pid_a"; rc_a=$?
wait "$pid_b"; rc_b=$?
# (no `set -e` from here: a grep that finds no "failed" is not an error)
for g in a b; do
    echo "=============================== tests, group ${g^^} ==============================="
    cat "$logs/$g.log"
done
# pytest's own closing lines are the last of each log: the whole suite's, summed, is the last line here
last=$(for g in a b; do tail -n 1 "$logs/$g.log"; done)
passed=$(printf '%s\n' "$last" | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^passed/) s += $(i - 1)} END {print s + 0}')
failed=$(printf '%s\n' "$last" | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^(failed|error)/) s += $(i - 1)} END {print s + 0}')
status=0
for rc in "$rc_a" "$rc_b"; do
    if [ "$rc" != 0 ]; then status=1; fi
done
if [ "$status" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi  # a crash or a collection error counts
echo "${passed} passed, ${failed} failed"
exit "$status"
