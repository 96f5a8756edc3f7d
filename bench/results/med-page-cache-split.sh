#!/bin/bash
# The bench behind med-page-cache-split.json: moed bench inside a memory cgroup of LIMIT bytes (page
# cache included), so moed's cache and the page cache share it. Needs root and a cgroup v1 memory
# controller or cgroup v2 (run from the repository root). The child cgroup is removed afterwards.
set -euo pipefail
LIMIT=${LIMIT:-1600000000}
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # v2
  parent=/sys/fs/cgroup$(awk -F: '$1 == "0" {print $3}' /proc/self/cgroup); file=memory.max
else
  parent=/sys/fs/cgroup/memory$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup); file=memory.limit_in_bytes
fi
cg=$parent/moedbench-$$
mkdir "$cg"
trap 'rmdir "$cg"' EXIT
echo "$LIMIT" > "$cg/$file"
(echo $BASHPID > "$cg/cgroup.procs"
 exec .venv/bin/moed bench --model models/med-qwen3_moe --routing bench/results/synth-med-trace.json \
   --cache-fractions 0.5,0.25,0.1 --lookahead off --io buffered,direct --sampling random --max-tokens 64 \
   --repeat 2 --skip-io --skip-mlx-lm --out bench/results/med-page-cache-split.json)
