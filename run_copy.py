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
holds its state, so a resumed run is identical to an uninterrupted one. This module is a
runlib.Task; the command line, the loop, checkpoints, the log, signals and the run's status are
tools/runlib.py's. One training step: step() below -> runlib.train_step -> ok_rtrl.
"""
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

import ok_rtrl as ok
from tools import runfiles, runlib

TASK, PROG = "copy", "run_copy.py"
TITLE = f"{PROG}: the copy task of Benzing et al. 2019 (arXiv 1902.03993), with its curriculum"
DESCRIPTION = ("The copy task of Benzing et al. 2019 (arXiv 1902.03993) with its curriculum, "
               "trained online with OK or a baseline. The defaults are the paper's "
               "configuration.")

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


@dataclass
class Streams:
    """The B streams and their curriculum: T_, the moving average of the loss (bits), and each
    stream's current sequence (inputs, targets) with the position (B,) of its next step."""
    T: int
    avg: float
    inputs: list
    targets: list
    pos: np.ndarray


def new_streams(B, T=1, avg=EMA_START):
    """B streams that each start a sequence at the next step; T_ starts at 1."""
    empty = np.zeros(0, np.int64)
    return Streams(T, avg, [empty] * B, [empty] * B, np.zeros(B, np.int64))


def next_symbols(streams, rng):
    """The next step's input x (B,), target y (B,) and reset (B,): streams starting a sequence.

    Streams run sequences back to back and are visited in order, as in the paper's code. A stream
    whose sequence has ended first checks the curriculum (avg < 0.15 bits: T_ += 1, avg = 0.3),
    then draws a length max(1, T_ - U{0..4}) and that many random bits; its h and learner
    state are reset before the step.
    """
    s, B = streams, len(streams.pos)
    x, y, reset = np.empty(B, np.int64), np.empty(B, np.int64), np.zeros(B, bool)
    for b in range(B):
        if s.pos[b] == len(s.inputs[b]):
            if s.avg < LEVEL_UP_BELOW:
                s.T += 1
                s.avg = EMA_AFTER_LEVEL_UP
            length = max(1, s.T - int(rng.integers(0, MAX_SHORTENING + 1)))
            s.inputs[b], s.targets[b] = copy_sequence(rng.integers(0, 2, size=length))
            s.pos[b] = 0
            reset[b] = True
        x[b], y[b] = s.inputs[b][s.pos[b]], s.targets[b][s.pos[b]]
        s.pos[b] += 1
    return x, y, reset


def update_average(streams, nats):
    """The curriculum's moving average of the per-step loss in bits (batch mean of one step)."""
    streams.avg = EMA_DECAY * streams.avg + (1 - EMA_DECAY) * float(ok.bits(nats))


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
    rng = np.random.default_rng([config["seed"], run.step])
    probe = new_streams(config["batch"], config["noise_length"] or run.streams.T,
                        avg=math.inf)  # inf: T stays
    steps = [next_symbols(probe, rng) for _ in range(config["noise_steps"])]
    xs, ys, resets = (np.stack(column) for column in zip(*steps))  # (S, B) each
    return xs, ys, resets, rng


def record_noise(run, config, noise_log):
    """runlib.measure_noise on noise_sequences at the current weights: one row (step, T, learner
    index, median cosine, median relative error) per learner, kept in the run (for the plot),
    written to the CSV and summarised."""
    cosines, rel_errors = runlib.measure_noise(run.params, *noise_sequences(run, config))
    rows = [(run.step, run.streams.T, k, cosines[k], rel_errors[k])
            for k in range(len(runlib.NOISE_LEARNERS))]
    run.noise.extend(rows)
    for (method, rank), (step, T, _, cosine, rel_error) in zip(runlib.NOISE_LEARNERS, rows):
        runfiles.write_line(noise_log, f"{step},{T},{method},{rank},{cosine:.6f},{rel_error:.6g}\n")
    print(f"noise at step {run.step:,}: median cosine with exact RTRL: " + ", ".join(
        f"{method} {rank} {cosine:.3f}" for (method, rank), cosine in zip(runlib.NOISE_LEARNERS,
                                                                          cosines)), flush=True)


# --- Command line: the paper's configuration ------------------------------------------------------

DEFAULTS = {"rank": 16, "trunc": 100, "hidden": 128, "batch": 16, "steps": 2_000_000}
WORDS = {"paper": "copy-task", "streams": "each running sequences back to back", "rows": "",
         "curve": "curriculum T against steps; with --measure-noise also FILE-noise.png",
         "keeps": ""}  # how the shared options' help says what is the copy task's
COLUMNS = ("step", "T", "avg_bits", "steps_per_s")
NOISE_COLUMNS = ("step", "T", "method", "rank", "median_cosine", "median_rel_error")
# Options that define the experiment: a checkpoint resumes only under the same values. The others
# (--steps, file names, intervals) only say how long to run and where to write.
EXPERIMENT_KEYS = ("task", "method", "rank", "trunc", "hidden", "batch", "lr", "seed", "dtype",
                   "adam")


def add_options(p):
    """The gradient-noise measurement, the copy task's own options."""
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


def config(args):
    """The copy task's own configuration keys: no experiment keys or data beyond the shared
    ones, and the noise measurement."""
    return {}, {}, {"measure_noise": args.measure_noise, "noise_steps": args.noise_steps,
                    "noise_length": args.noise_length,
                    "noise_log": args.noise_log if args.measure_noise else None}


def plot_files(config):
    """--plot, and its -noise.png twin with --measure-noise."""
    if config["plot"] and config["measure_noise"]:
        return [config["plot"], os.path.splitext(config["plot"])[0] + "-noise.png"]
    return [config["plot"]]


def outputs(config):
    return ([("--noise-log", config["noise_log"], NOISE_COLUMNS)]
            + [("--plot", path, None) for path in plot_files(config)])


# --- The run: streams and curriculum beside runlib's weights, learner and checkpoint -------------


def prepare(config):
    """The copy task reads no data: its sequences are drawn as it goes."""
    return N_SYMBOLS, None


@dataclass
class CopyRun(runlib.Run):
    """runlib's run (weights, Adam, learner) with the streams and curriculum, the curve (step,
    T, avg) of each log row and the noise measurements (record_noise's rows)."""
    streams: Streams | None = None  # new_run gives it the B streams
    history: list = field(default_factory=list)
    noise: list = field(default_factory=list)


def new_run(config, rng, V):
    """Fresh weights (drawn first from rng), Adam, learner state, streams and curriculum."""
    return runlib.new_run(config, rng, V, CopyRun, streams=new_streams(config["batch"]))


def checkpoint_arrays(config, rng, run):
    """runlib's arrays of the run, the copy task's counters (step, T_, avg) and its own arrays:
    each stream's current sequence and position, the curve, the noise measurements."""
    B, s = config["batch"], run.streams
    longest = max(len(sequence) for sequence in s.inputs)
    inputs, targets = np.full((B, longest), -1), np.full((B, longest), -1)  # -1: padding
    for b in range(B):
        inputs[b, :len(s.inputs[b])] = s.inputs[b]
        targets[b, :len(s.targets[b])] = s.targets[b]
    return runlib.checkpoint_arrays(config, rng, run, {"step": run.step, "T": s.T, "avg": s.avg}, {
        "stream_inputs": inputs, "stream_targets": targets, "stream_pos": s.pos,
        "history": np.array(run.history, np.float64).reshape(-1, 3),  # step, T, avg
        "noise": np.array(run.noise, np.float64).reshape(-1, 5)})  # record_noise's rows


def restore_run(arrays, run, rng, path):
    """Overwrite the fresh run and rng with a checkpoint's arrays (shapes checked)."""
    counters = runlib.restore_run(arrays, run, rng, path)
    lengths = (arrays["stream_inputs"] >= 0).sum(axis=1)
    run.streams = Streams(
        counters["T"], counters["avg"],
        [row[:k].astype(np.int64) for row, k in zip(arrays["stream_inputs"], lengths)],
        [row[:k].astype(np.int64) for row, k in zip(arrays["stream_targets"], lengths)],
        arrays["stream_pos"].astype(np.int64))
    run.history = [tuple(row) for row in arrays["history"].tolist()]
    run.noise = [tuple(row) for row in arrays["noise"].tolist()]


# --- One step, its log row and progress line, what the run has reached ---------------------------


def step(run, config, rng, data):
    """Every stream's next symbol, one training step, the curriculum's average (TBPTT: updated
    by each of the 0 or K losses of its window)."""
    x, y, reset = next_symbols(run.streams, rng)
    for nats in runlib.train_step(run, config, x, y, reset):
        update_average(run.streams, nats)


def measure(run, config, data, logs):
    """The gradient noise every --measure-noise steps; it asks for no log row of its own."""
    if config["measure_noise"] and run.step % config["measure_noise"] == 0:
        record_noise(run, config, logs.get("--noise-log"))


def log_row(run, config, measured, rate):
    """A point of the curriculum's curve and the CSV row: step, T, avg_bits, steps_per_s."""
    s = run.streams
    run.history.append((run.step, s.T, s.avg))
    return f"{run.step},{s.T},{s.avg:.6f},{rate:.2f}\n"


def progress(run, config, rate):
    return f"T {run.streams.T}  avg {run.streams.avg:.3f} bits  {rate:.1f} steps/s"


def finish(run, config, data, logs):
    """The copy task's result is the curriculum's T at the last step: nothing to add."""


def result(run):
    return {"T": run.streams.T, "avg_bits": run.streams.avg}


def describe(run):
    return f"curriculum T {run.streams.T} (avg {run.streams.avg:.3f} bits)"


def plot(config, run):
    """The curriculum's T against steps; with --measure-noise, each learner's cosine too."""
    steps, Ts = zip(*[(0, 1)] + [(s, T) for s, T, _ in run.history])  # T_ starts at 1
    runlib.write_plot(config["plot"], steps, Ts, "step", "curriculum T",
                      f"copy task, {config['method']}, n {config['hidden']}",
                      drawstyle="steps-post", integer_y=True)
    if run.noise:
        rows = np.array(run.noise)  # (measurements x learners, 5): record_noise's rows
        K = len(runlib.NOISE_LEARNERS)
        runlib.write_noise_plot(plot_files(config)[1], rows[::K, 0], rows[:, 3].reshape(-1, K))


def main(argv=None) -> int:
    return runlib.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
