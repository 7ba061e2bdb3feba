#!/usr/bin/env bash
# Developer probe on the GPU machine: per-SASS-instruction counters (instructions executed, stall
# samples) of the fused FAVOR+ kernels named in $NCU_KERNELS (default forward|back1|back2) for one
# causal fwd+bwd at L=${NCU_L:-8192}, plus the library's SASS with line info, into $OUT
# (src-<kernel>.csv.gz, sass-lines.txt.gz) for offline analysis. Needs panther on PYTHONPATH and
# /tmp/ncu_drv.py (scripts/gpu/ncu_kernels.sh writes it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTD=${OUT:-/tmp/ncu}; mkdir -p "$OUTD"
for kn in ${NCU_KERNELS:-forward_kernel back1_kernel back2_kernel}; do
  rm -f /tmp/src-$kn.ncu-rep
  timeout 200 ncu --clock-control none -k regex:$kn --launch-skip 1 --launch-count 1 --set none \
    --section SourceCounters --section WarpStateStats -o /tmp/src-$kn python3 /tmp/ncu_drv.py > /tmp/ncu-$kn.log 2>&1
  echo "$kn: ncu rc $? $(tail -1 /tmp/ncu-$kn.log)"
  ncu -i /tmp/src-$kn.ncu-rep --page source --csv --print-source sass 2>&1 | gzip > "$OUTD/src-$kn.csv.gz"
  echo "  source csv: $(zcat "$OUTD/src-$kn.csv.gz" | wc -l) lines; $(zcat "$OUTD/src-$kn.csv.gz" | head -1 | cut -c1-300)"
done
lib=$(python3 -c 'import panther, os; print(panther.library_path())' 2>/dev/null)
mkdir -p /tmp/cubin && cd /tmp/cubin && rm -f *.cubin && cuobjdump -xelf all "$lib" > /dev/null 2>&1
# Every sm_90 cubin (each CUDA source of the library has its own: the attention kernels are not
# in the first one).
cubins=$(ls /tmp/cubin/*sm_90*.cubin 2>/dev/null)
for c in $cubins; do nvdisasm -g -c "$c" 2>/dev/null; done | gzip > "$OUTD/sass-lines.txt.gz"
echo "sass with lines: $(zcat "$OUTD/sass-lines.txt.gz" 2>/dev/null | wc -l) lines from" $cubins
