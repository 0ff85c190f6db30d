"""The machinery of a long online training run, shared by the experiment runners.

run_copy.py and run_ptb.py are the two experiments of Benzing et al., ICML 2019 (arXiv
1902.03993), each written as its task: the data or the task generator, the configuration with
the paper's defaults, the task's part of the training loop, the command line. What a run needs
beyond its task is here, once, and tested once (test_runlib.py): no algorithm (ok_rtrl.py has
the math) and nothing that knows a task.

What a task provides, and what this module does with it:

- Its options, parsed with int_at_least, positive_float and output_path (a bad value is usage
  and one line, exit 2) and METHODS; resolve_rank_and_trunc gives --method its rank and window,
  add_shared_options adds --adam and --threads.
  Its main(argv) is cli_main(...), which turns every UserError into one line and exit status 1.
- Its configuration, a JSON-able dict with at least task, method, rank, trunc, hidden, batch,
  lr, seed, dtype and checkpoint, and the keys that define its experiment (a checkpoint resumes
  only under the same values; data_sha256, if the task reads data files, identifies them):
  print_config shows it, check_memory refuses a run that cannot fit, log_header writes it into
  the CSV log naming no folder of the machine.
- Its output files (option, path): claim_outputs checks before the first step that each can be
  written, and holds them for as long as the run lives, so a second run on them is refused.
- Its number of symbols V: new_run draws the weights and makes Adam, the learner and h, to which
  the task adds its own state.
- Each step's inputs, targets and resets (B,): train_step trains on them (one online update, or
  a TBPTT window once it is full), and a diverged run ends in one line.
- Its counters and own arrays: checkpoint_arrays adds the weights, Adam, learner, h, TBPTT window
  and rng; save_or_warn (during the run) and final_save (at its end) write them atomically and
  never lose a run; resume_or_start and restore_run bring it back, bit for bit.
- Its log columns and rows: open_log starts a log or resumes it with its checkpoint, write_line
  adds a row and survives a full disk, close_log ends it. The loop runs inside stop_on_signals
  (Ctrl-C or SIGTERM stop it after a step, and the run saves); duration, rate_since and
  PROGRESS_SECONDS serve its progress lines; write_plot draws its curve if matplotlib is there.
- Sequences of the task at the current weights: measure_noise compares the gradient of each
  learner of NOISE_LEARNERS with exact RTRL's on them (gradient_agreement, usable on its own);
  write_noise_plot draws the result.
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import zipfile

try:
    import fcntl  # POSIX: the lock of claim_outputs
except ImportError:  # Windows: runs go unlocked
    fcntl = None

import numpy as np

import ok_rtrl as ok

METHODS = ok.METHODS + ("tbptt",)  # --method's choices
ADAMS = ("kingma-ba", "tensorflow")  # --adam's choices: see adam_eps
# Experiment keys added since runs were first made, with the value those runs had: a checkpoint
# written before a key existed resumes under that value, and only under it.
PAST_DEFAULTS = {"adam": "kingma-ba"}
PROGRESS_SECONDS = 5.0  # a progress line at most this often


class UserError(Exception):
    """A problem the user can fix (missing data, a wrong checkpoint, a diverged run): printed
    as one line, exit status 1."""


# --- Command line: argument types, --rank and --trunc, errors as one line ------------------------


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


def add_shared_options(p):
    """--adam and --threads, the same in every runner."""
    p.add_argument("--adam", choices=ADAMS, default="kingma-ba",
                   help="Adam as Kingma and Ba write it (default), or as the paper's TensorFlow "
                   "code ran it: eps before the bias correction, on W's gradient divided by B "
                   "(README, \"Where we differ\")")
    p.add_argument("--threads", type=int_at_least(1), default=ok.get_threads(), metavar="N",
                   help="threads of each training step (default: the %(default)s cores this "
                   "process may use). Runs side by side should share the cores out: two runs "
                   "on 2 cores, --threads 1 each. The results do not depend on it")


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


def print_config(title, config):
    """The run's first lines: what it is, then its resolved configuration, one key a line."""
    print(title)
    for key, value in config.items():
        print(f"  {key:17s}{value}")


# --- The run: weights, Adam, learner, h, TBPTT window; one training step -----------------------


def new_run(config, rng, V):
    """A fresh run: weights drawn first from rng (V symbols in and out), Adam, step 0, and for
    an online method its ok.Learner (which carries h and draws its signs from rng), for TBPTT
    h = 0 and an empty window. The task adds its own entries to the dict."""
    B, n = config["batch"], config["hidden"]
    params = ok.init_params(V, n, V, rng, dtype=np.dtype(config["dtype"]))
    run = {"params": params, "adam": ok.adam_init(params), "step": 0}
    if config["method"] == "tbptt":
        return dict(run, h=np.zeros((B, n), params.W.dtype), window=[])
    return dict(run, learner=ok.Learner(params, B, config["method"], config["rank"] or 1, rng))


def train_step(run, config, rng, x, y, reset):
    """One step of every stream -> the batch-mean losses (nats) of the steps just trained on.

    x, y, reset (B,): each stream's input and target symbol, and whether its h and learner state
    start afresh before the step. Online methods: one learner step and one Adam update, so one
    loss. TBPTT: the step joins the window; when it holds K steps, BPTT over the window (from
    the carried h) and one update with its gradient divided by K, the scale of one online step
    (README, "Where we differ"), return their K losses; inside a window there are none. As in
    the paper's code, the batch-mean W gradient is clipped to norm B (its code divides the mean
    by B once more and clips to norm 1). A diverged run becomes one line.
    """
    B, eps = config["batch"], adam_eps(config, run["adam"].t + 1)
    try:
        if config["method"] == "tbptt":
            run["window"].append((x, y, reset))
            if len(run["window"]) < config["trunc"]:
                return np.zeros(0)
            xs, ys, resets = (np.stack(column) for column in zip(*run["window"]))  # (K, B) each
            run["window"] = []
            losses, dW, dW_out, run["h"] = ok.bptt(run["params"], xs, ys, run["h"], resets)
            dW, dW_out = dW / len(losses), dW_out / len(losses)
        else:
            stream_losses, dW, dW_out = run["learner"].step(run["params"], x, y, reset)
            losses = np.array([stream_losses.mean()], dtype=np.float64)
        run["params"], run["adam"], _ = ok.apply_gradients(run["params"], run["adam"], dW, dW_out,
                                                           config["lr"], max_norm=B, eps=eps)
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
    the config, the rng's state, the run's entries named in counters (as JSON, which keeps floats
    exactly, Infinity included), weights, Adam, h, the learner's influence ('learner.*') or the
    TBPTT window, and the task's own arrays (a dict of arrays or NamedTuples such as Params)."""
    B = config["batch"]
    window = run.get("window", [])
    carried = run["learner"].state() if "learner" in run else ok.LearnerState(run["h"], ())
    arrays = {"config": json.dumps(config), "rng": json.dumps(rng.bit_generator.state),
              "counters": json.dumps({k: run[k] for k in counters}), "h": carried.h,
              "window_x": np.array([w[0] for w in window], np.int64).reshape(-1, B),  # (k, B)
              "window_y": np.array([w[1] for w in window], np.int64).reshape(-1, B),
              "window_reset": np.array([w[2] for w in window], bool).reshape(-1, B)}
    arrays.update(_flatten("params", run["params"]))
    arrays.update(_flatten("adam", run["adam"]))
    if carried.influence:
        arrays.update(_flatten("learner", carried.influence))
    for name, value in task_arrays.items():
        arrays.update(_flatten(name, value))
    return arrays


def restore_run(arrays, run, rng, path, task_tuples=()):
    """Overwrite a fresh run (new_run's) and rng with what checkpoint_arrays saved, shapes and
    dtypes checked, with the run's NamedTuples named in task_tuples (PTB's best weights); the
    task restores its other arrays."""
    for name in ("params", "adam") + tuple(task_tuples):
        run[name] = _unflatten(name, run[name], arrays, path)
    if "learner" in run:
        carried = run["learner"].state()  # its shapes and dtypes, which the checkpoint must have
        run["learner"].load(ok.LearnerState(_unflatten("h", carried.h, arrays, path),
                                            _unflatten("learner", carried.influence, arrays, path)))
    else:
        run["h"] = _unflatten("h", run["h"], arrays, path)
        run["window"] = list(zip(arrays["window_x"], arrays["window_y"], arrays["window_reset"]))
    run.update(json.loads(str(arrays["counters"])))
    rng.bit_generator.state = json.loads(str(arrays["rng"]))


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
                        "the README's \"Where we differ\"); it cannot be resumed: start afresh "
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


# --- Output files: written atomically, checked and held before the first step ------------------


def _current_umask():
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
            os.chmod(tmp, 0o666 & ~_current_umask())
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


def _check_writable(option, path):
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


@contextlib.contextmanager
def claim_outputs(options):
    """Inside the block, the run holds every file of options, a list of (option, path or None):
    each was checked to be writable, and a second run that names one of them is refused with
    one line naming the process that holds it (two runs on one checkpoint or log would
    overwrite each other's work). Also refused: one file given to two options of one run.
    Without matplotlib, a note says at once that --plot will be skipped.

    The hold is an exclusive flock on a companion file FILE.lock, whose descriptor stays open
    until the block ends. Not on FILE itself: every save writes a new file and renames it onto
    FILE (write_atomically), so a lock on FILE would stay with the replaced file at the first
    save and hold nothing. The kernel drops a flock when its process ends, however it ends: a
    killed run leaves at most an unlocked FILE.lock, which the next run takes over. The holder
    writes its PID into the file; at the end it removes the file while still holding it.
    """
    for option, path in options:
        if path:
            _check_writable(option, path)
    if any(path for option, path in options if option == "--plot") and matplotlib_pyplot() is None:
        print("note: matplotlib is not installed, so --plot will be skipped "
              "(pip install matplotlib)")
    with contextlib.ExitStack() as held:
        claimed = {}
        for option, path in options:
            if not path:
                continue
            lock_path = os.path.realpath(path) + ".lock"
            if lock_path in claimed:
                raise UserError(f"{option} {path} is the file of {claimed[lock_path]} too: give "
                                "each output its own file")
            claimed[lock_path] = option
            if fcntl is not None:
                held.enter_context(_locked(option, path, lock_path))
        yield


@contextlib.contextmanager
def _locked(option, path, lock_path):
    """Hold lock_path (claim_outputs) for the block, or refuse in one line if a process does."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot create {lock_path} ({e.strerror or e}), the lock that keeps "
                            f"other runs off {path}: give {option} a file in a folder where "
                            "files can be created") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 20).decode("ascii", "replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            stop = f" (kill {holder} stops it and saves)" if holder.isdigit() else ""
            raise UserError(f"{option} {path} is held by {who}, a run that is still going: wait "
                            f"until it ends{stop}, or give {option} another file") from None
        except OSError as e:  # a file system without locks (ENOLCK on some network mounts)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            print(f"warning: cannot lock {lock_path} ({e.strerror or e}): a second run on {path} "
                  "would not be refused; this one goes on", file=sys.stderr, flush=True)
            yield
            return
        # The previous holder may have removed the file between our open and our flock: then
        # this lock is on a file no other run can see, so start again with the file now there.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # only for the message of a refused run
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still locked here, so no run has it open and locked
        os.close(fd)


# --- The CSV log: a '#' config line, a header, rows; resumed with its checkpoint ----------------

OUTPUT_KEYS = ("log", "checkpoint", "plot", "noise_log")  # in a log's header by base name only


def log_header(prog, config, local=()):
    """The '#' line that opens a CSV log: prog and the config as JSON, naming no folder of this
    machine: the output files (OUTPUT_KEYS) by their base name, the keys in local (folders the
    data came from) left out. Every other key is kept, in the config's order."""
    shown = {key: os.path.basename(value) if key in OUTPUT_KEYS and value else value
             for key, value in config.items() if key not in local}
    return f"{prog} config: {json.dumps(shown)}"


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


# --- Ctrl-C and SIGTERM: stop after the step and save ---------------------------------------------

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
    """One curve y against x as a PNG at path; a note instead without matplotlib."""
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
    plt = matplotlib_pyplot()
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
    save_figure(plt, fig, path)
