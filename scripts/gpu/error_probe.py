"""Error-path probe (developer tool, not part of the suite): runs every error input of
tests/op_registry.py on a device, printing each case before the call, so a crash (rather than a
clean RuntimeError) names its case. Usage: python3 scripts/gpu/error_probe.py [cuda|cpu]"""
import os
import sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import op_registry as reg
for entry in reg.REGISTRY:
    if entry.error_inputs is None:
        continue
    for e in entry.error_inputs(sys.argv[1] if len(sys.argv) > 1 else "cuda"):
        print(f"{entry.name}: {e.desc} ...", end=" ", flush=True)
        try:
            entry.op(*e.args)
            print("NO ERROR", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(type(ex).__name__, str(ex).splitlines()[0][:150], flush=True)
