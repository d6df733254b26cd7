"""Checks kiln's ONNX exports with the ONNX checker and ONNX Runtime (issue 12).

Writes every zoo model and the layer corpus of tests/onnx/export.rs (opsets 13, 18 and 20) through
`cargo test -p kiln-onnx-tests --test onnx -- --ignored write_exports_for_onnxruntime`, then for each file:
`onnx.checker.check_model(full_check=True)`, and ONNX Runtime (CPU) on the same inputs as kiln at
batch sizes 1 and 7, within |ort - kiln| <= 1e-5 * max(1, |kiln|). Exits non-zero on any failure.

    python -m venv /work/venvs/onnx && /work/venvs/onnx/bin/pip install onnx onnxruntime
    /work/venvs/onnx/bin/python scripts/onnx_check.py [DIR]
"""

import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="kiln-onnx-check-")
    env = dict(os.environ, KILN_ONNX_CHECK_DIR=out)
    subprocess.run(["cargo", "test", "-p", "kiln-onnx-tests", "--test", "onnx", "--", "--ignored", "--exact",
                    "export::write_exports_for_onnxruntime"], check=True, env=env)
    files = sorted(glob.glob(os.path.join(out, "*.onnx")))
    failures = 0
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__}: {len(files)} files")
    for path in files:
        name = os.path.basename(path).rsplit("-op", 1)[0]
        with open(os.path.join(out, f"{name}.io.json")) as f:
            io = json.load(f)
        m = onnx.load(path)
        try:
            onnx.checker.check_model(m, full_check=True)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            worst = 0.0
            for batch in (1, 7):
                x = np.array(io[f"input{batch}"]["data"], dtype=np.float32).reshape(io[f"input{batch}"]["shape"])
                want = np.array(io[f"output{batch}"]["data"], dtype=np.float32).reshape(io[f"output{batch}"]["shape"])
                (got,) = sess.run(None, {sess.get_inputs()[0].name: x})
                assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
                worst = max(worst, float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want)))))
            ok = worst <= 1e-5
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(path)}: checker full_check passed, "
                  f"ir {m.ir_version}, opset {m.opset_import[0].version}, max scaled error {worst:.2e}")
        except Exception as e:  # noqa: BLE001 - report every file, then fail
            failures += 1
            print(f"FAIL {os.path.basename(path)}: {e}")
    print(f"{len(files) - failures} passed, {failures} failed")
    sys.exit(1 if failures or not files else 0)


if __name__ == "__main__":
    main()
