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
holds its state, so a resumed run is identical to an uninterrupted one.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import zipfile

# OK's Numba kernels use every core between the BLAS products. OpenBLAS's idle threads spin for
# about 0.1 s (2^28 cycles) after each product before they sleep, on the same cores: measured on
# 2 cores, that made the OK step up to 2x slower. 2^12 cycles lets them sleep at once. It must be
# set before numpy is imported, and a value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

import numpy as np

import ok_rtrl as ok

PROG = "run_copy.py"
METHOD_CHOICES = ok.METHODS + ("tbptt",)
PROGRESS_SECONDS = 5.0  # a progress line at most this often

# --- The copy task: symbols, sequences, curriculum (as the paper's released code has them) ------

BIT_0, BIT_1, MARKER, BLANK = 0, 1, 2, 3
N_SYMBOLS = 4
EMA_DECAY = 0.999  # avg <- 0.999 avg + 0.001 loss, the loss in bits (batch mean of one step)
EMA_START = 1.0  # the paper's code starts avg at -log2(1/2) = 1 bit
LEVEL_UP_BELOW = 0.15  # bits: when avg is below this at a sequence start, T_ += 1 ...
EMA_AFTER_LEVEL_UP = 0.3  # ... and avg is set to 0.3
MAX_SHORTENING = 4  # a new sequence has length max(1, T_ - U{0..4})
NOISE_LEARNERS = (("ok", 1), ("ok", 2), ("ok", 4), ("ok", 8), ("ok", 16),  # --measure-noise
                  ("kf", 1), ("kf-avg", 8), ("kf-avg", 16), ("uoro", 1))


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


# --- One training step: online learners and TBPTT (the math is in ok_rtrl; run_ptb.py shares it)


def train_step(run, config, rng, x, y, reset):
    """One step of every stream -> the batch-mean losses (nats) of the steps just trained on.

    Online methods: one learner step and one Adam update (ok.online_update), so one loss.
    TBPTT: the step joins the window; when it holds K steps, one update over the window
    (ok.tbptt_update) returns their K losses, and inside a window there are none. As in the
    paper's code, the batch-mean W gradient is clipped to norm B (its code divides the mean by
    B once more and clips to norm 1). A diverged run becomes one line.
    """
    method, B, n = config["method"], config["batch"], config["hidden"]
    try:
        if method == "tbptt":
            run["window"].append((x, y, reset))
            if len(run["window"]) < config["trunc"]:
                return np.zeros(0)
            xs, ys, resets = (np.stack(column) for column in zip(*run["window"]))  # (K, B) each
            run["window"] = []
            losses, run["params"], run["adam"], run["h"] = ok.tbptt_update(
                run["params"], run["adam"], run["h"], xs, ys, resets, config["lr"], max_norm=B)
        else:
            signs = ok.draw_signs(rng, method, B, config["rank"] or 1, n)
            stream_losses, run["params"], run["adam"], run["h"], run["state"] = ok.online_update(
                run["params"], run["adam"], run["state"], run["h"], x, y, method, signs,
                config["lr"], max_norm=B, reset=reset)
            losses = np.array([stream_losses.mean()], dtype=np.float64)
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError("the loss is not finite: the run diverged; lower the "
                                     "learning rate or train in float64")
        if not all(np.isfinite(p).all() for p in run["params"]):  # e.g. an lr beyond float32
            raise FloatingPointError("the weights are not finite (NaN or inf) after the update: "
                                     "the run diverged; lower the learning rate or train in "
                                     "float64")
    except (FloatingPointError, np.linalg.LinAlgError) as e:  # apply_gradients refuses a
        # non-finite gradient, OK a state that overflowed (checked on its Gram matrix, before
        # eigh and the SVD); LinAlgError stays as the last resort of a failing decomposition
        if isinstance(e, np.linalg.LinAlgError):
            e = (f"the learner's update failed ({e}): its state is no longer finite, the run "
                 "diverged; lower the learning rate or train in float64")
        kept = f"; {config['checkpoint']} keeps the last save" if config["checkpoint"] else ""
        raise UserError(f"step {run['step'] + 1}: {e}{kept}") from None
    return losses


# --- Gradient noise: each learner against exact RTRL on the same trajectory (--measure-noise) --


def measure_noise(run, config):
    """Median cosine and relative squared error, against exact RTRL, of each NOISE_LEARNERS
    gradient over --noise-steps steps of fresh sequences at the current weights, of lengths
    drawn as in training around --noise-length (default: the curriculum's T_).

    Sequences of 2T+2 steps give G a Kronecker rank of at most 2T+2 (one term per step since the
    reset), so OK of a higher rank is exact on them: --noise-length shows the noise beyond that.

    Nothing is trained. The draws come from a Generator seeded by (seed, step), not from the
    run's, so a run with measurements trains exactly as one without. -> rows (step, T, learner
    index, median cosine, median relative error).
    """
    rng = np.random.default_rng([config["seed"], run["step"]])
    B, empty = config["batch"], np.zeros(0, np.int64)
    probe = {"T": config["noise_length"] or run["T"], "avg": math.inf,  # inf: T stays
             "pos": np.zeros(B, np.int64), "inputs": [empty] * B, "targets": [empty] * B}
    steps = [next_symbols(probe, rng) for _ in range(config["noise_steps"])]
    xs, ys, resets = (np.stack(column) for column in zip(*steps))  # (S, B) each
    cosine, rel_error = ok.gradient_agreement(run["params"], xs, ys, NOISE_LEARNERS, rng,
                                              resets=resets)  # (S, len(NOISE_LEARNERS)) each
    return [(run["step"], run["T"], k, np.median(cosine[:, k]), np.median(rel_error[:, k]))
            for k in range(len(NOISE_LEARNERS))]


def record_noise(run, config, noise_log):
    """measure_noise, kept in the run (for the plot), written to the CSV and summarised."""
    rows = measure_noise(run, config)
    run["noise"].extend(rows)
    for step, T, k, cosine, rel_error in rows:
        method, rank = NOISE_LEARNERS[k]
        write_line(noise_log, f"{step},{T},{method},{rank},{cosine:.6f},{rel_error:.6g}\n")
    print(f"noise at step {run['step']:,}: median cosine with exact RTRL: " + ", ".join(
        f"{method} {rank} {row[3]:.3f}" for (method, rank), row in zip(NOISE_LEARNERS, rows)),
        flush=True)


def write_noise_plot(path, rows):
    """Cosine with exact RTRL against rank (last measurement) and against training steps."""
    plt = matplotlib_pyplot()
    if plt is None:
        print(f"note: --plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    rows = np.array(rows).reshape(-1, 5)  # step, T, learner, median cosine, median rel. error
    last = rows[rows[:, 0] == rows[:, 0].max()]
    fig, (by_rank, by_step) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, style in (("ok", "o-"), ("kf-avg", "s--"), ("uoro", "^")):
        ks = [k for k, (m, _) in enumerate(NOISE_LEARNERS) if m == method or
              (method == "kf-avg" and m == "kf")]  # KF-RTRL is kf-avg of rank 1
        ranks = [NOISE_LEARNERS[k][1] for k in ks]
        by_rank.plot(ranks, [last[last[:, 2] == k, 3][0] for k in ks], style, label=method)
    for k, (method, rank) in enumerate(NOISE_LEARNERS):
        mine = rows[rows[:, 2] == k]
        by_step.plot(mine[:, 0], mine[:, 3], label=f"{method} {rank}" if method != "kf" else "kf")
    by_rank.set(xscale="log", xlabel="rank r", ylabel="median cosine with exact RTRL",
                title=f"at step {int(last[0, 0]):,}")
    by_step.set(xlabel="training step", ylabel="median cosine with exact RTRL")
    for ax in (by_rank, by_step):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, path)


# --- Command line --------------------------------------------------------------------------------


def _int_at_least(low):
    """An integer option: '100000', '100_000', '100,000' and '1e5' all give 100000."""
    def parse(text):
        plain = text.replace("_", "").replace(",", "")
        try:
            value = int(plain)
        except ValueError:
            try:
                number = float(plain)  # 1e5, 2.5e3: whole numbers in scientific notation
            except ValueError:
                number = math.nan
            if not (math.isfinite(number) and number == int(number)):
                raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
            value = int(number)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _output_path(text):
    """A file to write: its folder must exist now, not only when the run ends hours later."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    return text


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, description="The copy task of Benzing et al. 2019 (arXiv 1902.03993) with "
        "its curriculum, trained online with OK or a baseline. The defaults are the paper's "
        "configuration.")
    p.add_argument("--method", choices=METHOD_CHOICES, default="ok",
                   help="learning algorithm (default ok, the paper's): KF-RTRL (kf), kf-avg "
                   "(r averaged KF-RTRL copies), UORO, exact RTRL (small --hidden only), or TBPTT "
                   "(ok_rtrl.py, section 5)")
    p.add_argument("--rank", type=_int_at_least(1), metavar="R",
                   help="OK's rank, or kf-avg's number of averaged KF-RTRL copies (default 16, "
                   "the paper's copy-task rank); kf is rank 1")
    p.add_argument("--trunc", type=_int_at_least(1), metavar="K",
                   help="TBPTT window, --method tbptt only (default 100, as run_ptb.py: the "
                   "paper gives no copy-task horizon)")
    p.add_argument("--hidden", type=_int_at_least(1), default=128, metavar="N",
                   help="hidden units (default 128, the paper's copy-task network)")
    p.add_argument("--batch", type=_int_at_least(1), default=16, metavar="B",
                   help="streams, each running sequences back to back (default 16, the "
                   "paper's)")
    p.add_argument("--lr", type=_positive_float, default=10 ** -3.5,
                   help="Adam learning rate (default 10^-3.5 = 3.16e-4, the best of the paper's "
                   "grid 10^-2.5 .. 10^-4)")
    p.add_argument("--steps", type=_int_at_least(0), default=2_000_000,
                   help="total time steps, a resumed checkpoint's included; 1e5 or 100_000 "
                   "work too (default 2,000,000: the paper's runs)")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seed of the one numpy Generator behind all randomness (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating point type (default float32, as the paper's TensorFlow code)")
    p.add_argument("--log", type=_output_path, metavar="FILE.csv",
                   help="CSV log, one row every --log-every steps: step, T, avg_bits, "
                   "steps_per_s; the config in a '#' header line")
    p.add_argument("--log-every", type=_int_at_least(1), default=1000, metavar="STEPS",
                   help="steps between log rows and curve points (default 1000, as the paper's "
                   "code printed)")
    p.add_argument("--checkpoint", type=_output_path, metavar="FILE.npz",
                   help="resume from FILE if it exists; save to it periodically, at the end "
                   "and on Ctrl-C or SIGTERM")
    p.add_argument("--checkpoint-every", type=_positive_float, default=300.0, metavar="SECONDS",
                   help="seconds between periodic checkpoints (default 300)")
    p.add_argument("--plot", type=_output_path, metavar="FILE.png",
                   help="learning curve, curriculum T against steps (needs matplotlib); with "
                   "--measure-noise also FILE-noise.png")
    p.add_argument("--measure-noise", type=_int_at_least(1), metavar="STEPS",
                   help="every STEPS training steps, measure how close the gradients of OK "
                   "(ranks 1-16), KF-RTRL, kf-avg and UORO are to exact RTRL's (n <= 64 or so: "
                   "exact RTRL must fit)")
    p.add_argument("--noise-steps", type=_int_at_least(1), default=200, metavar="S",
                   help="steps per noise measurement (default 200)")
    p.add_argument("--noise-length", type=_int_at_least(1), metavar="T",
                   help="bit-string length of the measured sequences (default: the curriculum's "
                   "current T)")
    p.add_argument("--noise-log", type=_output_path, default="copy_noise.csv", metavar="FILE.csv",
                   help="CSV of the noise measurements (default copy_noise.csv)")
    return p


def resolve_rank_and_trunc(parser, args, default_rank, default_trunc):
    """(rank, trunc) of --method: a rank for ok and kf-avg, 1 for kf, a window for tbptt only;
    an option that the method does not have is a usage error."""
    method = args.method
    if method in ("ok", "kf-avg"):
        rank = default_rank if args.rank is None else args.rank
    elif method == "kf":
        if args.rank not in (None, 1):
            parser.error(f"argument --rank: KF-RTRL has rank 1, got {args.rank} "
                         "(use --method kf-avg to average several KF-RTRL copies)")
        rank = 1
    else:
        if args.rank is not None:
            parser.error(f"argument --rank: --method {method} has no rank")
        rank = None
    if method != "tbptt" and args.trunc is not None:
        parser.error(f"argument --trunc: only --method tbptt has a window, not {method}")
    trunc = (default_trunc if args.trunc is None else args.trunc) if method == "tbptt" else None
    return rank, trunc


# Options that define the experiment: a checkpoint resumes only under the same values. The others
# (--steps, file names, intervals) only say how long to run and where to write.
EXPERIMENT_KEYS = ("task", "method", "rank", "trunc", "hidden", "batch", "lr", "seed", "dtype")


def resolve_config(parser, args):
    """The run's configuration as a JSON-able dict, with rank and trunc resolved per method."""
    rank, trunc = resolve_rank_and_trunc(parser, args, default_rank=16, default_trunc=100)
    return {"task": "copy", "method": args.method, "rank": rank, "trunc": trunc,
            "hidden": args.hidden, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "dtype": args.dtype, "steps": args.steps, "log": args.log,
            "log_every": args.log_every, "checkpoint": args.checkpoint,
            "checkpoint_every": args.checkpoint_every, "plot": args.plot,
            "measure_noise": args.measure_noise, "noise_steps": args.noise_steps,
            "noise_length": args.noise_length,
            "noise_log": args.noise_log if args.measure_noise else None}


# --- The run: state, checkpoint ----------------------------------------------------------------


def new_run(config, rng):
    """Fresh weights (drawn first from rng), Adam, learner state, streams and curriculum."""
    B, n = config["batch"], config["hidden"]
    params = ok.init_params(N_SYMBOLS, n, N_SYMBOLS, rng, dtype=np.dtype(config["dtype"]))
    state = (None if config["method"] == "tbptt"
             else ok.init_learner(config["method"], params, B, config["rank"] or 1))
    empty = np.zeros(0, np.int64)
    return {"params": params, "adam": ok.adam_init(params), "state": state,
            "h": np.zeros((B, n), params.W.dtype),
            "step": 0, "T": 1, "avg": EMA_START,  # the curriculum T_ starts at 1
            "inputs": [empty] * B, "targets": [empty] * B,  # every stream starts a sequence
            "pos": np.zeros(B, np.int64), "window": [], "history": [], "noise": []}


def checkpoint_arrays(config, rng, run):
    """Everything a run needs to go on exactly where it stopped, as named arrays for np.savez."""
    B = config["batch"]
    longest = max(len(s) for s in run["inputs"])
    inputs, targets = np.full((B, longest), -1), np.full((B, longest), -1)  # -1: padding
    for b in range(B):
        inputs[b, :len(run["inputs"][b])] = run["inputs"][b]
        targets[b, :len(run["targets"][b])] = run["targets"][b]
    window = run["window"]
    arrays = {"config": json.dumps(config), "rng": json.dumps(rng.bit_generator.state),
              "counters": json.dumps({k: run[k] for k in ("step", "T", "avg")}),
              "h": run["h"], "stream_inputs": inputs, "stream_targets": targets,
              "stream_pos": run["pos"],
              "window_x": np.array([w[0] for w in window], np.int64).reshape(-1, B),  # (k, B)
              "window_y": np.array([w[1] for w in window], np.int64).reshape(-1, B),
              "window_reset": np.array([w[2] for w in window], bool).reshape(-1, B),
              "history": np.array(run["history"], np.float64).reshape(-1, 3),  # step, T, avg
              "noise": np.array(run["noise"], np.float64).reshape(-1, 5)}  # measure_noise rows
    arrays.update(flatten("params", run["params"]))
    arrays.update(flatten("adam", run["adam"]))
    if run["state"] is not None:
        arrays.update(flatten("learner", run["state"]))
    return arrays


def restore_run(arrays, run, rng, path):
    """Overwrite the fresh run and rng with a checkpoint's arrays (shapes checked)."""
    for name in ("params", "adam", "h") + (("state",) if run["state"] is not None else ()):
        run[name] = unflatten("learner" if name == "state" else name, run[name], arrays, path)
    run.update(json.loads(str(arrays["counters"])))
    lengths = (arrays["stream_inputs"] >= 0).sum(axis=1)
    run["inputs"] = [row[:k].astype(np.int64) for row, k in zip(arrays["stream_inputs"], lengths)]
    run["targets"] = [row[:k].astype(np.int64) for row, k in zip(arrays["stream_targets"], lengths)]
    run["pos"] = arrays["stream_pos"].astype(np.int64)
    run["window"] = list(zip(arrays["window_x"], arrays["window_y"], arrays["window_reset"]))
    run["history"] = [tuple(row) for row in arrays["history"].tolist()]
    run["noise"] = [tuple(row) for row in arrays["noise"].tolist()]
    rng.bit_generator.state = json.loads(str(arrays["rng"]))


# --- Run plumbing: checkpoint files, CSV log, plot, Ctrl-C, errors (no math; run_ptb.py imports
# --- these from here rather than repeating them) ------------------------------------------------


class UserError(Exception):
    """A problem the user can fix (missing data, a wrong checkpoint, a diverged run): printed
    as one line, exit status 1."""


def flatten(prefix, value):
    """Named arrays of a (nested) NamedTuple, keyed 'prefix.field.subfield', for np.savez."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        named = {}
        for name, field in zip(value._fields, value):
            named.update(flatten(f"{prefix}.{name}", field))
        return named
    return {prefix: np.asarray(value)}


def unflatten(prefix, template, arrays, path):
    """Rebuild a (nested) NamedTuple shaped like template from flatten's arrays."""
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(unflatten(f"{prefix}.{name}", field, arrays, path)
                                for name, field in zip(template._fields, template)))
    if prefix not in arrays:
        raise UserError(f"checkpoint {path} lacks '{prefix}': not a checkpoint of this program; "
                        "delete it or choose another --checkpoint file")
    stored = arrays[prefix]
    if not isinstance(template, np.ndarray):
        return type(template)(stored.item())  # a scalar such as Adam's step count
    if stored.shape != template.shape or stored.dtype != template.dtype:
        raise UserError(f"checkpoint {path}: '{prefix}' is {stored.dtype} {stored.shape}, this "
                        f"run needs {template.dtype} {template.shape}; choose another "
                        "--checkpoint file")
    return stored


def current_umask():
    """The process's umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path, write, what):
    """write(f) into a temporary file in path's folder, then os.replace it onto path: a reader
    (or a run killed meanwhile) sees the old file or the whole new one, never half of one. The
    file gets the mode the umask gives any new file, not mkstemp's private 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:  # a full disk, a read-only folder, a folder that went away
        raise UserError(f"cannot write {what} {path} ({e.strerror or e})") from None


def save_atomically(path, arrays):
    """np.savez through write_atomically: never a half-written checkpoint."""
    write_atomically(path, lambda f: np.savez(f, **arrays), "checkpoint")


def check_writable(option, path):
    """Fail before the first step, not after hours of training, if path's folder takes no new
    file (the write itself goes through a temporary file there, see write_atomically)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {option[2:]} {path} ({e.strerror or e}): give {option} "
                        "a file in a folder where files can be created") from None


def save_or_warn(path, arrays, step):
    """A save during the run. If it fails, say so and go on: the run is still in memory, and
    the next save (periodic, after a validation, or the last) tries again."""
    try:
        save_atomically(path, arrays)
    except UserError as e:
        print(f"warning: step {step:,}: {e}; training goes on from memory and will try again at "
              "the next save", file=sys.stderr, flush=True)
        return False
    return True


def final_save(path, arrays, step):
    """The last save of a run. If path cannot be written, the run goes to a file in the
    temporary folder instead, so that the training is not lost, and the error says where."""
    try:
        save_atomically(path, arrays)
    except UserError as e:
        stem = os.path.splitext(os.path.basename(path))[0]
        rescue = os.path.join(tempfile.gettempdir(), f"{stem}.rescued-{os.getpid()}.npz")
        try:
            save_atomically(rescue, arrays)
        except UserError as again:
            raise UserError(f"{e}; nor could it go to {rescue} ({again}): the steps since the "
                            "last save are lost") from None
        raise UserError(f"{e}; the run (step {step:,}) is saved in {rescue} instead: move it to "
                        f"{path} and rerun the same command to resume") from None
    print(f"checkpoint: {path} (step {step:,})")


def check_writable_outputs(options):
    """check_writable for every (option, path) given a path."""
    for option, path in options:
        if path:
            check_writable(option, path)


MEMORY_SHARE = 0.8  # a run plans on at most this share of the available memory


def available_memory():
    """Bytes a run can still take: MemAvailable of /proc/meminfo, capped by the cgroup's limit
    where there is one; None where neither is known (then no run is refused)."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f
                      if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            found.append(int(limit) - used)
    return min(found) if found else None


def learner_memory(method, rank, B, n, V, dtype, trunc=None):
    """Bytes one training step holds at its peak, an upper bound (test_runners.py checks it
    against tracemalloc): the learner's state before and after the update with the update's
    temporaries (measured: 3x the state for rtrl, 7x the r+1 terms for OK, 6x for UORO), the
    step's H and D, and the weights with Adam's moments and float64 temporaries. V symbols in
    and out, m = V + n + 1 (ok_rtrl.py's notation table)."""
    m, itemsize = V + n + 1, np.dtype(dtype).itemsize
    if method == "rtrl":  # the influence G: B n m 2n numbers
        learner = 4 * B * n * m * 2 * n
    elif method == "uoro":  # s (n) and theta (m, 2n) per stream
        learner = 8 * B * (n + m * 2 * n)
    elif method == "tbptt":  # BPTT's tape of one window
        learner = 8 * (trunc or 1) * B * (m + 4 * n + V)
    else:  # ok, kf, kf-avg: the r+1 Kronecker terms u (m) and A (n, 2n) of the update
        learner = 8 * B * ((rank or 1) + 1) * (m + 2 * n * n)
    step = 4 * B * 3 * n * n  # H (n, n) and D (n, 2n), and products of their size
    weights = 16 * (m * 2 * n + (n + 1) * V)
    return itemsize * (learner + step + weights)


def mib(size):
    return f"{size / 2**20:,.0f} MiB" if size < 2**30 else f"{size / 2**30:,.1f} GiB"


def _largest(fits, high):
    """The largest k in 1..high with fits(k) (fits must be monotone), or 0 if none."""
    low = 0
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_memory(config, V):
    """The run's estimated peak memory; a run that cannot fit is refused before anything is
    allocated, with the figure and the --hidden (and for ok, kf-avg the --rank) that fits."""
    method, B, n, rank = config["method"], config["batch"], config["hidden"], config["rank"]

    def need(n=n, rank=rank):
        total = learner_memory(method, rank, B, n, V, config["dtype"], config["trunc"])
        if config.get("measure_noise"):  # exact RTRL beside every learner of NOISE_LEARNERS
            total += sum(learner_memory(m, r, B, n, V, config["dtype"])
                         for m, r in (("rtrl", None),) + NOISE_LEARNERS)
        return total

    estimate, free = need(), available_memory()
    if free is None or estimate <= MEMORY_SHARE * free:
        return estimate
    limit = MEMORY_SHARE * free
    ranked = method in ("ok", "kf-avg")
    hidden = _largest(lambda k: need(n=k) <= limit, n - 1)
    fixes = [f"--hidden {hidden} fits" if hidden else "no --hidden fits with this --batch"]
    rank_fits = _largest(lambda k: need(rank=k) <= limit, rank - 1) if ranked else 0
    if rank_fits:
        fixes.append(f"--rank {rank_fits} does")
    fixes.append("a smaller --batch needs less")
    said = f"--method {method} --hidden {n} --batch {B}" + (f" --rank {rank}" if ranked else "")
    if config.get("measure_noise"):
        said += " --measure-noise"
    raise UserError(f"{said} needs about {mib(estimate)} for the learner, more than the "
                    f"{mib(limit)} a run may take ({MEMORY_SHARE:.0%} of the {mib(free)} "
                    f"available): {'; '.join(fixes)}")


def load_checkpoint(path, config, keys):
    """The arrays of checkpoint path, after checking that it was written by the same task with
    the same values of the experiment options keys."""
    try:
        f = np.load(path, allow_pickle=False)
        if not hasattr(f, "files"):
            raise ValueError("it holds a single array (.npy), not an .npz archive of arrays")
        with f:
            arrays = {name: f[name] for name in f.files}
        stored = json.loads(str(arrays["config"]))
        if not isinstance(stored, dict):
            raise ValueError(f"its config is {type(stored).__name__}, not a dictionary")
    except KeyError as e:
        raise UserError(f"cannot read checkpoint {path} (it has no {e}): not a checkpoint of this "
                        "program; delete it to start afresh or choose another --checkpoint file")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read checkpoint {path} ({e}); delete it to start afresh or "
                        "choose another --checkpoint file")
    if stored.get("task") != config["task"]:
        raise UserError(f"checkpoint {path} is from another task ({stored.get('task')!r}, not "
                        f"{config['task']!r}); choose another --checkpoint file")
    differ = [k for k in keys if stored.get(k) != config[k]]
    if differ:
        said = "; ".join(f"--{k.replace('_', '-')} {stored.get(k)} there, {config[k]} here"
                         if k != "data_sha256" else "other data files" for k in differ)
        raise UserError(f"checkpoint {path} is from another configuration ({said}): rerun with "
                        "its options or choose another --checkpoint file")
    return arrays


@contextlib.contextmanager
def reading_checkpoint(path):
    """Turn what a damaged checkpoint raises while a run is restored from it (a missing array,
    counters that are not JSON, an rng state of another generator) into one line."""
    try:
        yield
    except KeyError as e:
        raise UserError(f"checkpoint {path} has no {e}: it is damaged or not of this program; "
                        "delete it to start afresh or choose another --checkpoint file") from None
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"checkpoint {path} is damaged or not of this program ({e}); delete it "
                        "to start afresh or choose another --checkpoint file") from None


def resume_or_start(config, keys, restore):
    """Restore the run from --checkpoint when that file exists (restore(arrays) does it);
    returns the step resumed at, or None for a fresh run, and says which it is."""
    path = config["checkpoint"]
    if not path:
        return None
    if not os.path.exists(path):
        print(f"no checkpoint at {path} yet: starting from step 0")
        return None
    arrays = load_checkpoint(path, config, keys)
    with reading_checkpoint(path):
        return restore(arrays)


def open_log(path, config_line, columns, resume_step):
    """Open the CSV log for appending. When resuming, keep its header and its rows up to the
    checkpoint's step (later rows were written after the last save and will be written again);
    comment lines after the header, such as a finished run's test result, go too. Else start
    anew."""
    kept = []
    if resume_step is not None and os.path.exists(path):
        header_done = False
        with open(path, newline="") as f:
            for line in f:
                first = line.split(",", 1)[0]
                if first == columns[0]:
                    header_done = True
                    kept.append(line)
                elif line.startswith("#"):
                    if not header_done:
                        kept.append(line)
                elif first.isdigit() and int(first) <= resume_step:
                    kept.append(line)
    if not kept:
        kept = [f"# {config_line}\n", ",".join(columns) + "\n"]
    write_atomically(path, lambda f: f.write("".join(kept).encode()), "log")
    try:
        return open(path, "a", newline="", buffering=1)
    except OSError as e:
        raise UserError(f"cannot write log {path} ({e.strerror or e})") from None


def write_line(log, line):
    """One line into a CSV log opened by open_log. A write that fails (a full disk) is reported
    and training goes on: the checkpoint, not the log, is what a run cannot lose."""
    try:
        log.write(line)
    except OSError as e:
        print(f"warning: cannot write log {log.name} ({e.strerror or e}): this line is lost, "
              "training goes on", file=sys.stderr, flush=True)


def close_log(log):
    with contextlib.suppress(OSError):  # write_line has reported what could not be written
        log.close()


def duration(seconds):
    """'2h05m', '3m07s' or '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def matplotlib_pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path):
    """fig as a PNG at path, written atomically like every other output, then closed."""
    try:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), "plot")
    finally:
        plt.close(fig)
    print(f"plot: {path}")


def write_plot(path, x, y, xlabel, ylabel, title, drawstyle="default", integer_y=False):
    plt = matplotlib_pyplot()
    if plt is None:
        print(f"note: --plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, y, drawstyle=drawstyle, marker="o" if len(x) < 30 else None)
    if integer_y:
        ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(plt, fig, path)


STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: timeout, kill,
# a batch scheduler's notice before it kills the job


@contextlib.contextmanager
def stop_on_signals():
    """Inside the block, Ctrl-C or SIGTERM only sets stop["signal"] (its number): the loop ends
    after the current step and the run saves, so a step is never cut in half and no work is
    lost. A second signal raises KeyboardInterrupt at once (quit without saving)."""
    stop = {"signal": 0}

    def on_signal(signum, frame):
        if stop["signal"]:
            raise KeyboardInterrupt
        stop["signal"] = signum
        print(f"\n{STOP_SIGNALS[signum]}: stopping after this step and saving (a second one "
              "quits without saving)", file=sys.stderr, flush=True)

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread (an embedding program): signals stay as they were
        pass
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(signum, handler)


# --- Main loop ---------------------------------------------------------------------------------


def cli_main(prog, argv, build_parser, resolve_config, run_experiment):
    """Parse argv, run the experiment; user errors become one line and a non-zero status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        config = resolve_config(parser, args)
    except SystemExit as e:  # usage and one error line are printed (2), or --help (0)
        return e.code
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is caught by its
            return run_experiment(config)  # non-finite values and ends with one line, no warnings
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:  # check_memory's estimate fitted, but the memory was gone meanwhile
        rank = " or --rank" if config["method"] in ("ok", "kf-avg") else ""
        print(f"{prog}: error: out of memory; try a smaller --hidden, --batch{rank}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130


def rate_since(mark, step, now):
    """Steps per second since mark = [time, step], which then moves to (now, step)."""
    rate = (step - mark[1]) / max(now - mark[0], 1e-9)
    mark[:] = [now, step]
    return rate


def train(config, run, rng, log, noise_log, stop):
    """Run steps until --steps, or until stop["signal"] is set (Ctrl-C, SIGTERM)."""
    steps, started, step0 = config["steps"], time.monotonic(), run["step"]
    busy = 0.0  # seconds inside training steps: the log's rate leaves out measurements and saves
    row_mark, print_mark, last_save = [busy, step0], [started, step0], started
    while run["step"] < steps and not stop["signal"]:
        begun = time.monotonic()
        x, y, reset = next_symbols(run, rng)
        for nats in train_step(run, config, rng, x, y, reset):  # TBPTT: 0 or K losses
            update_average(run, nats)
        run["step"] += 1
        step, now = run["step"], time.monotonic()
        busy += now - begun
        if step % config["log_every"] == 0:
            run["history"].append((step, run["T"], run["avg"]))
            rate = rate_since(row_mark, step, busy)
            if log is not None:
                write_line(log, f"{step},{run['T']},{run['avg']:.6f},{rate:.2f}\n")
        if config["measure_noise"] and step % config["measure_noise"] == 0:
            record_noise(run, config, noise_log)
            pause = time.monotonic() - now
            print_mark[0] += pause  # the progress line's rate counts training time only
            now += pause
        if now - print_mark[0] >= PROGRESS_SECONDS or step == steps:
            rate = rate_since(print_mark, step, now)
            print(f"step {step:,}/{steps:,}  T {run['T']}  avg {run['avg']:.3f} bits  "
                  f"{rate:.1f} steps/s  ETA {duration((steps - step) / max(rate, 1e-9))}",
                  flush=True)
        if config["checkpoint"] and now - last_save >= config["checkpoint_every"]:
            save_or_warn(config["checkpoint"], checkpoint_arrays(config, rng, run), step)
            last_save = time.monotonic()
    if run["step"] > step0:
        print(f"{run['step'] - step0:,} steps in {duration(time.monotonic() - started)}")


def main(argv=None) -> int:
    return cli_main(PROG, argv, build_parser, resolve_config, run_experiment)


def run_experiment(config):
    print(f"{PROG}: the copy task of Benzing et al. 2019 (arXiv 1902.03993), with its curriculum")
    for key, value in config.items():
        print(f"  {key:17s}{value}")
    config_line = f"{PROG} config: {json.dumps(config)}"
    plot_files = ([config["plot"], os.path.splitext(config["plot"])[0] + "-noise.png"]
                  if config["plot"] and config["measure_noise"] else [config["plot"]])
    check_writable_outputs([("--checkpoint", config["checkpoint"]), ("--log", config["log"]),
                            ("--noise-log", config["noise_log"])]
                           + [("--plot", path) for path in plot_files])
    print(f"memory: about {mib(check_memory(config, N_SYMBOLS))} for the learner and weights")
    if config["plot"] and matplotlib_pyplot() is None:
        print("note: matplotlib is not installed, so --plot will be skipped "
              "(pip install matplotlib)")
    rng = np.random.default_rng(config["seed"])
    run = new_run(config, rng)

    def restore(arrays):
        restore_run(arrays, run, rng, config["checkpoint"])
        print(f"resuming from {config['checkpoint']} at step {run['step']:,} (T {run['T']})")
        return run["step"]
    resume_step = resume_or_start(config, EXPERIMENT_KEYS, restore)
    if resume_step is not None and resume_step >= config["steps"]:
        print(f"already at step {run['step']:,} >= --steps {config['steps']:,}: nothing to train")
    log = None
    if config["log"]:
        log = open_log(config["log"], config_line, ("step", "T", "avg_bits", "steps_per_s"),
                       resume_step)
    noise_log = None
    if config["measure_noise"]:
        noise_log = open_log(config["noise_log"], config_line, ("step", "T", "method", "rank",
                             "median_cosine", "median_rel_error"), resume_step)
    with stop_on_signals() as stop:
        try:
            train(config, run, rng, log, noise_log, stop)
        finally:
            for f in (log, noise_log):
                if f is not None:
                    close_log(f)
        if config["checkpoint"]:
            final_save(config["checkpoint"], checkpoint_arrays(config, rng, run), run["step"])
    if config["plot"]:
        steps_, Ts = zip(*[(0, 1)] + [(s, T) for s, T, _ in run["history"]])  # T_ starts at 1
        write_plot(config["plot"], steps_, Ts, "step", "curriculum T",
                   f"copy task, {config['method']}, n {config['hidden']}", drawstyle="steps-post",
                   integer_y=True)
        if run["noise"]:
            write_noise_plot(plot_files[1], run["noise"])
    print(f"curriculum T {run['T']} at step {run['step']:,} (avg {run['avg']:.3f} bits)")
    return 128 + stop["signal"] if stop["signal"] else 0


if __name__ == "__main__":
    sys.exit(main())
