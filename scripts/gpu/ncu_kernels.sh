#!/usr/bin/env bash
# Developer probe on the GPU machine (Firecracker kinds, where ncu reads counters): hardware
# counters of the fused FAVOR+ kernels of one causal fwd+bwd (bf16, B=1, 12 x 64 heads, M=256,
# L=${NCU_L:-8192}), or with NCU_WHAT=decode the decoding step's layer kernels: time, instructions, issue activity, DRAM bytes, tensor-pipe use, stalls.
# Needs panther importable (PYTHONPATH). Prints one line per kernel; raw CSV in $OUT/ncu.csv.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTD=${OUT:-/tmp/ncu}; mkdir -p "$OUTD"
if [ "${NCU_WHAT:-attention}" = decode ]; then
# The decoding step of one GPT-2-small attention layer (bf16, 12 x 64 heads, M=256, batch 1),
# repeated: the layer op's cluster kernel and its output kernel.
KREGEX='decode_layer_kernel|linear_rows_kernel|favor_decode'; SKIP=4; COUNT=4
cat > /tmp/ncu_drv.py <<'PY'
import torch, panther as pr
torch.manual_seed(0)
with torch.no_grad():
    m = pr.nn.RandMultiHeadAttention(768, 12, 256, iscausal=True, device="cuda", dtype=torch.bfloat16).eval()
    st = m.prefill(torch.randn(1, 64, 768, device="cuda", dtype=torch.bfloat16))[1]
    x = torch.randn(1, 1, 768, device="cuda", dtype=torch.bfloat16)
    for _ in range(8):
        m.step_(x, st)
torch.cuda.synchronize()
PY
else
KREGEX='states_kernel|stab_kernel|scan_kernel|forward_kernel|back1_kernel|back2_kernel'; SKIP=7; COUNT=7
cat > /tmp/ncu_drv.py <<'PY'
import os, torch, panther  # noqa: F401
L = int(os.environ.get("NCU_L", "8192"))
torch.manual_seed(0)
q, k, v = (torch.randn(1, 12, L, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
W = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
go = torch.randn(1, 12, L, 64, device="cuda", dtype=torch.bfloat16)
for _ in range(2):
    torch.autograd.grad(torch.ops.panther.favor_attention(q, k, v, W, "softmax", True, None), [q, k, v], go)
torch.cuda.synchronize()
PY
fi
M=gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,dram__bytes_read.sum,dram__bytes_write.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio
timeout 300 ncu --clock-control none -k regex:"$KREGEX" --launch-skip $SKIP --launch-count $COUNT --metrics $M --csv python3 /tmp/ncu_drv.py > "$OUTD/ncu.csv" 2> "$OUTD/ncu.err"
echo "ncu rc $?"; tail -3 "$OUTD/ncu.err"
python3 - "$OUTD/ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows: print("no ncu rows"); sys.exit()
h = rows[0]; ki, mi, vi = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
idi = h.index("ID")
per = collections.OrderedDict()
for r in rows[1:]:
    per.setdefault((r[idi], r[ki].split("(")[0].split("<")[0].split("::")[-1]), {})[r[mi]] = r[vi].replace(",", "")
short = lambda m: m.replace("smsp__average_warps_issue_stalled_", "st_").replace("_per_issue_active.ratio", "")
for (i, name), m in per.items():
    f = lambda key: float(m.get(key, "nan"))
    print(f"{name:16s} {f('gpu__time_duration.sum')/1e3:8.1f} us  inst {f('smsp__inst_executed.sum')/1e6:7.2f} M  issue {f('smsp__issue_active.avg.pct_of_peak_sustained_active'):5.1f}%  "
          f"dram rd {f('dram__bytes_read.sum')/1e6:7.1f} MB wr {f('dram__bytes_write.sum')/1e6:7.1f} MB  tensor {f('sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active'):4.1f}%")
    print("   stalls/issue: " + " ".join(f"{short(k)}={float(v):.2f}" for k, v in m.items() if "stalled" in k))
PY
