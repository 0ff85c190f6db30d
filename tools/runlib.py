"""The runners' shared machinery, written once: run_copy.py and run_ptb.py are the two
experiments of Benzing et al., ICML 2019 (arXiv 1902.03993), each written as its task.

A runner module is a Task (the Protocol below, checked when the runner starts): its data or
task generator, the paper's defaults, one training step and what the run measures. main(task,
argv) is the rest, tested once (test_runlib.py): the command line, the loop, checkpoints and
exact resume, the run's status, signals, the memory estimate, plots. No algorithm (ok_rtrl.py
has the math) and nothing that knows a task; the files of a run (atomic writes, the lock, the
CSV log) are runfiles.py's. A run's state is a Run, a dataclass each task extends.

One training step, from the runner's file: its step() gives every stream's input, target and
reset to train_step here, which runs the learner's step (or TBPTT's window) and Adam; the
learners and Adam are ok_rtrl.py's.

The run's configuration is a JSON-able dict: print_config shows it, check_memory refuses a run
that cannot fit, runfiles.log_header writes it into the CSV log naming no folder of the machine.
A run stops after a step on Ctrl-C, SIGTERM or, with --stop-at-eof, at the end of its standard
input (a supervisor that died), and saves; with --status it writes how it stands as JSON.
measure_noise compares the gradient of each learner of NOISE_LEARNERS with exact RTRL's on a
task's sequences (gradient_agreement, usable on its own); write_noise_plot draws the result.
"""
import argparse
import bisect
import contextlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

import ok_rtrl as ok
from tools import runfiles
from tools.runfiles import PAST_DEFAULTS, UserError

METHODS = ok.METHODS + ("tbptt",)  # --method's choices
ADAMS = ("kingma-ba", "tensorflow")  # --adam's choices: see adam_eps
PROGRESS_SECONDS = 5.0  # a progress line at most this often


class Diverged(UserError):
    """A training step whose loss or weights are no longer finite: one line, exit status 1,
    and the status says diverged."""


@dataclass
class Run:
    """A run's state beside its config and rng, all a checkpoint holds: weights, Adam, the step,
    and an online method's learner (which carries h and the influence) or TBPTT's h and the
    steps of its window so far. A task's run extends it with the task's own fields."""
    params: ok.Params
    adam: ok.AdamState
    step: int = 0
    learner: ok.Learner | None = None  # online methods
    h: np.ndarray | None = None  # TBPTT: (B, n), carried from window to window
    window: list = field(default_factory=list)  # TBPTT: (x, y, reset) of each step, (B,) each


@runtime_checkable
class Task(Protocol):
    """What a runner module gives main: these names, checked when the runner starts (a module
    is a Task when it has them all). config is the run's configuration dict, data what prepare
    returned, logs the open CSV logs by option ('--log', the task's own)."""
    TASK: str  # 'copy': the task a checkpoint must be of
    PROG: str  # 'run_copy.py'
    TITLE: str  # a run's first line
    DESCRIPTION: str  # --help's
    DEFAULTS: dict  # --rank, --trunc, --hidden, --batch, --steps: the paper's
    WORDS: dict  # how the shared options' help names its setting, streams, rows, curve, keeps
    COLUMNS: tuple  # the CSV log's
    EXPERIMENT_KEYS: tuple  # the config keys a checkpoint resumes only under

    add_options: Callable[[argparse.ArgumentParser], None]  # its own options
    config: Callable[[argparse.Namespace], tuple]  # -> its config keys as three dicts: experiment
    # (they define the run), data (this machine's folders, never in a log's header), measurements
    outputs: Callable[[dict], list]  # config -> [(option, path, CSV columns or None)] beyond
    # --checkpoint, --log and --status
    prepare: Callable[[dict], tuple]  # config -> (V symbols in and out, data); reads its data
    new_run: Callable[[dict, np.random.Generator, int], Run]  # config, rng, V -> a fresh run
    checkpoint_arrays: Callable[[dict, np.random.Generator, Run], dict]  # around runlib's
    restore_run: Callable[[dict, Run, np.random.Generator, str], None]  # ... and back, exactly
    step: Callable[[Run, dict, np.random.Generator, Any], None]  # one training step of every
    # stream, through train_step
    measure: Callable[[Run, dict, Any, dict], Any]  # after each step: a value that asks for a
    # log row and a save (PTB's validation BPC), else None
    log_row: Callable[[Run, dict, Any, float], str]  # (run, config, measured, rate) -> CSV row
    progress: Callable[[Run, dict, float], str]  # the middle of a progress line
    finish: Callable[[Run, dict, Any, dict], None]  # after the last step (not after a stop)
    result: Callable[[Run], dict]  # what the run has reached, for its status (JSON)
    describe: Callable[[Run], str]  # ... and for people
    plot: Callable[[dict, Run], None]  # draws its --plot


@dataclass
class Stop:
    """Whether the run was asked to stop after its current step: by which signal (0: not
    asked; the exit status is then 128 + it), after how many signals, and tell(state), which
    says so to the runs waiting for its files (runfiles.claim_outputs)."""
    signal: int = 0
    signals: int = 0
    tell: Callable[[str], None] | None = None


@dataclass
class Session:
    """This process's part of a run: --status's file, the command line, the config keys that
    name this machine's data folders (left out of the log's header), --wait-if-held's seconds."""
    status: str | None
    argv: list
    local: list
    wait: float


def check_task(task):
    """Refuse a runner module that is not a Task, naming what it lacks."""
    if not isinstance(task, Task):
        names = list(Task.__annotations__)
        missing = [name for name in names if not hasattr(task, name)]
        raise TypeError(f"{getattr(task, '__name__', task)} is not a runlib.Task: it lacks "
                        f"{', '.join(missing)}")


# --- Command line: argument types, the options every runner has, errors as one line -------------


def int_at_least(low):
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


def positive_float(text):
    """A number option that must be finite and > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def output_path(text):
    """A file to write: its folder must exist now, not only when the run ends hours later."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder, expected a file name")
    return text


def build_parser(task):
    """The runner's command line: the options every runner has, with the task's defaults and
    words, then the task's own (task.add_options), then those of a supervised run."""
    d, words = task.DEFAULTS, task.WORDS
    p = argparse.ArgumentParser(prog=task.PROG, description=task.DESCRIPTION)
    p.add_argument("--method", choices=METHODS, default="ok",
                   help="learning algorithm (default ok, the paper's): KF-RTRL (kf), kf-avg "
                   "(r averaged KF-RTRL copies), UORO, exact RTRL (small --hidden only), or TBPTT "
                   "(ok_rtrl.py, sections 2-6)")
    p.add_argument("--rank", type=int_at_least(1), metavar="R",
                   help=f"OK's rank, or kf-avg's number of averaged KF-RTRL copies (default "
                   f"{d['rank']}, the paper's {words['paper']} rank); kf is rank 1")
    p.add_argument("--trunc", type=int_at_least(1), metavar="K",
                   help=f"TBPTT window, --method tbptt only (default {d['trunc']}: the paper "
                   "gives no window; its PTB streams reset every 100 characters)")
    p.add_argument("--hidden", type=int_at_least(1), default=d["hidden"], metavar="N",
                   help=f"hidden units (default {d['hidden']}, the paper's {words['paper']} "
                   "network)")
    p.add_argument("--batch", type=int_at_least(1), default=d["batch"], metavar="B",
                   help=f"streams, {words['streams']} (default {d['batch']}, the paper's)")
    p.add_argument("--lr", type=positive_float, default=10 ** -3.5,
                   help="Adam learning rate (default 10^-3.5 = 3.16e-4, the paper's: the best "
                   "of its grid 10^-2.5 .. 10^-4)")
    p.add_argument("--steps", type=int_at_least(0), default=d["steps"],
                   help=f"total steps, a resumed checkpoint's included; 1e5 or 100_000 work too "
                   f"(default {d['steps']:,}, the paper's runs)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the one numpy Generator behind all randomness (default 0)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="floating point type (default float32, as the paper's TensorFlow code)")
    p.add_argument("--adam", choices=ADAMS, default="kingma-ba",
                   help="Adam as Kingma and Ba write it (default), or as the paper's TensorFlow "
                   "code ran it: eps before the bias correction, on W's gradient divided by B "
                   "(docs/results.md, \"Where we differ\")")
    p.add_argument("--threads", type=int_at_least(1), default=ok.get_threads(), metavar="N",
                   help="threads of each training step (default: the %(default)s cores this "
                   "process may use). Runs side by side should share the cores out: two runs "
                   "on 2 cores, --threads 1 each. The results do not depend on it")
    p.add_argument("--spec", action="store_true",
                   help="train with ok_rtrl.py's Part I, the plain-numpy spec of the paper's "
                   "algorithm, instead of its engine: the same numbers up to rounding, slower "
                   "(for reading along, or checking a port)")
    p.add_argument("--log", type=output_path, metavar="FILE.csv",
                   help=f"CSV log: {', '.join(task.COLUMNS)}, a row every --log-every steps"
                   f"{words['rows']}; the config in a first '#' line")
    p.add_argument("--log-every", type=int_at_least(1), default=1000, metavar="STEPS",
                   help="steps between log rows (default 1000, as the paper's code printed)")
    p.add_argument("--checkpoint", type=output_path, metavar="FILE.npz",
                   help="resume from FILE if it exists; save to it every --checkpoint-every "
                   "seconds, at the end and when stopped (Ctrl-C, SIGTERM, --stop-at-eof); it "
                   "holds the current run (weights, Adam, learner state, data position, "
                   f"counters){words['keeps']}")
    p.add_argument("--checkpoint-every", type=positive_float, default=300.0, metavar="SECONDS",
                   help="seconds between periodic checkpoints (default 300)")
    p.add_argument("--plot", type=output_path, metavar="FILE.png",
                   help=f"{words['curve']} (needs matplotlib)")
    task.add_options(p)
    supervised = p.add_argument_group(
        "a run under a supervisor", "python -m tools.sweep runs every runner with these three")
    supervised.add_argument("--status", type=output_path, metavar="FILE.json",
                            help="how the run stands, as JSON: written when it starts training, "
                            "at each save and when it ends (state running, finished, stopped, "
                            "diverged, failed, refused or interrupted; its step and result)")
    supervised.add_argument("--stop-at-eof", action="store_true",
                            help="stop and save as on SIGTERM when standard input ends: given a "
                            "pipe from the program that supervises it, the run never outlives "
                            "that program")
    supervised.add_argument("--wait-if-held", type=positive_float, metavar="SECONDS",
                            help="if a run that is stopping holds these files, wait up to "
                            "SECONDS for it to save and exit (default: refuse at once)")
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


def resolve_config(task, parser, args):
    """The run's configuration as a JSON-able dict, rank and trunc resolved per method, in the
    order of the log's '#' line: the network and method, the task's experiment keys, --steps,
    the task's data folders, the outputs, the task's measurements. -> (config, the keys of the
    data folders, which the log's '#' line leaves out)."""
    rank, trunc = resolve_rank_and_trunc(parser, args, task.DEFAULTS["rank"],
                                         task.DEFAULTS["trunc"])
    experiment, data, measurements = task.config(args)
    return {"task": task.TASK, "method": args.method, "rank": rank, "trunc": trunc,
            "hidden": args.hidden, "batch": args.batch, "lr": args.lr, "seed": args.seed,
            "dtype": args.dtype, "adam": args.adam, "threads": args.threads,
            **({"spec": True} if args.spec else {}), **experiment,
            "steps": args.steps, **data, "log": args.log, "log_every": args.log_every,
            "checkpoint": args.checkpoint, "checkpoint_every": args.checkpoint_every,
            "plot": args.plot, **measurements}, list(data)


def resolve(task, argv):
    """The configuration argv gives a run of task, as main resolves it before the run starts
    (no data read, no file touched), or None when argv does not parse. A supervisor compares
    runs by it, whatever the spelling or order of their options (python -m tools.sweep)."""
    parser = build_parser(task)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return resolve_config(task, parser, parser.parse_args(argv))[0]
        except SystemExit:
            return None


def main(task, argv=None):
    """A runner's main: parse argv, run the experiment. A user error becomes one line and exit
    status 1 (files that another run holds: runfiles.BUSY_EXIT); a stop, 128 + its signal.
    task is the runner module, checked first (check_task)."""
    check_task(task)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(task)
    try:
        args = parser.parse_args(argv)
        config, local = resolve_config(task, parser, args)
    except SystemExit as e:  # usage and one error line are printed (2), or --help (0)
        return e.code
    session, stop = Session(args.status, argv, local, args.wait_if_held or 0.0), Stop()
    if args.stop_at_eof:
        stop_at_end_of_input(stop)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # a diverging run is caught by its
            return run_experiment(task, config, session, stop)  # non-finite values, one line
    except UserError as e:
        print(f"{task.PROG}: error: {e}", file=sys.stderr)
        return runfiles.BUSY_EXIT if isinstance(e, runfiles.Busy) else 1
    except MemoryError:  # check_memory's estimate fitted, but the memory was gone meanwhile
        rank = " or --rank" if config["method"] in ("ok", "kf-avg") else ""
        print(f"{task.PROG}: error: out of memory; try a smaller --hidden, --batch{rank}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{task.PROG}: interrupted; nothing saved since the last checkpoint",
              file=sys.stderr)
        return 130


def print_config(title, config):
    """The run's first lines: what it is, then its resolved configuration, one key a line."""
    print(title)
    for key, value in config.items():
        print(f"  {key:17s}{value}")


# --- The run: weights, Adam, learner, h, TBPTT window; one training step -----------------------


def new_run(config, rng, V, kind=Run, **fields):
    """A fresh run of kind (Run or a task's extension of it, with its fields): weights drawn
    first from rng (V symbols in and out), Adam, step 0, and for an online method its
    ok.Learner (which carries h and draws its signs from rng), for TBPTT h = 0."""
    B, n = config["batch"], config["hidden"]
    params = ok.init_params(V, n, V, rng, dtype=np.dtype(config["dtype"]))
    adam = ok.adam_init(params)
    if config["method"] == "tbptt":
        return kind(params, adam, h=np.zeros((B, n), params.W.dtype), **fields)
    learner = ok.Learner(params, B, config["method"], config["rank"] or 1, rng,
                         spec=config.get("spec", False))
    return kind(params, adam, learner=learner, **fields)


def train_step(run, config, x, y, reset):
    """One step of every stream -> the batch-mean losses (nats) of the steps just trained on.

    x, y, reset (B,): each stream's input and target symbol, and whether its h and learner state
    start afresh before the step. Online methods: one learner step and one Adam update, so one
    loss. TBPTT: the step joins the window; when it holds K steps, BPTT over the window (from
    the carried h) and one update with its gradient divided by K, the scale of one online step
    (docs/results.md, "Where we differ"), return their K losses; inside a window there are
    none. As in the paper's code, the batch-mean W gradient is clipped to norm B (its code
    divides the mean by B once more and clips to norm 1). A diverged run becomes one line.
    """
    B, eps = config["batch"], adam_eps(config, run.adam.t + 1)
    try:
        if config["method"] == "tbptt":
            run.window.append((x, y, reset))
            if len(run.window) < config["trunc"]:
                return np.zeros(0)
            xs, ys, resets = (np.stack(column) for column in zip(*run.window))  # (K, B) each
            run.window = []
            losses, dW, dW_out, run.h = ok.bptt(run.params, xs, ys, run.h, resets,
                                                spec=config.get("spec", False))
            dW, dW_out = dW / len(losses), dW_out / len(losses)
        else:
            stream_losses, dW, dW_out = run.learner.step(run.params, x, y, reset)
            losses = np.array([stream_losses.mean()], dtype=np.float64)
        run.params, run.adam, _ = ok.apply_gradients(run.params, run.adam, dW, dW_out,
                                                     config["lr"], max_norm=B, eps=eps)
        if not np.all(np.isfinite(losses)):
            raise FloatingPointError("the loss is not finite: the run diverged; lower the "
                                     "learning rate or train in float64")
        if not all(np.isfinite(p).all() for p in run.params):  # e.g. an lr beyond float32
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
        raise UserError(f"step {run.step + 1}: {e}{kept}") from None
    return losses


def adam_eps(config, t, eps=1e-8, beta2=0.999):
    """Adam's eps at its step t for config["adam"], as ok.apply_gradients takes it.

    kingma-ba: eps added to sqrt(v_hat), as Kingma and Ba write Adam. tensorflow: Adam as the
    paper's code ran it. TensorFlow adds eps to sqrt(v) before the bias correction, which is
    Kingma and Ba's step with eps / sqrt(1 - beta2^t); and that code gave it W's gradient
    divided by B once more (then clipped to norm 1, our clipping to norm B, scaled), on which
    scale the same eps is B times larger than on ours. W_out got the plain batch mean.
    """
    if config["adam"] == "kingma-ba":
        return eps
    early = eps / math.sqrt(1.0 - beta2 ** t)
    return config["batch"] * early, early


# --- Checkpoints: what a run is made of, as named arrays, and back -------------------------------


def checkpoint_arrays(config, rng, run, counters, task_arrays):
    """Everything a run needs to go on exactly where it stopped, as named arrays for np.savez:
    the config, the rng's state, counters, a dict that starts with the step (as JSON, which
    keeps floats exactly, Infinity included), weights, Adam, h, the learner's influence
    ('learner.*') or the TBPTT window, and the task's own arrays (a dict of arrays or
    NamedTuples such as Params)."""
    B, window = config["batch"], run.window
    carried = run.learner.state() if run.learner is not None else ok.LearnerState(run.h, ())
    arrays = {"config": json.dumps(config), "rng": json.dumps(rng.bit_generator.state),
              "counters": json.dumps(counters), "h": carried.h,
              "window_x": np.array([w[0] for w in window], np.int64).reshape(-1, B),  # (k, B)
              "window_y": np.array([w[1] for w in window], np.int64).reshape(-1, B),
              "window_reset": np.array([w[2] for w in window], bool).reshape(-1, B)}
    arrays.update(_flatten("params", run.params))
    arrays.update(_flatten("adam", run.adam))
    if carried.influence:
        arrays.update(_flatten("learner", carried.influence))
    for name, value in task_arrays.items():
        arrays.update(_flatten(name, value))
    return arrays


def restore_run(arrays, run, rng, path, task_tuples=()):
    """Overwrite a fresh run (new_run's) and rng with what checkpoint_arrays saved, shapes and
    dtypes checked, with the run's NamedTuples named in task_tuples (PTB's best weights).
    -> the counters, whose step is restored; the task restores the rest and its arrays."""
    for name in ("params", "adam") + tuple(task_tuples):
        setattr(run, name, _unflatten(name, getattr(run, name), arrays, path))
    if run.learner is not None:
        carried = run.learner.state()  # its shapes and dtypes, which the checkpoint must have
        run.learner.load(ok.LearnerState(_unflatten("h", carried.h, arrays, path),
                                         _unflatten("learner", carried.influence, arrays, path)))
    else:
        run.h = _unflatten("h", run.h, arrays, path)
        run.window = list(zip(arrays["window_x"], arrays["window_y"], arrays["window_reset"]))
    counters = json.loads(str(arrays["counters"]))
    run.step = counters["step"]
    rng.bit_generator.state = json.loads(str(arrays["rng"]))
    return counters


def _flatten(prefix, value):
    """Named arrays of a (nested) NamedTuple, keyed 'prefix.field.subfield', for np.savez."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        named = {}
        for name, field in zip(value._fields, value):
            named.update(_flatten(f"{prefix}.{name}", field))
        return named
    return {prefix: np.asarray(value)}


def _unflatten(prefix, template, arrays, path):
    """Rebuild a (nested) NamedTuple shaped like template from _flatten's arrays."""
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*(_unflatten(f"{prefix}.{name}", field, arrays, path)
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


def resume_or_start(config, keys, restore):
    """Restore the run from --checkpoint when that file exists (restore(arrays) does it and
    returns the step); returns the step resumed at, or None for a fresh run, and says which it
    is, and when the run is already at --steps."""
    path = config["checkpoint"]
    if not path:
        return None
    if not os.path.exists(path):
        print(f"no checkpoint at {path} yet: starting from step 0")
        return None
    arrays = _load_checkpoint(path, config, keys)
    with _reading_checkpoint(path):
        step = restore(arrays)
    if step >= config["steps"]:
        print(f"already at step {step:,} >= --steps {config['steps']:,}: nothing to train")
    return step


def _load_checkpoint(path, config, keys):
    """The arrays of checkpoint path, after checking that it was written by the same task with
    the same values of the experiment's keys. Only those are compared, never a file name, so
    a checkpoint resumes wherever it has been moved."""
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
    stored = {**PAST_DEFAULTS, **stored}
    missing = [k for k in keys if k not in stored]
    if missing:  # a key added to the experiment since: the stored run means something else
        raise UserError(f"checkpoint {path} was written by an older version of this program, "
                        f"before {', '.join(missing)} became part of the experiment (see "
                        "docs/results.md, \"Where we differ\"); it cannot be resumed: start afresh "
                        "with another --checkpoint file")
    differ = [k for k in keys if stored.get(k) != config[k]]
    if differ:
        said = "; ".join(f"--{k.replace('_', '-')} {stored.get(k)} there, {config[k]} here"
                         if k != "data_sha256" else "other data files" for k in differ)
        raise UserError(f"checkpoint {path} is from another configuration ({said}): rerun with "
                        "its options or choose another --checkpoint file")
    return arrays


@contextlib.contextmanager
def _reading_checkpoint(path):
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


# --- Saves: never a half-written checkpoint, never a lost run -----------------------------------


def save_atomically(path, arrays):
    """np.savez through runfiles.write_atomically: never a half-written checkpoint."""
    runfiles.write_atomically(path, lambda f: np.savez(f, **arrays), "checkpoint")


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


# --- Stopping: Ctrl-C, SIGTERM, the end of standard input; after a step, with a save ------------

STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # SIGTERM: timeout, kill,
# a batch scheduler's notice before it kills the job


def request_stop(stop, signum, reason, note=""):
    """Ask the run to stop after its current step and save, as signal signum would (stop.signal:
    the exit status is 128 + it), and tell the runs waiting for its files."""
    if stop.signal:
        return
    stop.signal = signum
    print(f"\n{reason}: stopping after this step and saving{note}", file=sys.stderr, flush=True)
    if stop.tell is not None:
        stop.tell("stopping")


def stop_at_end_of_input(stop):
    """--stop-at-eof: a thread reads standard input until its end, then stops the run as SIGTERM
    does. A supervisor (sweep.py, or its task on a Dask worker) gives the runner a pipe and
    never writes to it; the pipe ends when the supervisor's process ends, however it ends
    (SIGKILL, a lost worker, a restarting nanny), so the run saves instead of going on alone."""
    def watch():
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no stdin: its end too
            while os.read(sys.stdin.fileno(), 4096):
                pass
        request_stop(stop, signal.SIGTERM, "standard input has ended (the process that "
                     "supervised this run is gone)")
    threading.Thread(target=watch, name="stop-at-eof", daemon=True).start()


@contextlib.contextmanager
def stop_on_signals(stop):
    """Inside the block, Ctrl-C or SIGTERM only asks the run to stop (request_stop): the loop
    ends after the current step and the run saves, so a step is never cut in half and no work
    is lost. A second signal raises KeyboardInterrupt at once (quit without saving)."""
    def on_signal(signum, frame):
        stop.signals += 1
        if stop.signals > 1:
            raise KeyboardInterrupt
        request_stop(stop, signum, STOP_SIGNALS[signum], " (a second one quits without saving)")

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, on_signal)
    except ValueError:  # not the main thread (an embedding program): signals stay as they were
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be restored
                signal.signal(signum, handler)


# --- The run from start to end: its files, the loop, its status ----------------------------------


def run_experiment(task, config, session, stop):
    """The whole run: its files held, data read, resumed or started, trained, finished, saved
    and plotted; its status (--status) written when training starts, at each save and at the
    end. -> exit status: 0, or 128 + the signal that stopped it."""
    print_config(task.TITLE, config)
    ok.set_threads(config["threads"])
    outputs = ([("--checkpoint", config["checkpoint"], None), ("--log", config["log"],
                                                               task.COLUMNS)]
               + task.outputs(config) + [("--status", session.status, None)])
    if (any(path for option, path, _ in outputs if option == "--plot")
            and runfiles.matplotlib_pyplot() is None):
        print("note: matplotlib is not installed, so --plot will be skipped "
              "(pip install matplotlib)")
    run, logs = None, {}

    def report(state, message=""):
        """The run's status as JSON in --status: for sweep.py, or whoever watches the run."""
        if session.status:
            status = {"state": state, "step": run.step if run else None,
                      "steps": config["steps"],
                      "result": task.result(run) if run else {}, "message": message,
                      "pid": os.getpid(), "argv": session.argv}
            try:
                runfiles.write_json(session.status, status, "status")
            except UserError as e:
                print(f"warning: {e}; the run goes on", file=sys.stderr, flush=True)

    with runfiles.claim_outputs([output[:2] for output in outputs], session.wait,
                                lambda: stop.signal) as tell:
        stop.tell = tell
        if stop.signal:  # asked before the files were ours: those waiting for them know now
            tell("stopping")
        try:
            V, data = task.prepare(config)
            print(f"memory: about {mib(check_memory(config, V))} for the learner and weights")
            rng = np.random.default_rng(config["seed"])
            run = task.new_run(config, rng, V)

            def restore(arrays):
                task.restore_run(arrays, run, rng, config["checkpoint"])
                print(f"resuming from {config['checkpoint']} at step {run.step:,}: "
                      f"{task.describe(run)}")
                return run.step
            resume_step = resume_or_start(config, task.EXPERIMENT_KEYS, restore)
            header = runfiles.log_header(task.PROG, config, local=session.local)
            for option, path, columns in outputs:
                if path and columns:
                    logs[option] = runfiles.open_log(path, header, columns, resume_step)
        except UserError as e:
            run = None  # refused before training: no step or result of this session to report
            report("refused", str(e))
            raise
        try:
            with stop_on_signals(stop):
                report("running")  # once a signal would stop it with a save
                try:
                    train(task, config, run, rng, data, logs, stop, report)
                    if not stop.signal:
                        task.finish(run, config, data, logs)
                finally:
                    for log in logs.values():
                        runfiles.close_log(log)
                if config["checkpoint"]:
                    final_save(config["checkpoint"], task.checkpoint_arrays(config, rng, run),
                               run.step)
            if config["plot"]:
                task.plot(config, run)
        except UserError as e:
            report("diverged" if isinstance(e, Diverged) else "failed", str(e))
            raise
        except KeyboardInterrupt:
            report("interrupted", "quit without saving: the checkpoint holds the last save")
            raise
        report("stopped" if stop.signal else "finished")
    print(f"{'stopped' if stop.signal else 'finished'} at step {run.step:,}: "
          f"{task.describe(run)}")
    return 128 + stop.signal if stop.signal else 0


def train(task, config, run, rng, data, logs, stop, report):
    """Steps until --steps, or until the run is asked to stop: each step the task's, then its
    measurement (task.measure), a log row every --log-every steps and after a measurement, a
    progress line at most every PROGRESS_SECONDS, a save every --checkpoint-every seconds and
    after a measurement. Rates count the seconds inside training steps only."""
    steps, started, step0 = config["steps"], time.monotonic(), run.step
    busy = 0.0  # seconds inside training steps: the log's rate leaves out measurements and saves
    row_mark, print_mark, last_save = [busy, step0], [started, step0], started
    while run.step < steps and not stop.signal:
        begun = time.monotonic()
        try:
            task.step(run, config, rng, data)
        except UserError as e:  # train_step's one error: the loss or the weights are not finite
            raise Diverged(str(e)) from None
        run.step += 1
        step, now = run.step, time.monotonic()
        busy += now - begun
        measured = task.measure(run, config, data, logs)
        if step % config["log_every"] == 0 or measured is not None:
            row = task.log_row(run, config, measured, rate_since(row_mark, step, busy))
            if "--log" in logs:
                runfiles.write_line(logs["--log"], row)
        pause = time.monotonic() - now
        print_mark[0] += pause  # the progress line's rate counts training time only
        now += pause
        if now - print_mark[0] >= PROGRESS_SECONDS or step == steps:
            rate = rate_since(print_mark, step, now)
            print(f"step {step:,}/{steps:,}  {task.progress(run, config, rate)}  ETA "
                  f"{duration((steps - step) / max(rate, 1e-9))}", flush=True)
        if config["checkpoint"] and (measured is not None
                                     or now - last_save >= config["checkpoint_every"]):
            if save_or_warn(config["checkpoint"], task.checkpoint_arrays(config, rng, run), step):
                report("running")
            last_save = time.monotonic()
    if run.step > step0:
        print(f"{run.step - step0:,} steps in {duration(time.monotonic() - started)}")


# --- Memory: refuse a run that cannot fit, before anything is allocated --------------------------

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
    """Bytes one training step holds at its peak, an upper bound (test_runlib.py checks it
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
    """The largest k in 1..high with fits(k) (true up to some k, false after), or 0 if none:
    the number of ks that fit, found by bisection."""
    return bisect.bisect_left(range(1, high + 1), True, key=lambda k: not fits(k))


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


# --- Progress ------------------------------------------------------------------------------------


def duration(seconds):
    """'2h05m', '3m07s' or '12s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def rate_since(mark, step, now):
    """Steps per second since mark = [time, step], which then moves to (now, step)."""
    rate = (step - mark[1]) / max(now - mark[0], 1e-9)
    mark[:] = [now, step]
    return rate


# --- Plots (matplotlib is optional) ---------------------------------------------------------------


def write_plot(path, x, y, xlabel, ylabel, title, drawstyle="default", integer_y=False):
    """One curve y against x as a PNG at path; a note instead without matplotlib."""
    plt = runfiles.matplotlib_pyplot()
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
    runfiles.save_figure(plt, fig, path)
    print(f"plot: {path}")


# --- Gradient noise: each learner against exact RTRL on the same sequences ----------------------

NOISE_LEARNERS = (("ok", 1), ("ok", 2), ("ok", 4), ("ok", 8), ("ok", 16),
                  ("kf", 1), ("kf-avg", 8), ("kf-avg", 16), ("uoro", 1))


def gradient_agreement(params, xs, ys, learners, rng, h0=None, resets=None):
    """How close each learner's step gradient is to exact RTRL's, on one shared trajectory.

    Every learner in learners, a list of (method, rank), runs beside exact RTRL on the same
    inputs, states and fixed params, from h0 (B, n) and zero influence; resets (T, B) as in
    ok.bptt. Returns cosine and rel_error, each (T, len(learners)): per step t, the cosine
    similarity of the learner's dW_t with exact dW_t and ||dW_t - exact||^2 / ||exact||^2.
    """
    xs, ys = np.asarray(xs), np.asarray(ys)  # each Learner.step checks its step's symbols
    T, B = xs.shape
    n = ok.sizes(params)[1]
    h = np.zeros((B, n), params.W.dtype) if h0 is None else np.asarray(h0, params.W.dtype)
    if h.shape != (B, n) or not np.isfinite(h).all():
        raise ValueError(f"h0 must be a finite ({B}, {n}) array, got shape {h.shape}")
    exact, *others = (ok.Learner(params, B, method, rank, rng)
                      for method, rank in [("rtrl", 1)] + list(learners))
    for learner in [exact] + others:  # each from h0 and zero influence
        learner.load(learner.state()._replace(h=h))
    cosine, rel_error = np.empty((T, len(learners))), np.empty((T, len(learners)))
    for t in range(T):
        reset = None if resets is None else resets[t]
        g_exact = exact.step(params, xs[t], ys[t], reset)[1]
        for k, learner in enumerate(others):  # the same h as exact's: the same cell, same inputs
            cosine[t, k], rel_error[t, k] = _agreement(learner.step(params, xs[t], ys[t], reset)[1],
                                                       g_exact)
    return cosine, rel_error


def _agreement(g, g_exact):
    """Cosine similarity and relative squared error of g against g_exact, in float64.

    Zero norms: two zero gradients agree perfectly (1, 0); one zero gradient against a non-zero
    one has cosine 0, and a non-zero g against a zero g_exact an infinite relative error.
    """
    g, g_exact = g.astype(np.float64).ravel(), g_exact.astype(np.float64).ravel()
    norm, norm_exact = np.sqrt(g @ g), np.sqrt(g_exact @ g_exact)
    error = ((g - g_exact) ** 2).sum()
    if norm_exact == 0.0:
        return (1.0, 0.0) if norm == 0.0 else (0.0, np.inf)
    cosine = g @ g_exact / (norm * norm_exact) if norm > 0.0 else 0.0
    return cosine, error / norm_exact**2


def measure_noise(params, xs, ys, resets, rng):
    """Median cosine and median relative squared error, against exact RTRL, of the gradient of
    each learner of NOISE_LEARNERS (one value each, (len(NOISE_LEARNERS),)), over the steps of
    the task's sequences xs, ys, resets (S, B) at the fixed weights params.

    Nothing is trained. rng draws the learners' signs: give it a Generator of its own (not the
    run's), so that a run with measurements trains exactly as one without. A sequence of k steps
    since its reset gives G a Kronecker rank of at most k, so OK of a higher rank is exact on it.
    """
    cosine, rel_error = gradient_agreement(params, xs, ys, NOISE_LEARNERS, rng,
                                           resets=resets)  # (S, len(NOISE_LEARNERS)) each
    return np.median(cosine, axis=0), np.median(rel_error, axis=0)


def write_noise_plot(path, steps, cosines):
    """Cosine with exact RTRL against rank (the last measurement) and against training steps:
    steps (M,) of the measurements, cosines (M, len(NOISE_LEARNERS)) their medians."""
    plt = runfiles.matplotlib_pyplot()
    if plt is None:
        print(f"note: --plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    steps, cosines = np.asarray(steps), np.asarray(cosines)
    fig, (by_rank, by_step) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method, style in (("ok", "o-"), ("kf-avg", "s--"), ("uoro", "^")):
        ks = [k for k, (m, _) in enumerate(NOISE_LEARNERS) if m == method or
              (method == "kf-avg" and m == "kf")]  # KF-RTRL is kf-avg of rank 1
        ranks = [NOISE_LEARNERS[k][1] for k in ks]
        by_rank.plot(ranks, cosines[-1, ks], style, label=method)
    for k, (method, rank) in enumerate(NOISE_LEARNERS):
        by_step.plot(steps, cosines[:, k], label=f"{method} {rank}" if method != "kf" else "kf")
    by_rank.set(xscale="log", xlabel="rank r", ylabel="median cosine with exact RTRL",
                title=f"at step {int(steps[-1]):,}")
    by_step.set(xlabel="training step", ylabel="median cosine with exact RTRL")
    for ax in (by_rank, by_step):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    runfiles.save_figure(plt, fig, path)
    print(f"plot: {path}")
