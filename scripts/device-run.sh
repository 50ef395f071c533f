#!/usr/bin/env bash
# One GPU-machine session over the bundle (run from the repository root with dist/ carried):
# the GPU tests, the transformers parity check, the decode benchmark and a CLI run, each logged
# under $OUT, with a short summary last.
# Usage: scripts/device-run.sh [tests|parity|bench|int8|quant|kernels|sanitizer|cli|cli-batch|sweep|sweep-int8|sweep-invariant|ab]...
# ab: a same-run sweep A/B of this bundle (A) against another one carried beside it (B: the
# tarball AB_BUNDLE, e.g. an experiment branch's `make bundle` renamed dist-NAME.tar.xz), each B
# run under every setting of AB_VARIANTS ('|'-separated environment settings, e.g.
# "BI_X=1|BI_Y=1 BI_Z=1"; default: none), A and B alternating, AB_REPS rounds (default 2), at
# batches AB_BATCHES (default 32,64,128,256).
set -uo pipefail
# Logs go to a scratch folder, then into $OUT/logs.tar.gz (the device tool returns few files).
results=${OUT:-/tmp/braidinfer-out}
out=$(mktemp -d)
mkdir -p "$results"
steps=${*:-tests parity bench cli}
summary=()
# One sweep of step ab: label, bundle folder, environment settings, round.
ab_sweep() {
    echo "== $1 [${3:-as built}] round $4" | tee -a "$out/ab.txt"
    env $3 timeout 120 "$2/sweep" --batches "${AB_BATCHES:-32,64,128,256}" --runs 30 2>&1 \
        | grep -E '^ +[0-9]+ +[0-9]+ ' | tee -a "$out/ab.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader | tee "$out/device.txt"
for step in $steps; do
    echo "=== $step"
    case $step in
        tests) dist/gpu-test.sh 2>&1 | tee "$out/tests.txt" | grep -v '^test .* ok$'
               summary+=("$(tail -n 1 "$out/tests.txt")") ;;
        parity) PYTHONUNBUFFERED=1 python3 scripts/parity.py --bundle dist --json "$out/parity.json" >"$out/parity.log" 2>&1
                tail -n 8 "$out/parity.log"; summary+=("$(tail -n 1 "$out/parity.log")") ;;
        bench) dist/benches/decode --json "$out/decode.json" --trace "$out/trace.json" --copy-windows 24,48,96 2>&1 | tee "$out/decode.txt"
               summary+=("$(grep -E '^ *1024 ' "$out/decode.txt" | sed 's/^ */decode ctx /')") ;;
        int8) dist/benches/decode --quant int8 --json "$out/decode-int8.json" 2>&1 | tee "$out/decode-int8.txt"
              summary+=("$(grep -E '^ *1024 ' "$out/decode-int8.txt" | sed 's/^ */int8 decode ctx /')") ;;
        quant) dist/quant-compare --synthetic --json "$out/quant-compare.json" 2>&1 | tee "$out/quant-compare.txt"
               summary+=("$(grep -E 'speed-up|margin >= 0.05' "$out/quant-compare.txt" | tr '\n' ';')") ;;
        kernels) dist/benches/kernels 2>&1 | tee "$out/kernels.txt"
                 summary+=("kernels: $(grep -E '^one layer' "$out/kernels.txt")") ;;
        sweep) dist/sweep --json "$out/sweep.json" --csv "$out/sweep.csv" --plot "$out/sweep.svg" 2>&1 | tee "$out/sweep.txt"
               summary+=("sweep: $(grep -cE '^ +[0-9]+ +[0-9]+ ' "$out/sweep.txt") points") ;;
        sweep-int8) dist/sweep --quant int8 --json "$out/sweep-int8.json" 2>&1 | tee "$out/sweep-int8.txt"
                    summary+=("sweep int8: $(grep -cE '^ +[0-9]+ +[0-9]+ ' "$out/sweep-int8.txt") points") ;;
        sweep-invariant) dist/sweep --batch-invariant --json "$out/sweep-invariant.json" 2>&1 | tee "$out/sweep-invariant.txt"
                         summary+=("sweep batch-invariant: $(grep -cE '^ +[0-9]+ +[0-9]+ ' "$out/sweep-invariant.txt") points") ;;
        sanitizer) for tool in memcheck racecheck synccheck; do
                       compute-sanitizer --tool $tool --error-exitcode 9 dist/braidinfer --synthetic --layers 2 \
                           --prompt "Hello there" --max-tokens 4 --temperature 0.7 >"$out/sanitizer-$tool.txt" 2>&1
                       summary+=("compute-sanitizer $tool on a 2-layer prefill + graph decode: exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer-$tool.txt" | tail -n 1))")
                   done
                   # Prompts of unequal lengths started together: packed prefill passes, 3 slots.
                   (echo "Hi"; echo "Tell me a long story about a dragon and a knight"; echo "x"; printf 'word %.0s' {1..150}; echo; echo "Why?") >"$out/prompts.txt"
                   compute-sanitizer --tool memcheck --error-exitcode 9 dist/braidinfer --synthetic --layers 2 \
                       --prompts "$out/prompts.txt" --batch 3 --max-tokens 6 >"$out/sanitizer-batch.txt" 2>&1
                   summary+=("compute-sanitizer memcheck, 5 prompts 3 at a time (packed prefill): exit $? ($(grep -E 'ERROR SUMMARY' "$out/sanitizer-batch.txt" | tail -n 1))")
                   compute-sanitizer --tool memcheck --error-exitcode 9 dist/braidinfer --synthetic --layers 2 --quant int8 \
                       --prompt "Hello there" --max-tokens 4 >"$out/sanitizer-int8.txt" 2>&1
                   summary+=("compute-sanitizer memcheck, int8 weights: exit $? ($(grep -E 'ERROR SUMMARY' "$out/sanitizer-int8.txt" | tail -n 1))")
                   # The tiled products (split k included) and attention at every shape the tests use.
                   for tests in "gpu_products linear" "gpu_attention attention"; do
                       set -- $tests
                       timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 dist/tests/$1 --test-threads 1 $2 \
                           >"$out/sanitizer-$1.txt" 2>&1
                       summary+=("compute-sanitizer memcheck, $1 ($2 tests): exit $? ($(grep -E 'ERROR SUMMARY' "$out/sanitizer-$1.txt" | tail -n 1))")
                   done ;;
        cli) dist/braidinfer --synthetic --prompt "Write a haiku about GPUs." --max-tokens 48 --stats 2>&1 | tee "$out/cli.txt"
             summary+=("$(tail -n 1 "$out/cli.txt")") ;;
        ab) rm -rf "$out/b" && mkdir -p "$out/b" && tar xJf "${AB_BUNDLE:?ab needs AB_BUNDLE}" -C "$out/b" || exit 1
            IFS='|' read -r -a variants <<<"${AB_VARIANTS:-}"
            [ ${#variants[@]} -eq 0 ] && variants=("")
            for rep in $(seq "${AB_REPS:-2}"); do
                ab_sweep A dist "" "$rep"
                for settings in "${variants[@]}"; do ab_sweep B "$out/b/dist" "$settings" "$rep"; done
            done
            summary+=("ab: $(grep -c '^==' "$out/ab.txt") sweeps, table in ab.txt") ;;
        cli-batch) for i in $(seq 256); do echo "Question $i: explain why the sky is blue, in detail."; done >"$out/questions.txt"
                   for run in "1 16" "16 64" "64 256" "256 256"; do
                       set -- $run
                       head -n "$2" "$out/questions.txt" >"$out/batch-prompts.txt"
                       dist/braidinfer --synthetic --prompts "$out/batch-prompts.txt" --batch "$1" --max-tokens 256 \
                           --temperature 0 --stats 2>>"$out/cli-batch.txt" >/dev/null
                       summary+=("$(tail -n 1 "$out/cli-batch.txt")")
                   done ;;
    esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
tar czf "$results/logs.tar.gz" -C "$out" .
