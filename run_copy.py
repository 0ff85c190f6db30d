#!/usr/bin/env python3
"""The copy task (string memorisation) of Benzing et al., ICML 2019, trained online.

F. Benzing, M. M. Gauy, A. Mujika, A. Martinsson, A. Steger, "Optimal Kronecker-Sum Approximation
of Real Time Recurrent Learning", arXiv:1902.03993. The network reads a marker and a random bit
string and must echo the bits after T+1 blanks. A curriculum makes the strings longer each time
the moving-average loss falls below 0.15 bits; the score is the length T_ reached after a given
number of steps (the paper's code, OK rank 16: 15-17 after 100k steps, 38-45 after 2M).

    python run_copy.py                                    # the paper's run: n 128, B 16, OK rank 16
    python run_copy.py --hidden 32 --rank 4 --lr 3e-3 --steps 20000   # T 11 in under 2 minutes

Every step each of the B streams feeds one symbol, the learner updates its estimate of the
influence G, and Adam updates the weights (fully online). With --method tbptt the same streams
are cut into windows of --trunc steps with one update per window. All randomness (weights,
strings, the learners' signs) comes from one numpy Generator seeded by --seed, and a checkpoint
holds its state, so a resumed run is identical to an uninterrupted one. What is not the task
(the training step, checkpoints, the log, signals, the lock on a run's files) is runlib.py's.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

import ok_rtrl as ok
import runlib

PROG = "run_copy.py"

# --- The copy task: symbols, sequences, curriculum (as the paper's released code has them) ------

BIT_0, BIT_1, MARKER, BLANK = 0, 1, 2, 3
N_SYMBOLS = 4
EMA_DECAY = 0.999  # avg <- 0.999 avg + 0.001 loss, the loss in bits (batch mean of one step)
EMA_START = 1.0  # the paper's code starts avg at -log2(1/2) = 1 bit
LEVEL_UP_BELOW = 0.15  # bits: when avg is below this at a sequence start, T_ += 1 ...
EMA_AFTER_LEVEL_UP = 0.3  # ... and avg is set to 0.3
MAX_SHORTENING = 4  # a new sequence has length max(1, T_ - U{0..4})


def copy_sequence(bits):
    """Input and target symbols of one copy-task sequence for the bits b_1..b_T.

    bits (T,) of 0/1 -> inputs (2T+2,), targets (2T+2,). The loss counts at every step.
    Worked example, T = 3, bits 1 0 1:

        step     0  1  2  3  4  5  6  7
        input    2  1  0  1  3  3  3  3      the marker, the bits, then T+1 blanks
        target   3  3  3  3  2  1  0  1      T+1 blanks, then the marker and the bits again
    """
    T = len(bits)
    inputs = np.concatenate([[MARKER], bits, np.full(T + 1, BLANK)])  # (2T+2,)
    targets = np.concatenate([np.full(T + 1, BLANK), [MARKER], bits])  # (2T+2,)
    return inputs.astype(np.int64), targets.astype(np.int64)


def next_symbols(run, rng):
    """The next step's input x (B,), target y (B,) and reset (B,): streams starting a sequence.

    Streams run sequences back to back and are visited in order, as in the paper's code. A stream
    whose sequence has ended first checks the curriculum (avg < 0.15 bits: T_ += 1, avg = 0.3),
    then draws a length max(1, T_ - U{0..4}) and that many random bits; its h and learner
    state are reset before the step.
    """
    B = len(run["pos"])
    x, y, reset = np.empty(B, np.int64), np.empty(B, np.int64), np.zeros(B, bool)
    for b in range(B):
        if run["pos"][b] == len(run["inputs"][b]):
            if run["avg"] < LEVEL_UP_BELOW:
                run["T"] += 1
                run["avg"] = EMA_AFTER_LEVEL_UP
            length = max(1, run["T"] - int(rng.integers(0, MAX_SHORTENING + 1)))
            run["inputs"][b], run["targets"][b] = copy_sequence(rng.integers(0, 2, size=length))
            run["pos"][b] = 0
            reset[b] = True
        x[b], y[b] = run["inputs"][b][run["pos"][b]], run["targets"][b][run["pos"][b]]
        run["pos"][b] += 1
    return x, y, reset


def update_average(run, nats):
    """The curriculum's moving average of the per-step loss in bits (batch mean of one step)."""
    run["avg"] = EMA_DECAY * run["avg"] + (1 - EMA_DECAY) * float(ok.bits(nats))


# --- Gradient noise on fresh copy-task sequences (--measure-noise; runlib measures it) ----------


def noise_sequences(run, config):
    """The sequences of one noise measurement: --noise-steps steps xs, ys, resets (S, B) of
    fresh sequences, their lengths drawn as in training around --noise-length (default: the
    curriculum's T_); and the Generator they were drawn from, which then draws the learners'
    signs. It is seeded by (seed, step), not the run's: a run with measurements trains exactly
    as one without.

    Sequences of 2T+2 steps give G a Kronecker rank of at most 2T+2 (one term per step since the
    reset), so OK of a higher rank is exact on them: --noise-length shows the noise beyond that.
    """
    rng = np.random.default_rng([config["seed"], run["step"]])
    B, empty = config["batch"], np.zeros(0, np.int64)
    probe = {"T": config["noise_length"] or run["T"], "avg": math.inf,  # inf: T stays
             "pos": np.zeros(B, np.int64), "inputs": [empty] * B, "targets": [empty] * B}
    steps = [next_symbols(probe, rng) for _ in range(config["noise_steps"])]
    xs, ys, resets = (np.stack(column) for column in zip(*steps))  # (S, B) each
    return xs, ys, resets, rng


def record_noise(run, config, noise_log):
    """runlib.measure_noise on noise_sequences at the current weights: one row (step, T, learner
    index, median cosine, median relative error) per learner, kept in the run (for the plot),
    written to the CSV and summarised."""
    cosines, rel_errors = runlib.measure_noise(run["params"], *noise_sequences(run, config))
    rows = [(run["step"], run["T"], k, cosines[k], rel_errors[k])
            for k in range(len(runlib.NOISE_LEARNERS))]
    run["noise"].extend(rows)
    for (method, rank), (step, T, _, cosine, rel_error) in zip(runlib.NOISE_LEARNERS, rows):
        runlib.write_line(noise_log, f"{step},{T},{method},{rank},{cosine:.6f},{rel_error:.6g}\n")
    print(f"noise at step {run['step']:,}: median cosine with exact RTRL: " + ", ".join(
        f"{method} {rank} {cosine:.3f}" for (method, rank), cosine in zip(runlib.NOISE_LEARNERS,
                                                                          cosines)), flush=True)


# --- Command line: the paper's configuration ------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, description="The copy task of Benzing et al. 2019 (arXiv 1902.03993) with "
        "its curriculum, trained online with OK or a baseline. The defaults are the paper's "
        "configuration.")
    p.add_argument("--method", choices=runlib.METHODS, default="ok",
                   help="learning algorithm (default ok, the paper's): KF-RTRL (kf), kf-avg "
                   "(r averaged KF-RTRL copies), UORO, exact RTRL (small --hidden only), or TBPTT "
                   "(ok_rtrl.py, section 5)")
    p.add_argument("--rank", type=runlib.int_at_least(1), metavar="R",
                   help="OK's rank, or kf-avg's number of averaged KF-RTRL copies (default 16, "
                   "the paper's copy-task rank); kf is rank 1")
    p.add_argument("--trunc", type=runlib.int_at_least(1), metavar="K",
                   help="TBPTT window, --method tbptt only (default 100, as run_ptb.py: the "
                   "paper gives no copy-task horizon)")
    p.add_argument("--hidden", type=runlib.int_at_least(1), default=128, metavar="N",
                   help="hidden units (default 128, the paper's copy-task network)")
    p.add_argument("--batch", type=runlib.int_at_least(1), default=16, metavar="B",
                   help="streams, each running sequences back to back (default 16, the "
                   "paper's)")
    p.add_argument("--lr", type=runlib.positive_float, default=10 ** -3.5,
                   help="Adam learning rate (default 10^-3.5 = 3.16e-4, the best of the paper's "
                   "grid 10^-2.5 .. 10^-4)")
    p.add_argument("--steps", type=runlib.int_at_least(0), default=2_000_000,
                   help="total time steps, a resumed checkpoint's included; 1e5 or 100_000 "
                   "work too (default 2,000,000: the paper's runs)")
    p.add_argument("--seed", type=runlib.int_at_least(0), default=0,
                   help="seed of the one numpy Generator behind all randomness (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating point type (default float32, as the paper's TensorFlow code)")
    runlib.add_shared_options(p)
    p.add_argument("--log", type=runlib.output_path, metavar="FILE.csv",
                   help="CSV log, one row every --log-every steps: step, T, avg_bits, "
                   "steps_per_s; the config in a '#' header line")
    p.add_argument("--log-every", type=runlib.int_at_least(1), default=1000, metavar="STEPS",
                   help="steps between log rows and curve points (default 1000, as the paper's "
                   "code printed)")
    p.add_argument("--checkpoint", type=runlib.output_path, metavar="FILE.npz",
                   help="resume from FILE if it exists; save to it periodically, at the end "
                   "and on Ctrl-C or SIGTERM")
    p.add_argument("--checkpoint-every", type=runlib.positive_float, default=300.0,
                   metavar="SECONDS",
                   help="seconds between periodic checkpoints (default 300)")
    p.add_argument("--plot", type=runlib.output_path, metavar="FILE.png",
                   help="learning curve, curriculum T against steps (needs matplotlib); with "
                   "--measure-noise also FILE-noise.png")
    p.add_argument("--measure-noise", type=runlib.int_at_least(1), metavar="STEPS",
                   help="every STEPS training steps, measure how close the gradients of OK "
                   "(ranks 1-16), KF-RTRL, kf-avg and UORO are to exact RTRL's (n <= 64 or so: "
                   "exact RTRL must fit)")
    p.add_argument("--noise-steps", type=runlib.int_at_least(1), default=200, metavar="S",
                   help="steps per noise measurement (default 200)")
    p.add_argument("--noise-length", type=runlib.int_at_least(1), metavar="T",
                   help="bit-string length of the measured sequences (default: the curriculum's "
                   "current T)")
    p.add_argument("--noise-log", type=runlib.output_path, default="copy_noise.csv",
                   metavar="FILE.csv",
                   help="CSV of the noise measurements (default copy_noise.csv)")
    return p


# Options that define the experiment: a checkpoint resumes only under the same values. The others
# (--steps, file names, intervals) only say how long to run and where to write.
EXPERIMENT_KEYS = ("task", "method", "rank", "trunc", "hidden", "batch", "lr", "seed", "dtype",
                   "adam")


def resolve_config(parser, args):
    """The run's configuration as a JSON-able dict, with rank and trunc resolved per method."""
    rank, trunc = runlib.resolve_rank_and_trunc(parser, args, default_rank=16, default_trunc=100)
    return {"task": "copy", "method": args.method, "rank": rank, "trunc": trunc,
            "hidden": args.hidden, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "dtype": args.dtype, "adam": args.adam, "threads": args.threads, "steps": args.steps,
            "log": args.log, "log_every": args.log_every, "checkpoint": args.checkpoint,
            "checkpoint_every": args.checkpoint_every, "plot": args.plot,
            "measure_noise": args.measure_noise, "noise_steps": args.noise_steps,
            "noise_length": args.noise_length,
            "noise_log": args.noise_log if args.measure_noise else None}


# --- The run: streams and curriculum beside runlib's weights, learner and checkpoint -------------


def new_run(config, rng):
    """Fresh weights (drawn first from rng), Adam, learner state, streams and curriculum."""
    B, empty = config["batch"], np.zeros(0, np.int64)
    return dict(runlib.new_run(config, rng, N_SYMBOLS),
                T=1, avg=EMA_START,  # the curriculum T_ starts at 1
                inputs=[empty] * B, targets=[empty] * B,  # every stream starts a sequence
                pos=np.zeros(B, np.int64), history=[], noise=[])


def checkpoint_arrays(config, rng, run):
    """runlib's arrays of the run, the copy task's counters (step, T_, avg) and its own arrays:
    each stream's current sequence and position, the curve, the noise measurements."""
    B = config["batch"]
    longest = max(len(s) for s in run["inputs"])
    inputs, targets = np.full((B, longest), -1), np.full((B, longest), -1)  # -1: padding
    for b in range(B):
        inputs[b, :len(run["inputs"][b])] = run["inputs"][b]
        targets[b, :len(run["targets"][b])] = run["targets"][b]
    return runlib.checkpoint_arrays(config, rng, run, ("step", "T", "avg"), {
        "stream_inputs": inputs, "stream_targets": targets, "stream_pos": run["pos"],
        "history": np.array(run["history"], np.float64).reshape(-1, 3),  # step, T, avg
        "noise": np.array(run["noise"], np.float64).reshape(-1, 5)})  # record_noise's rows


def restore_run(arrays, run, rng, path):
    """Overwrite the fresh run and rng with a checkpoint's arrays (shapes checked)."""
    runlib.restore_run(arrays, run, rng, path)
    lengths = (arrays["stream_inputs"] >= 0).sum(axis=1)
    run["inputs"] = [row[:k].astype(np.int64) for row, k in zip(arrays["stream_inputs"], lengths)]
    run["targets"] = [row[:k].astype(np.int64) for row, k in zip(arrays["stream_targets"], lengths)]
    run["pos"] = arrays["stream_pos"].astype(np.int64)
    run["history"] = [tuple(row) for row in arrays["history"].tolist()]
    run["noise"] = [tuple(row) for row in arrays["noise"].tolist()]


# --- Main loop ---------------------------------------------------------------------------------


def train(config, run, rng, log, noise_log, stop):
    """Run steps until --steps, or until stop["signal"] is set (Ctrl-C, SIGTERM)."""
    steps, started, step0 = config["steps"], time.monotonic(), run["step"]
    busy = 0.0  # seconds inside training steps: the log's rate leaves out measurements and saves
    row_mark, print_mark, last_save = [busy, step0], [started, step0], started
    while run["step"] < steps and not stop["signal"]:
        begun = time.monotonic()
        x, y, reset = next_symbols(run, rng)
        for nats in runlib.train_step(run, config, rng, x, y, reset):  # TBPTT: 0 or K losses
            update_average(run, nats)
        run["step"] += 1
        step, now = run["step"], time.monotonic()
        busy += now - begun
        if step % config["log_every"] == 0:
            run["history"].append((step, run["T"], run["avg"]))
            rate = runlib.rate_since(row_mark, step, busy)
            if log is not None:
                runlib.write_line(log, f"{step},{run['T']},{run['avg']:.6f},{rate:.2f}\n")
        if config["measure_noise"] and step % config["measure_noise"] == 0:
            record_noise(run, config, noise_log)
            pause = time.monotonic() - now
            print_mark[0] += pause  # the progress line's rate counts training time only
            now += pause
        if now - print_mark[0] >= runlib.PROGRESS_SECONDS or step == steps:
            rate = runlib.rate_since(print_mark, step, now)
            print(f"step {step:,}/{steps:,}  T {run['T']}  avg {run['avg']:.3f} bits  "
                  f"{rate:.1f} steps/s  ETA {runlib.duration((steps - step) / max(rate, 1e-9))}",
                  flush=True)
        if config["checkpoint"] and now - last_save >= config["checkpoint_every"]:
            runlib.save_or_warn(config["checkpoint"], checkpoint_arrays(config, rng, run), step)
            last_save = time.monotonic()
    if run["step"] > step0:
        print(f"{run['step'] - step0:,} steps in {runlib.duration(time.monotonic() - started)}")


def main(argv=None) -> int:
    return runlib.cli_main(PROG, argv, build_parser, resolve_config, run_experiment)


def run_experiment(config):
    """The whole run: its files held, resumed or started, trained, saved, plotted."""
    runlib.print_config(f"{PROG}: the copy task of Benzing et al. 2019 (arXiv 1902.03993), with "
                        "its curriculum", config)
    ok.set_threads(config["threads"])
    plot_files = ([config["plot"], os.path.splitext(config["plot"])[0] + "-noise.png"]
                  if config["plot"] and config["measure_noise"] else [config["plot"]])
    with runlib.claim_outputs([("--checkpoint", config["checkpoint"]), ("--log", config["log"]),
                               ("--noise-log", config["noise_log"])]
                              + [("--plot", path) for path in plot_files]):
        memory = runlib.check_memory(config, N_SYMBOLS)
        print(f"memory: about {runlib.mib(memory)} for the learner and weights")
        rng = np.random.default_rng(config["seed"])
        run = new_run(config, rng)

        def restore(arrays):
            restore_run(arrays, run, rng, config["checkpoint"])
            print(f"resuming from {config['checkpoint']} at step {run['step']:,} (T {run['T']})")
            return run["step"]
        resume_step = runlib.resume_or_start(config, EXPERIMENT_KEYS, restore)
        header = runlib.log_header(PROG, config)
        log = noise_log = None
        if config["log"]:
            log = runlib.open_log(config["log"], header, ("step", "T", "avg_bits", "steps_per_s"),
                                  resume_step)
        if config["measure_noise"]:
            noise_log = runlib.open_log(config["noise_log"], header, (
                "step", "T", "method", "rank", "median_cosine", "median_rel_error"), resume_step)
        with runlib.stop_on_signals() as stop:
            try:
                train(config, run, rng, log, noise_log, stop)
            finally:
                for f in (log, noise_log):
                    if f is not None:
                        runlib.close_log(f)
            if config["checkpoint"]:
                runlib.final_save(config["checkpoint"], checkpoint_arrays(config, rng, run),
                                  run["step"])
        if config["plot"]:
            steps_, Ts = zip(*[(0, 1)] + [(s, T) for s, T, _ in run["history"]])  # T_ starts at 1
            runlib.write_plot(config["plot"], steps_, Ts, "step", "curriculum T",
                              f"copy task, {config['method']}, n {config['hidden']}",
                              drawstyle="steps-post", integer_y=True)
            if run["noise"]:
                rows = np.array(run["noise"])  # (measurements x learners, 5): record_noise's rows
                K = len(runlib.NOISE_LEARNERS)
                runlib.write_noise_plot(plot_files[1], rows[::K, 0], rows[:, 3].reshape(-1, K))
    print(f"curriculum T {run['T']} at step {run['step']:,} (avg {run['avg']:.3f} bits)")
    return 128 + stop["signal"] if stop["signal"] else 0


if __name__ == "__main__":
    sys.exit(main())
