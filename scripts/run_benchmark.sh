#!/usr/bin/env bash
# The full benchmark of issue 3: every method on the default 10-request sequence, one after the
# other (two torch jobs at once slow each other 3-4x on two cores). Resumable: `cul bench` continues
# after the last finished step of each method, so rerun this script after an interruption.
#   bash scripts/run_benchmark.sh [METHOD ...]    (default: the report's list, in order)
set -uo pipefail
cd "$(dirname "$0")/.."
CUL=${CUL:-.venv/bin/cul}
STRIDE=${STRIDE:-4}  # 128 balanced scenes for UA/RA, plus the fixed 200-image FD set
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(dfr dfr_chain naive ca esd ca+gradient_projection ca+l2sp ca+selft dfr+gradient_projection simultaneous dfr_online)
for m in "${methods[@]}"; do
  extra=()
  [ "$m" = dfr_online ] && extra=(--max-steps 3)  # online replay: 3 requests are enough for the cost comparison
  echo "== $m ($(date -u +%H:%M:%S))"
  "$CUL" bench --method "$m" --stride "$STRIDE" --quiet "${extra[@]}" || echo "!! $m failed"
done
"$CUL" report
