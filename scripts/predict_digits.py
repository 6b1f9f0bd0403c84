"""Predict a few test digits through an exported artifact, with the runtime only.

python scripts/predict_digits.py artifacts/digits_mlp [--count 12]
"""

from __future__ import annotations

import argparse

import numpy as np

import jaxmint_runtime


def test_digits(count: int):
    from sklearn.datasets import load_digits

    data = load_digits()
    # The same held-out split as jaxmint.data.digits(seed=0), without importing jaxmint.
    order = np.random.default_rng(0).permutation(len(data.target))
    idx = order[: round(len(order) * 0.2)][:count]
    return (data.data[idx] / 16.0).astype(np.float32), data.target[idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--count", type=int, default=12)
    args = parser.parse_args()
    predictor = jaxmint_runtime.load(args.artifact)
    x, labels = test_digits(args.count)
    predicted = predictor(x).argmax(-1)
    print(f"predictions through {args.artifact} (jaxmint_runtime, no training code):")
    print("  label     " + " ".join(f"{v:2d}" for v in labels))
    print("  predicted " + " ".join(f"{v:2d}" for v in predicted))
    print(f"  {int((predicted == labels).sum())}/{len(labels)} correct")


if __name__ == "__main__":
    main()
