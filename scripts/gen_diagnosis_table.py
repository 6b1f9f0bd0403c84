"""Write the table of planted failures in docs/diagnosis.md from real runs.

Usage: python scripts/gen_diagnosis_table.py [--check]

Trains each planted failure on the embedded digits data (a few seconds each),
diagnoses it, and writes what the report leads with, what else it lists and the
fix it suggests between the page's ``planted-failures`` markers. ``--check``
writes nothing and exits 1 if the page differs from the fresh table;
tests/diagnose/test_diagnose.py runs the check, so the table cannot drift.
"""

from __future__ import annotations

import sys
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md"
START, END = "<!-- planted-failures:start -->", "<!-- planted-failures:end -->"

# (what is planted, learning rate of adam, weight of the l2 regularizer, weight of a z-loss)
PLANTED = [
    ("Adam at learning rate 1e6", 1e6, 1e-4, 0.0),
    ("Adam at learning rate 3.0", 3.0, 1e-4, 0.0),
    ("Adam at learning rate 1e-7", 1e-7, 1e-4, 0.0),
    ("weight decay (L2) weighted 5.0", 1e-3, 5.0, 0.0),
    ("an auxiliary z-loss weighted 1e3", 1e-3, 1e-4, 1e3),
    ("none: Adam at 1e-3 with weight decay 1e-4", 1e-3, 1e-4, 0.0),
]


def diagnose(lr: float, l2: float, z: float) -> list:
    import optax

    import jaxmint
    from jaxmint import losses
    from jaxmint.diagnose import find_flags

    train, test = jaxmint.data.digits()
    loss = losses.softmax_cross_entropy() + l2 * losses.l2()
    if z:
        loss = loss + z * losses.z_loss()
    history = jaxmint.fit(
        jaxmint.models.mlp((64,), 10),
        loss,
        optax.adam(lr),
        train,
        steps=100,
        batch_size=64,
        eval_data=test,
        eval_every=50,
        log_every=5,
        diagnose_every=10,
        progress=False,
    ).history
    return find_flags(history, regularizers=loss.regularizer_names)


def results() -> dict[str, list]:
    """``{planted failure: its flags}``, from a fresh run of each."""
    return {what: diagnose(lr, l2, z) for what, lr, l2, z in PLANTED}


def render(found: dict[str, list]) -> str:
    rows = [
        "| planted failure | the report leads with | also listed | the fix it suggests |",
        "|---|---|---|---|",
    ]
    for what, flags in found.items():
        lead = f"`{flags[0].code}`" if flags else "no known pathology found"
        rest = ", ".join(
            f"`{f.code}`" + (" (consequence)" if f.consequence else "") for f in flags[1:]
        )
        fix = flags[0].fix.replace("|", "\\|") if flags else "nothing"
        rows.append(f"| {what} | {lead} | {rest or '-'} | {fix} |")
    return "\n".join(rows)


def page_with(table: str) -> str:
    text = PAGE.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str], found: dict[str, list] | None = None) -> int:
    fresh = page_with(render(results() if found is None else found))
    if "--check" in argv:
        if fresh != PAGE.read_text(encoding="utf-8"):
            print("docs/diagnosis.md's table is stale: run python scripts/gen_diagnosis_table.py")
            return 1
        return 0
    PAGE.write_text(fresh, encoding="utf-8")
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
