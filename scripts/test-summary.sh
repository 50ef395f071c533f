#!/usr/bin/env bash
# Sums cargo's per-binary "test result" lines into one closing line; GPU tests that skipped for
# want of a GPU (their "SKIPPED" lines) are counted as skipped, not passed.
set -euo pipefail
awk '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    /^SKIPPED / { s++ }
    END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s }
' "$1"
