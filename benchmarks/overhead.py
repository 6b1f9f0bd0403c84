"""Overhead of `jaxmint.fit` against a hand-written flax + optax training loop.

Run (about 2 minutes on 2 idle CPU cores, longer on a busy machine; ``--quick`` is a
15-second smoke run: one round, every code path)::

    python benchmarks/overhead.py                      # full, the MLP
    python benchmarks/overhead.py --model transformer  # full, the built-in transformer
    python benchmarks/overhead.py --quick              # what the test suite runs

Targets:

* (a) steps/s of ``jaxmint.fit`` / steps/s of a hand-written ``jax.jit`` loop on the
  same model, ``optax.adam(1e-3)``, softmax cross-entropy, loss fetched to the host
  every 50 steps in both: **>= 0.99**. ``--model mlp`` (64-512-512-10 on the digits
  data, batch 256) or ``--model transformer`` (the built-in causal transformer, 2
  layers, d_model 128, 4 heads, on 128-byte windows of the standard library's
  source, batch 32; the hand loop applies the same flax module).
* (b) the train step's FLOP rate inside ``fit`` (XLA cost-analysis FLOPs per step x
  steps/s) as a fraction of a ``jnp.dot`` float32 1024x1024 matmul's FLOP rate,
  measured in the same process: reported (no fixed target; it says how far a tiny
  MLP step is from the machine's matmul peak).
* (c) diagnostic: the two compiled steps alone (device-resident batch, tight loop,
  no data pipeline or logging), to tell the cost of the compiled step apart from
  the cost of the Python loop around it; and a third, the hand step with the work
  of `fit`'s non-finite guard added (a sum of squares per layer and a conditional
  update), to tell how much of the step's difference that guard is.

Every speed number is a ratio of variants measured side by side in this process,
interleaved round by round (the order alternates each round) and summarised by
medians (over all measured 50-step intervals for the loops, over rounds for the
rest), because the machine is shared and noisy. The fixed cost per call (compile,
init, setup, teardown) is reported apart.

Results are printed as a table and written to ``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import environment, flops_of, interval_rates, med, steady_rate, table, write_result

import jaxmint
from jaxmint.models._zoo import MLP, Transformer
from jaxmint.train import build_steps

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = (512, 512)
BATCH_SIZE = 256
LOG_EVERY = 50
LEARNING_RATE = 1e-3
MATMUL_N = 1024
TARGET_FIT_OVER_HAND = 0.99
SEQ_LEN, D_MODEL, LAYERS, HEADS, VOCAB = 128, 128, 2, 4, 256


def setup(name: str, quick: bool = False):
    """``(train data, jaxmint model, the same flax module, batch size, description)``
    (``quick``: a transformer a sixteenth the size, for the smoke run)."""
    if name == "transformer":
        seq, width = (SEQ_LEN // 4, D_MODEL // 4) if quick else (SEQ_LEN, D_MODEL)
        train, _ = jaxmint.data.stdlib_chars(seq, max_bytes=1_000_000)
        model = jaxmint.models.transformer(
            VOCAB, max_len=seq, d_model=width, num_layers=LAYERS, num_heads=HEADS
        )
        module = Transformer(VOCAB, seq, width, LAYERS, HEADS, jax.nn.dot_product_attention, "none")
        text = f"transformer {LAYERS}x{width}, {HEADS} heads, {seq} bytes, vocab {VOCAB}"
        return train, model, module, 32, text
    train, _ = jaxmint.data.digits()
    model = jaxmint.models.mlp(WIDTHS, num_outputs=10)
    return train, model, MLP(WIDTHS, 10), BATCH_SIZE, f"mlp{WIDTHS} -> 10 on digits (64 features)"


# -- the hand-written loop -------------------------------------------------------------
def make_hand_step(module, optimizer, *, guard: bool = False):
    """The idiomatic flax + optax step: value_and_grad, optax update, state donated.

    ``guard``: for diagnostic (c) only, add what `fit`'s non-finite guard adds to a
    step: a sum of squares of the gradients per top-level layer, and the update under
    a ``lax.cond`` on all of them and the loss being finite.
    """

    def train_step(params, opt_state, x, y):
        def loss_fn(p):
            logits = module.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)

        def update():
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        if not guard:
            return *update(), loss
        sums = jnp.stack(
            [
                sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(layer))
                for layer in grads.values()
            ]
        )
        ok = jnp.isfinite(loss) & jnp.isfinite(sums).all()
        return *jax.lax.cond(ok, update, lambda: (params, opt_state)), loss

    return train_step


def hand_fit(module, optimizer, data, *, steps, batch_size, log_every, seed=0):
    """A fair hand-written training loop: what a good engineer would write without a framework.

    Per-epoch numpy permutation, sliced batches (last partial batch dropped, as
    `fit` does), a jitted step that donates params and optimizer state, and the
    loss fetched to the host every ``log_every`` steps and stored. Like `fit`, it
    jits a fresh step on every call (so each call compiles once) and returns the
    final params on the host.
    """
    x, y = data["x"], data["y"]
    n = len(y)
    params = module.init(jax.random.PRNGKey(seed), x[:batch_size])["params"]
    opt_state = optimizer.init(params)
    train_step = jax.jit(make_hand_step(module, optimizer), donate_argnums=(0, 1))
    rng = np.random.default_rng(seed)
    history = []
    step = 0
    t_last, s_last = time.perf_counter(), 0
    while step < steps:
        perm = rng.permutation(n)
        for i in range(n // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            params, opt_state, loss = train_step(params, opt_state, x[idx], y[idx])
            step += 1
            if step % log_every == 0 or step == steps:
                loss_value = float(loss)  # the host sync, as in fit's logging
                now = time.perf_counter()
                history.append(
                    {
                        "step": step,
                        "loss": loss_value,
                        "steps_per_sec": (step - s_last) / max(now - t_last, 1e-9),
                    }
                )
                t_last, s_last = now, step
            if step == steps:
                break
    return jax.device_get(params), history


# -- the benchmark ---------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--model", choices=("mlp", "transformer"), default="mlp")
    parser.add_argument("--out", type=Path, default=None, help="default results/overhead*.json")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()

    # Steps per timed call (log_every=50: the first interval holds the compile, the
    # rest are measured), interleaved rounds, and the step count of a bare-step burst.
    n_steps, rounds, burst = (100, 1, 10) if args.quick else (400, 11, 50)
    if args.model == "transformer" and not args.quick:  # ~20x the MLP's step time
        n_steps, rounds, burst = 200, 5, 10
    bare_repeats = 1 if args.quick else 4  # bare-step bursts per variant per round

    train, model, module, batch_size, described = setup(args.model, args.quick)
    suffix = "" if args.model == "mlp" else f"_{args.model}"
    args.out = args.out or RESULTS / f"overhead{suffix}.json"
    loss = jaxmint.losses.softmax_cross_entropy()
    optimizer = optax.adam(LEARNING_RATE)

    def run_fit(steps):
        t0 = time.perf_counter()
        result = jaxmint.fit(
            model,
            loss,
            optimizer,
            train,
            steps=steps,
            batch_size=batch_size,
            progress=False,
            log_every=LOG_EVERY,
            workdir=None,
        )
        return time.perf_counter() - t0, result.history

    def run_hand(steps):
        t0 = time.perf_counter()
        _, history = hand_fit(
            module, optimizer, train, steps=steps, batch_size=batch_size, log_every=LOG_EVERY
        )
        return time.perf_counter() - t0, history

    # -- (c)'s bare steps, and the FLOPs of both steps from XLA's cost analysis -------
    batch_np = {k: v[:batch_size] for k, v in train.items()}
    batch = jax.device_put(batch_np)
    steps_fns = build_steps(model, loss, optimizer)
    fit_step = jax.jit(steps_fns.train_step, donate_argnums=0)
    fit_state = jax.jit(steps_fns.init)(jax.random.PRNGKey(0), batch)
    fit_flops = flops_of(fit_step.lower(fit_state, batch).compile())
    hand_step = jax.jit(make_hand_step(module, optimizer), donate_argnums=(0, 1))
    hand_params = module.init(jax.random.PRNGKey(0), batch["x"])["params"]
    hand_opt = optimizer.init(hand_params)
    hand_flops = flops_of(hand_step.lower(hand_params, hand_opt, batch["x"], batch["y"]).compile())
    guarded_step = jax.jit(make_hand_step(module, optimizer, guard=True), donate_argnums=(0, 1))
    guarded_params = jax.tree_util.tree_map(jnp.copy, hand_params)
    guarded_opt = optimizer.init(guarded_params)

    def bare_fit():
        nonlocal fit_state
        t0 = time.perf_counter()
        for _ in range(burst):
            fit_state, _ = fit_step(fit_state, batch)
        jax.block_until_ready(fit_state)
        return burst / (time.perf_counter() - t0)

    def bare_hand():
        nonlocal hand_params, hand_opt
        t0 = time.perf_counter()
        for _ in range(burst):
            hand_params, hand_opt, _ = hand_step(hand_params, hand_opt, batch["x"], batch["y"])
        jax.block_until_ready(hand_params)
        return burst / (time.perf_counter() - t0)

    def bare_guarded():
        nonlocal guarded_params, guarded_opt
        t0 = time.perf_counter()
        for _ in range(burst):
            guarded_params, guarded_opt, _ = guarded_step(
                guarded_params, guarded_opt, batch["x"], batch["y"]
            )
        jax.block_until_ready(guarded_params)
        return burst / (time.perf_counter() - t0)

    bare = {"fit": bare_fit, "hand": bare_hand, "guarded": bare_guarded}

    # -- (b)'s reference: a jitted float32 matmul ---------------------------------------
    a = jax.random.normal(jax.random.PRNGKey(1), (MATMUL_N, MATMUL_N), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (MATMUL_N, MATMUL_N), jnp.float32)
    dot = jax.jit(jnp.dot)
    matmul_flops = 2.0 * MATMUL_N**3

    def matmul_rate(reps=5 if args.quick else 20):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dot(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        return matmul_flops / med(times)

    # -- warm-up: imports (orbax is imported lazily by fit), first compiles, caches ------
    dot(a, b).block_until_ready()
    for measure in bare.values():
        measure()
    run_fit(1 if args.quick else 2 * LOG_EVERY)
    run_hand(1 if args.quick else 2 * LOG_EVERY)

    # -- interleaved rounds ---------------------------------------------------------------
    # Throughput method. Each call to fit (and to hand_fit) jits a fresh step, so a
    # call's wall time is compile + setup + steps + teardown, and on this shared
    # machine the compile alone varies by tenths of a second from call to call.
    # (Timing N-step and 2N-step calls and dividing N by the difference cancels the
    # compile on average, but its call-to-call jitter lands whole in the difference: a
    # first version of this script saw the hand loop's rate swing 186..745 steps/s
    # across rounds that way.) So steps/s is measured inside each run instead, from
    # host sync to host sync: fit's own per-log ``steps_per_sec`` records (its timer
    # reads the clock right after the log step's device_get) and the same stamps taken
    # the same way in the hand loop (right after ``float(loss)``), summed over every
    # logged interval except the first, which holds the compile. Each interval is a
    # full steady-state period of the loop: data pipeline, dispatch, the step itself,
    # the host sync and everything fit does at a log step. The headline rate of a
    # variant is the median over all its measured 50-step intervals (a burst of load
    # from another process spoils a few intervals, not a whole variant); the rate of
    # each whole run and the median of the per-round paired ratios are kept as checks.
    # What does not scale with the step count is reported apart as the fixed cost per
    # call: wall time minus steps / steady rate (compile, init, setup, teardown).
    raw = {k: [] for k in ("fit", "hand", *(f"bare_{b}" for b in bare), "matmul_gflops")}
    intervals = {"fit": [], "hand": []}
    fixed = {"fit": [], "hand": []}
    for r in range(rounds):
        order = ("fit", "hand") if r % 2 == 0 else ("hand", "fit")
        for name in order:
            runner = run_fit if name == "fit" else run_hand
            seconds, history = runner(n_steps)
            rate = steady_rate(history)
            raw[name].append(rate)
            intervals[name] += interval_rates(history)
            fixed[name].append(seconds - n_steps / rate)
        names = list(bare)
        for i in range(bare_repeats):  # each bare step first, in the middle and last in turn
            k = (r * bare_repeats + i) % len(names)
            for name in names[k:] + names[:k]:
                raw[f"bare_{name}"].append(bare[name]())
        raw["matmul_gflops"].append(matmul_rate() / 1e9)
        print(
            f"round {r + 1}/{rounds}: fit {raw['fit'][-1]:.1f} steps/s, hand "
            f"{raw['hand'][-1]:.1f} steps/s, matmul {raw['matmul_gflops'][-1]:.1f} GFLOP/s",
            flush=True,
        )

    m = {k: med(v) for k, v in raw.items()}
    m["fit_runs"], m["hand_runs"] = m["fit"], m["hand"]
    m["fit"], m["hand"] = med(intervals["fit"]), med(intervals["hand"])
    paired = lambda a, b: med([x / y for x, y in zip(raw[a], raw[b], strict=True)])
    ratio = m["fit"] / m["hand"]
    fit_gflops = fit_flops * m["fit"] / 1e9
    hand_gflops = hand_flops * m["hand"] / 1e9
    result = {
        "benchmark": "overhead",
        "command": f"python benchmarks/overhead.py --model {args.model}"
        + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": {**environment(), "load_average_at_start": load_before},
        "config": {
            "model": described,
            "batch_size": batch_size,
            "optimizer": f"adam({LEARNING_RATE})",
            "log_every": LOG_EVERY,
            "steps_per_call": n_steps,
            "rounds": rounds,
            "bare_burst": burst,
            "bare_bursts_per_round": bare_repeats,
            "matmul": f"float32 {MATMUL_N}x{MATMUL_N} @ {MATMUL_N}x{MATMUL_N}",
        },
        "a_fit_vs_hand": {
            "fit_steps_per_sec": m["fit"],
            "hand_steps_per_sec": m["hand"],
            "ratio": ratio,
            "target": TARGET_FIT_OVER_HAND,
            "meets_target": ratio >= TARGET_FIT_OVER_HAND,
            "measured_intervals_per_variant": len(intervals["fit"]),
            "per_run_fit_steps_per_sec": m["fit_runs"],
            "per_run_hand_steps_per_sec": m["hand_runs"],
            "per_run_ratio": m["fit_runs"] / m["hand_runs"],
            "per_run_ratio_paired_median": paired("fit", "hand"),
            "fit_fixed_seconds_per_call": med(fixed["fit"]),
            "hand_fixed_seconds_per_call": med(fixed["hand"]),
        },
        "b_flop_rate": {
            "fit_step_flops": fit_flops,
            "hand_step_flops": hand_flops,
            "fit_gflops_per_sec": fit_gflops,
            "hand_gflops_per_sec": hand_gflops,
            "matmul_gflops_per_sec": m["matmul_gflops"],
            "fit_fraction_of_matmul": fit_gflops / m["matmul_gflops"],
            "hand_fraction_of_matmul": hand_gflops / m["matmul_gflops"],
        },
        "c_bare_steps": {
            "fit_step_steps_per_sec": m["bare_fit"],
            "hand_step_steps_per_sec": m["bare_hand"],
            "ratio": m["bare_fit"] / m["bare_hand"],
            "ratio_paired_median": paired("bare_fit", "bare_hand"),
            "hand_with_guard_steps_per_sec": m["bare_guarded"],
            "hand_with_guard_ratio": m["bare_guarded"] / m["bare_hand"],
            "hand_with_guard_ratio_paired_median": paired("bare_guarded", "bare_hand"),
        },
        "raw": raw,
        "raw_interval_steps_per_sec": intervals,
        "raw_fixed_seconds_per_call": fixed,
    }

    rows = [
        ["loop, 50-step intervals", f"{m['fit']:.1f}", f"{m['hand']:.1f}", f"{ratio:.3f}"],
        [
            "loop, whole runs",
            f"{m['fit_runs']:.1f}",
            f"{m['hand_runs']:.1f}",
            f"{m['fit_runs'] / m['hand_runs']:.3f}",
        ],
        [
            "compiled step alone",
            f"{m['bare_fit']:.1f}",
            f"{m['bare_hand']:.1f}",
            f"{m['bare_fit'] / m['bare_hand']:.3f}",
        ],
    ]
    print()
    print(
        table(
            f"(a) steps/s, medians over {rounds} interleaved rounds; target fit/hand >= "
            f"{TARGET_FIT_OVER_HAND} -> {'MET' if ratio >= TARGET_FIT_OVER_HAND else 'MISSED'}",
            ["measure", "jaxmint", "hand loop", "ratio"],
            rows,
        )
    )
    print(
        f"fixed cost per call (compile, init, setup, teardown): fit {med(fixed['fit']):.2f} s, "
        f"hand loop {med(fixed['hand']):.2f} s"
    )
    print(
        f"(c) the hand step with the work of fit's non-finite guard added: "
        f"{m['bare_guarded']:.1f} steps/s, {m['bare_guarded'] / m['bare_hand']:.3f} of the "
        f"hand step (fit's step: {m['bare_fit'] / m['bare_hand']:.3f})"
    )
    print()
    print(
        table(
            "(b) FLOP rate (XLA cost-analysis FLOPs/step x steps/s)",
            ["", "MFLOP/step", "GFLOP/s", "of matmul"],
            [
                [
                    "fit train step",
                    f"{fit_flops / 1e6:.1f}",
                    f"{fit_gflops:.1f}",
                    f"{fit_gflops / m['matmul_gflops']:.3f}",
                ],
                [
                    "hand train step",
                    f"{hand_flops / 1e6:.1f}",
                    f"{hand_gflops:.1f}",
                    f"{hand_gflops / m['matmul_gflops']:.3f}",
                ],
                [
                    f"jnp.dot {MATMUL_N}^2",
                    f"{matmul_flops / 1e6:.1f}",
                    f"{m['matmul_gflops']:.1f}",
                    "1.000",
                ],
            ],
        )
    )

    write_result(result, args.out, load_before)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
