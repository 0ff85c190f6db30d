"""The files of a run, written and read in one place: by the runners (through runlib.py), by
sweep.py and by plot_results.py.

Standard library only, so that sweep.py (whose functions run on Dask workers) and
plot_results.py (whose table needs no plotting) use it without numpy or Numba. It holds:

- write_atomically: a file written whole or not at all (a temporary file in the same folder,
  fsync, rename), with the mode the umask gives any new file; write_json and read_json for a
  run's status and a sweep's grid; save_figure for a matplotlib figure.
- claim_outputs: a run holds its output files for as long as it lives. A second run on them is
  refused at once, or, if asked to wait, waits while the first one says it is ending.
- The CSV log of a run: log_header writes its '#' configuration line and log_config reads it
  back; open_log starts a log or resumes it with its checkpoint, write_line adds a row and
  survives a full disk; read_log reads any such CSV, '#' lines anywhere.
"""
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from typing import NamedTuple

try:
    import fcntl  # POSIX: the lock of claim_outputs
except ImportError:  # Windows: runs go unlocked
    fcntl = None

BUSY_EXIT = 75  # a run's exit status when another run holds its files (sysexits' EX_TEMPFAIL)
HOLDER_GRACE_SECONDS = 10.0  # a holder that says it is running may be stopping already (its
# supervisor just died): how long a waiting run gives it to say so before refusing
WAIT_POLL_SECONDS = 0.2
# Experiment keys added since runs were first made, with the value those runs had: a checkpoint
# or log written before a key existed ran under that value.
PAST_DEFAULTS = {"adam": "kingma-ba"}


class UserError(Exception):
    """A problem the user can fix (missing data, a wrong checkpoint, a diverged run): printed
    as one line, exit status 1."""


class Busy(UserError):
    """Another run holds a run's files: one line, exit status BUSY_EXIT (try again when it
    ends)."""


# --- Writing a file whole or not at all ----------------------------------------------------------


def current_umask():
    """The process's umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path, write, what):
    """write(f), f a binary file, into a temporary file in path's folder, flushed to the disk,
    then os.replace it onto path: a reader (or a run killed meanwhile, or a machine that loses
    power) sees the old file or the whole new one, never half of one. The file gets the mode
    the umask gives any new file, not mkstemp's private 0600. A failure is a UserError saying
    what could not be written."""
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


def write_json(path, value, what):
    """A JSON object into path, atomically, one key a line."""
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()),
                     what)


def read_json(path):
    """The JSON object in path, or None when there is none (absent, unreadable, not JSON)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    return None


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
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120), "figure")
    finally:
        plt.close(fig)


# --- Holding a run's files: one run at a time --------------------------------------------------


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


@contextlib.contextmanager
def claim_outputs(options, wait=0.0, give_up=None):
    """Inside the block, the run holds every file of options, a list of (option, path or None):
    each was checked to be writable, and a second run that names one of them is refused (Busy)
    with one line naming the process that holds it: two runs on one checkpoint or log would
    overwrite each other's work. Also refused: one file given to two options of one run.

    wait > 0: while the holder says it is stopping, wait up to wait seconds for it to end
    (a run whose supervisor died saves and exits; its successor waits for that). A holder that
    says it is running gets HOLDER_GRACE_SECONDS to say otherwise. give_up(): True stops the
    waiting. The block receives tell(state): tell("stopping") says so to the runs that wait.

    The hold is an exclusive flock on a companion file FILE.lock, whose descriptor stays open
    until the block ends. Not on FILE itself: every save writes a new file and renames it onto
    FILE (write_atomically), so a lock on FILE would stay with the replaced file at the first
    save and hold nothing. The kernel drops a flock when its process ends, however it ends: a
    killed run leaves at most an unlocked FILE.lock, which the next run takes over. The holder
    writes 'PID HOST STATE' into the file; at the end it removes the file while still holding it.
    """
    for option, path in options:
        if path:
            check_writable(option, path)
    with contextlib.ExitStack() as held:
        claimed, fds = {}, []
        for option, path in options:
            if not path:
                continue
            lock_path = os.path.realpath(path) + ".lock"
            if lock_path in claimed:
                raise UserError(f"{option} {path} is the file of {claimed[lock_path]} too: give "
                                "each output its own file")
            claimed[lock_path] = option
            if fcntl is not None:
                fd = held.enter_context(_locked(option, path, lock_path, wait, give_up))
                fds += [fd] if fd is not None else []

        guard = threading.RLock()  # tell may come from another thread (runlib's end of stdin)

        def tell(state):
            with guard:
                for fd in fds:
                    _say(fd, state)
        try:
            yield tell
        finally:
            with guard:  # the descriptors close next: from now on tell says nothing
                fds.clear()


class Holder(NamedTuple):
    """Who holds a lock file, as it wrote itself there: PID, host name, running or stopping."""
    pid: str
    host: str
    state: str


def _say(fd, state):
    """Write 'PID HOST STATE' into the held lock file fd (only for the messages and the
    patience of the runs that find it held)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {state}\n".encode(), 0)


def _holder(fd):
    words = os.pread(fd, 200, 0).decode("ascii", "replace").split()
    words += [""] * (3 - len(words))
    return Holder(*words[:3]) if words[0].isdigit() else Holder("", "", "")


def _who(holder):
    """'process 123', 'process 123 on node7' and what stops it, or 'another process'."""
    if not holder.pid:
        return "another process", ""
    if holder.host in ("", socket.gethostname()):
        return f"process {holder.pid}", f" (kill {holder.pid} stops it and saves)"
    return (f"process {holder.pid} on {holder.host}",
            f" (kill {holder.pid} there stops it and saves)")


@contextlib.contextmanager
def _locked(option, path, lock_path, wait, give_up):
    """Hold lock_path (claim_outputs) for the block, yielding its descriptor (None on a file
    system without locks), or refuse in one line if a process holds it."""
    deadline, waiting_since, told = time.monotonic() + wait, None, False
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
            holder = _holder(fd)
            os.close(fd)
            now = time.monotonic()
            waiting_since = now if waiting_since is None else waiting_since
            patience = (deadline if holder.state == "stopping"
                        else min(deadline, waiting_since + HOLDER_GRACE_SECONDS))
            who, stop = _who(holder)
            if give_up is not None and give_up():
                raise Busy(f"{option} {path} is held by {who}; this run was asked to stop "
                           "while it waited for it") from None
            if now >= patience:
                waited = f" (waited {now - waiting_since:.0f} s)" if wait else ""
                raise Busy(f"{option} {path} is held by {who}, a run that is still going"
                           f"{waited}: wait until it ends{stop}, or give {option} another "
                           "file") from None
            if holder.state == "stopping" and not told:
                print(f"{option} {path} is held by {who}, a run that is stopping: waiting up to "
                      f"{wait:.0f} s for it to save and exit", flush=True)
                told = True
            time.sleep(WAIT_POLL_SECONDS)
            continue
        except OSError as e:  # a file system without locks (ENOLCK on some network mounts)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
            print(f"warning: cannot lock {lock_path} ({e.strerror or e}): a second run on {path} "
                  "would not be refused; this one goes on", file=sys.stderr, flush=True)
            yield None
            return
        # The previous holder may have removed the file between our open and our flock: then
        # this lock is on a file no other run can see, so start again with the file now there.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        os.close(fd)
    if told:
        print(f"{option} {path} is free: going on", flush=True)
    try:
        _say(fd, "running")
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still locked here, so no run has it open and locked
        os.close(fd)


# --- The CSV log: a '#' configuration line, the column names, rows ------------------------------

OUTPUT_KEYS = ("log", "checkpoint", "plot", "noise_log")  # in a log's header by base name only
CONFIG_MARK = " config: "  # '# run_copy.py config: {...}', the first line of a runner's log


def log_header(prog, config, local=()):
    """The '#' line that opens a CSV log: prog and the config as JSON, naming no folder of this
    machine: the output files (OUTPUT_KEYS) by their base name, the keys in local (folders the
    data came from) left out. Every other key is kept, in the config's order."""
    shown = {key: os.path.basename(value) if key in OUTPUT_KEYS and value else value
             for key, value in config.items() if key not in local}
    return f"{prog}{CONFIG_MARK}{json.dumps(shown)}"


class Log(NamedTuple):
    """A CSV with '#' lines anywhere, as read_log reads it."""
    head: list  # the '#' lines before the column names, as written (the first: log_header's)
    columns: list  # the column names, or None when the file has none
    rows: list  # (line number, fields as strings) of every line with as many fields as columns
    damaged: list  # (line number, fields) of the other lines, e.g. one a full disk cut short
    comments: list  # the '#' lines after the column names, without '# ' (run_ptb.py's test BPC)


def read_log(path):
    """The CSV at path as a Log; a missing or unreadable file is a UserError."""
    head, columns, rows, damaged, comments = [], None, [], [], []
    try:
        with open(path, newline="") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.startswith("#") and columns is None:
                    head.append(line)
                elif line.startswith("#"):
                    comments.append(line[1:].strip())
                elif columns is None:
                    columns = line.split(",")
                elif line:
                    fields = line.split(",")
                    if len(fields) == len(columns):
                        rows.append((number, fields))
                    else:
                        damaged.append((number, fields))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    return Log(head, columns, rows, damaged, comments)


def log_config(path, log):
    """(runner, config) of a runner's log from its first '#' line (log_header's), configs from
    before a key existed given its old value (PAST_DEFAULTS); None for a CSV of another kind."""
    first = log.head[0][1:].strip() if log.head else ""
    prog, mark, text = first.partition(CONFIG_MARK)
    if not mark or not prog.endswith(".py") or " " in prog:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{path}: its config line is not valid JSON; is the file damaged?")
    return prog, {**PAST_DEFAULTS, **config}


def open_log(path, config_line, columns, resume_step):
    """Open the CSV log for appending. When resuming, keep its '#' lines before the column
    names and its rows up to the checkpoint's step (later rows were written after the last save
    and will be written again); comment lines after the column names, such as a finished run's
    test result, go too, and so do damaged lines. Else start anew with config_line."""
    kept = []
    if resume_step is not None and os.path.exists(path):
        log = read_log(path)
        if log.columns is not None and log.columns[0] == columns[0]:
            kept = log.head + [",".join(log.columns)] + [
                ",".join(fields) for _, fields in log.rows
                if fields[0].isdigit() and int(fields[0]) <= resume_step]
    if not kept:
        kept = [f"# {config_line}", ",".join(columns)]
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()),
                     "log")
    try:
        return open(path, "a", newline="", buffering=1)
    except OSError as e:
        raise UserError(f"cannot write log {path} ({e.strerror or e})") from None


def write_line(log, line):
    """One line into a CSV log opened by open_log. A write that fails (a full disk) is reported
    and the run goes on: the checkpoint, not the log, is what a run cannot lose."""
    try:
        log.write(line)
    except OSError as e:
        print(f"warning: cannot write log {log.name} ({e.strerror or e}): this line is lost, "
              "training goes on", file=sys.stderr, flush=True)


def close_log(log):
    with contextlib.suppress(OSError):  # write_line has reported what could not be written
        log.close()
