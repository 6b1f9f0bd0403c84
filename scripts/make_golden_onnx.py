"""Write tests/golden/digits_onnx_v2: a small digits MLP exported to the ONNX target.

Committed once and never rewritten by tests: the Python runtime and the Node.js
package (export/js) must keep loading it and giving the outputs recorded in
``digits_onnx_v2.expected.json``. Rerun only for a new format version, under a
new name.
"""

import json
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import optax

import jaxmint
import jaxmint_runtime
from jaxmint.export import export_model

GOLDEN = Path(__file__).resolve().parents[1] / "tests/golden"


def main() -> None:
    train, test = jaxmint.data.digits()
    model = jaxmint.models.mlp((32,), 10)
    result = jaxmint.fit(
        model,
        jaxmint.losses.softmax_cross_entropy(),
        optax.adam(1e-2),
        train,
        steps=200,
        batch_size=64,
        progress=False,
    )
    out = export_model(
        model,
        {"params": result.params},
        test["x"][:16],
        GOLDEN / "digits_onnx_v2",
        name="digits",
        targets=("onnx",),
        labels=[str(d) for d in range(10)],
    )
    x = test["x"][:4]
    got = jaxmint_runtime.load(out).run({"x": x})["output"]
    expected = {"x": x.tolist(), "y": test["y"][:4].tolist(), "output": got.tolist()}
    (GOLDEN / "digits_onnx_v2.expected.json").write_text(json.dumps(expected) + "\n")
    print(f"wrote {out}; argmax {np.argmax(got, -1).tolist()}, labels {test['y'][:4].tolist()}")


if __name__ == "__main__":
    main()
