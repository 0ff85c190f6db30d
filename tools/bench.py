"""Benchmark: one training step of every learner against OK's floor, the r products H_t A_k.

    python -m tools.bench [--repeats 5] [--dtype float32] [--baseline OLD_ok_rtrl.py]
    python -m tools.bench --profile

Prints a markdown table: per configuration (n, B, r), the median time of the batched H A
products alone (the floor), of one full training step (cell, learner update, gradient, clipping,
Adam) for each method, OK-step / floor, the GFLOP/s that OK achieves on the floor's work, and the
learner state per stream. --baseline times the OK step of another copy of the module (say, from
an older commit: `git show REV:ok_rtrl.py > old.py`) in the same run, alternating with this
module's over --rounds rounds (medians), and gives their ratio.
Then, at the copy task's size, in fresh processes: the OK step from a user's script (numpy
imported first, nothing set) against the same step in a process started as the runners are,
and two training processes one after the other (all cores each) against side by side (their
share of the cores each). Last, the Numba compile time with a cold and a warm cache. Timings
are medians over repeated steps after warm-up, measured side by side in one run: these
machines are noisy, so compare ratios, not absolute numbers across runs.

--profile instead splits the OK training step, on one thread, into the parts that
docs/speed.md ("What the targets would take") weighs against the floor.
"""
import argparse
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np

import ok_rtrl as ok

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the processes start there
CONFIGS = [  # (n, B, r, V): sizes of the two paper tasks and two smaller networks
    (32, 16, 16, 4),
    (64, 16, 16, 4),
    (128, 16, 16, 4),  # the paper's copy task: n 128, B 16, rank 16, 4 symbols
    (256, 32, 8, 50),  # the paper's character-level PTB: n 256, B 32, rank 8, 50 symbols
]
TBPTT_WINDOW = 20
MAX_RTRL_BYTES = 2 * 2**30  # exact RTRL only where G fits comfortably in memory
MAX_RTRL_FLOP = 50e9  # ... and one step takes at most a few seconds


def median_seconds(step, repeats, warmup=2):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_floor(n, B, r, dtype, rng, repeats):
    """The r batched (n x n)(n x 2n) products per stream that any OK step must do, the faster
    of two ways: numpy's batched product on BLAS's threads, and the streams split into one group
    per core, each group's products on one BLAS thread (as the OK step does them)."""
    H = rng.standard_normal((B, n, n)).astype(dtype)
    As = rng.standard_normal((B, r, n, 2 * n)).astype(dtype)
    out = np.empty_like(As)
    batched = median_seconds(lambda: np.matmul(H[:, None], As, out=out), repeats)
    with ok._one_blas_thread():  # the step's own way: ok_rtrl.py section 9d
        split = median_seconds(lambda: ok._by_streams(
            lambda s: np.matmul(H[s, None], As[s], out=out[s]), B), repeats)
    return min(batched, split)


def trainer(method, params, B, r, rng, module=ok):
    """step() runs one online training step (the learner's step, then clipping and Adam, of
    module's version) on random symbols; learner is the learner it trains. The first r + 1 steps
    are run here, so that OK's Kronecker sum has all r terms. A module from before the Learner
    (ok_rtrl.py of 746102a and older, for --baseline) is driven through its functions."""
    V, n, _ = ok.sizes(params)
    if hasattr(module, "Learner"):
        learner = module.Learner(params, B, method, r, rng)
        learner_step = learner.step
    else:
        learner = [module.init_learner(method, params, B, r), np.zeros((B, n), params.W.dtype)]

        def learner_step(p, x, y):  # the old API: (state, h) in, (h, state) out
            signs = module.draw_signs(rng, method, B, r, n)
            losses, dW, dW_out, h, state = module.learner_step(p, *learner, x, y, method, signs)
            learner[:] = state, h
            return losses, dW, dW_out
    weights = [params, module.adam_init(params)]

    def step():
        x, y = rng.integers(0, V, B), rng.integers(0, V, B)
        _, dW, dW_out = learner_step(weights[0], x, y)
        weights[:2] = module.apply_gradients(*weights, dW, dW_out, 1e-3, max_norm=B)[:2]

    for _ in range(r + 1):
        step()
    return step, learner


def time_online(method, params, B, r, rng, repeats, module=ok):
    """One online training step (trainer's), after r + 1 untimed ones."""
    return median_seconds(trainer(method, params, B, r, rng, module)[0], repeats)


def time_against(baseline, params, B, r, rng, repeats, rounds):
    """The OK training step of this module and of baseline, timed in turn over rounds rounds
    (machine noise hits both alike): the two medians."""
    steps = [trainer("ok", params, B, r, rng, module)[0] for module in (ok, baseline)]
    times = [[], []]
    for _ in range(rounds):
        for step, seconds in zip(steps, times):
            seconds.append(median_seconds(step, repeats))
    return [float(np.median(seconds)) for seconds in times]


def time_tbptt(params, B, rng, repeats):
    """TBPTT-k: BPTT over a window of k steps and one update with its gradient divided by k (as
    the runners train), reported per step."""
    V, n, _ = ok.sizes(params)
    state = [params, ok.adam_init(params), np.zeros((B, n), params.W.dtype)]

    def window():
        xs, ys = rng.integers(0, V, (TBPTT_WINDOW, B)), rng.integers(0, V, (TBPTT_WINDOW, B))
        p, adam, h = state
        _, dW, dW_out, h = ok.bptt(p, xs, ys, h0=h)
        p, adam, _ = ok.apply_gradients(p, adam, dW / TBPTT_WINDOW, dW_out / TBPTT_WINDOW, 1e-3,
                                        max_norm=B)
        state[:] = p, adam, h

    state_bytes = TBPTT_WINDOW * (n + V + n + 1) * np.dtype(params.W.dtype).itemsize
    return median_seconds(window, repeats) / TBPTT_WINDOW, state_bytes


def compile_seconds():
    """Wall time of importing the module and a first float32 and float64 OK step, cold and warm."""
    code = ("import time, numpy as np; t = time.perf_counter(); import ok_rtrl as ok\n"
            "rng = np.random.default_rng(0)\n"
            "for dtype in (np.float32, np.float64):\n"
            "    p = ok.init_params(3, 4, 3, rng, dtype)\n"
            "    xs = rng.integers(0, 3, (2, 2))\n"
            "    ok.sequence_grad(p, xs, xs, 'ok', rank=2, rng=rng)\n"
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        run = lambda: float(subprocess.run([sys.executable, "-c", code], cwd=TOP, env=env,
                                           check=True, capture_output=True, text=True).stdout)
        return run(), run()


# One OK training loop at the copy task's size, in a fresh process: {imports} first, then the
# module; prints the median step time. {threads} threads, {steps} timed steps after {warmup}.
LOOP_WARMUP = 22  # r + 1 steps to fill OK's Kronecker sum, and 5 more
LOOP = """{imports}
import time
import numpy as np
import ok_rtrl as ok
ok.set_threads({threads})
V, n, B, r = 4, 128, 16, 16
rng = np.random.default_rng(0)
params = ok.init_params(V, n, V, rng)
adam, learner = ok.adam_init(params), ok.Learner(params, B, "ok", r, rng)
times = []
for t in range({warmup} + {steps}):
    x, y = rng.integers(0, V, B), rng.integers(0, V, B)
    start = time.perf_counter()
    _, dW, dW_out = learner.step(params, x, y)
    params, adam, _ = ok.apply_gradients(params, adam, dW, dW_out, 1e-3, B)
    times.append(time.perf_counter() - start)
print(np.median(times[{warmup}:]))
"""
ENTRY_POINTS = {"your script (numpy first)": "import numpy",
                "as the runners start": "import run_copy  # the runner's own imports, in its order"}


def start_loop(imports, threads, steps):
    code = LOOP.format(imports=imports, threads=threads, steps=steps, warmup=LOOP_WARMUP)
    return subprocess.Popen([sys.executable, "-c", code], cwd=TOP, stdout=subprocess.PIPE,
                            text=True)


def finish(process):
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"a timing process failed (exit {process.returncode})")
    return float(out)


def time_entry_points(rounds, steps=60):
    """Median OK step (s) at the copy size for each of ENTRY_POINTS, alternated over rounds."""
    times = {name: [] for name in ENTRY_POINTS}
    for _ in range(rounds):
        for name, imports in ENTRY_POINTS.items():
            times[name].append(finish(start_loop(imports, ok.get_threads(), steps)))
    return {name: float(np.median(t)) for name, t in times.items()}


SIDE_BY_SIDE_STEPS = 100  # timed steps of each process in time_side_by_side


def time_side_by_side(rounds, steps=SIDE_BY_SIDE_STEPS):
    """Wall time (s) of two copy-size training processes one after the other, each with every
    core, and side by side, each with half (at least 1): the medians over rounds."""
    cores = ok.get_threads()
    after, beside = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(2):
            finish(start_loop("import numpy", cores, steps))
        after.append(time.perf_counter() - start)
        start = time.perf_counter()
        for process in [start_loop("import numpy", max(1, cores // 2), steps) for _ in range(2)]:
            finish(process)
        beside.append(time.perf_counter() - start)
    return float(np.median(after)), float(np.median(beside))


# The parts of an OK training step that profile() times: (where the function is looked up
# when the step calls it, its name, the column it adds to). The rest is the products H_t A_k
# and small array work.
PARTS = [(ok, "_gram", "Gram"), (ok, "_combine_rows", "rotation + map-back"),
         (ok.KroneckerSum, "_grad", "q A_k"), (np.linalg, "eigh", "eigh, SVD, signs"),
         (np.linalg, "svd", "eigh, SVD, signs"), (ok, "_fix_svd_signs", "eigh, SVD, signs"),
         (ok, "apply_gradients", "Adam, H_t, cell"), (ok, "_fast_jacobians", "Adam, H_t, cell"),
         (ok, "_fast_cell_step", "Adam, H_t, cell"), (ok, "_readout", "Adam, H_t, cell")]


def profile(n, B, r, V, rng, steps=20):
    """ms per OK training step on one thread: the whole step, the products H A_k alone on the
    same buffers (the floor's work), and the time spent in each column of PARTS."""
    totals = dict.fromkeys((column for _, _, column in PARTS), 0.0)

    def timed(function, column):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[column] += time.perf_counter() - start
        return wrapper

    threads = ok.get_threads()
    ok.set_threads(1)
    try:
        step, learner = trainer("ok", ok.init_params(V, n, V, rng), B, r, rng)
        with contextlib.ExitStack() as patches:
            for where, name, column in PARTS:
                patches.enter_context(mock.patch.object(where, name,
                                                        timed(getattr(where, name), column)))
            start = time.perf_counter()
            for _ in range(steps):
                step()
            whole = (time.perf_counter() - start) / steps
        H = rng.standard_normal((B, n, n)).astype(np.float32)
        As = learner.state().influence.As
        out = np.empty_like(As)
        with ok._one_blas_thread():
            products = median_seconds(lambda: np.matmul(H[:, None], As, out=out), steps)
    finally:
        ok.set_threads(threads)
    return {"step": whole, "products": products, **{k: v / steps for k, v in totals.items()}}


def print_profile(rng):
    print("OK training step on one thread, ms (products: the products alone on the step's "
          "buffers)\n")
    rows = [(config, profile(*config, rng)) for config in CONFIGS[1:]]  # the sizes with targets
    columns = list(rows[0][1])
    print("| n, B, r | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for (n, B, r, _), ms in rows:
        print(f"| {n}, {B}, {r} | " + " | ".join(f"{1e3 * v:.1f}" for v in ms.values()) + " |")


def load_module(path):
    """Import another copy of ok_rtrl.py under its own name, beside this one."""
    spec = importlib.util.spec_from_file_location("ok_rtrl_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Numba's cache finds the module of its functions by name
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--rounds", type=int, default=5, help="with --baseline: alternations of "
                        "the two modules' OK steps")
    parser.add_argument("--baseline", metavar="FILE", help="another ok_rtrl.py whose OK step to "
                        "time side by side (e.g. from an older commit)")
    parser.add_argument("--profile", action="store_true", help="instead, the OK step's parts on "
                        "one thread (docs/speed.md)")
    args = parser.parse_args(argv)
    if args.profile:
        print_profile(np.random.default_rng(0))
        return 0
    baseline = load_module(args.baseline) if args.baseline else None
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"dtype {args.dtype}, {os.cpu_count()} cores, median of {args.repeats} steps\n")
    old = "| OK baseline | baseline / floor | OK / baseline " if baseline else ""
    print(f"| n, B, r | floor H A | OK | OK / floor {old}| OK GFLOP/s | KF | kf-avg | UORO "
          f"| TBPTT-{TBPTT_WINDOW} | exact RTRL | OK state / stream |")
    print("|---" * (14 if baseline else 11) + "|")
    for n, B, r, V in CONFIGS:
        params = ok.init_params(V, n, V, rng, dtype)
        floor = time_floor(n, B, r, dtype, rng, args.repeats)
        times = {m: time_online(m, params, B, r, rng, args.repeats)
                 for m in ("kf", "kf-avg", "uoro") + (() if baseline else ("ok",))}
        if baseline:  # OK alternating with the baseline's
            times["ok"], old_seconds = time_against(baseline, params, B, r, rng, args.repeats,
                                                    args.rounds)
            old = (f"| {1e3 * old_seconds:.2f} ms | {old_seconds / floor:.1f} "
                   f"| {times['ok'] / old_seconds:.2f} ")
        tbptt = time_tbptt(params, B, rng, args.repeats)
        m = V + n + 1
        rtrl_bytes, rtrl_flop = B * n * m * 2 * n * dtype.itemsize, 2 * B * n * n * m * 2 * n
        rtrl = (f"{1e3 * time_online('rtrl', params, B, 1, rng, 3):.1f} ms"
                if rtrl_bytes < MAX_RTRL_BYTES and rtrl_flop < MAX_RTRL_FLOP else "too big")
        ok_seconds = times["ok"]
        ok_bytes = 2 * (r + 1) * (m + 2 * n * n) * dtype.itemsize  # two slots of r+1 terms (§9c)
        floor_flop = 2 * B * r * n * n * 2 * n
        ms = {k: f"{1e3 * v:.2f} ms" for k, v in times.items()}
        print(f"| {n}, {B}, {r} | {1e3 * floor:.2f} ms | {ms['ok']} | {ok_seconds / floor:.2f} "
              f"{old}| {floor_flop / ok_seconds / 1e9:.0f} | {ms['kf']} | {ms['kf-avg']} "
              f"| {ms['uoro']} | {1e3 * tbptt[0]:.2f} ms | {rtrl} | {ok_bytes / 2**20:.1f} MiB |",
              flush=True)
    entry = time_entry_points(rounds=3)
    (script, runner_like) = entry.values()
    print(f"\nThe OK step at the copy size (128, 16, 16), fresh processes, alternated 3 times: "
          f"{1e3 * script:.1f} ms from a user's script (numpy imported first, nothing set), "
          f"{1e3 * runner_like:.1f} ms as the runners start; ratio {script / runner_like:.2f}.")
    after, beside = time_side_by_side(rounds=2)
    half = max(1, ok.get_threads() // 2)
    print(f"Two copy-size training processes (each: startup, {LOOP_WARMUP} warm-up and "
          f"{SIDE_BY_SIDE_STEPS} timed OK steps), median "
          f"of 2: one after the other with {ok.get_threads()} threads each {after:.1f} s, side "
          f"by side with {half} each {beside:.1f} s; ratio {beside / after:.2f}.")
    cold, warm = compile_seconds()
    print(f"\nNumba: import and first OK steps (float32 and float64) take {cold:.1f} s with a cold "
          f"cache, {warm:.1f} s with a warm one.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
