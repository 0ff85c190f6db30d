#!/usr/bin/env python3
"""The paper's protocol in one command: a learning-rate grid times seeds, each run by a runner.

Benzing et al., "Optimal Kronecker-Sum Approximation of Real Time Recurrent Learning", ICML 2019
(arXiv:1902.03993), pick the best of four learning rates (10^-2.5, 10^-3, 10^-3.5, 10^-4) by the
median over five repeats. This script runs that grid with run_copy.py or run_ptb.py, one process
per (learning rate, seed), on this machine or on a Dask cluster, and summarises it:

    python sweep.py copy sweeps/copy --lr 10^-2.5,10^-3,10^-3.5,10^-4 --seeds 1-5 --steps 1e5
    python sweep.py ptb sweeps/ptb --steps 20000 --eval-every 2000 --scheduler tcp://HOST:8786
    python sweep.py summary sweeps/copy

Every option the sweep does not know goes to each run unchanged (--steps, --hidden, --method...);
the sweep sets --lr, --seed, --log and --checkpoint (and run_copy.py's --noise-log) per run. The
runners are run as programs, through their command line, never imported: the sweep relies only
on their options, their exit status and their CSV logs. The sweep folder holds

    sweep.json                        the grid and runner options of the last command
    lr=10^-3.5/seed=1/log.csv         the run's --log
                      checkpoint.npz  its --checkpoint
                      stdout.txt, stderr.txt   what the runner printed, appended per session
                      status.json     how its last session ended, and under which options
    summary.txt, summary.png          the table and the figure

A run is finished when its runner exited with status 0 under the same options: the runner
itself then says that it trained to --steps, saved its checkpoint and (PTB) measured the test
BPC. A log that reached --steps would not do: a run stopped between its last row and its final
save, or (PTB) before its test line, is not finished. Rerunning a command skips the finished runs
without starting their runner (their files stay untouched) and resumes every other run from its
checkpoint, which the runners do bit for bit.
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

PROG = "sweep.py"
HERE = os.path.dirname(os.path.abspath(__file__))
RUNNERS = {"copy": "run_copy.py", "ptb": "run_ptb.py"}
TASKS = {"copy": "copy task", "ptb": "character-level PTB"}
PAPER_LRS = "10^-2.5,10^-3,10^-3.5,10^-4"  # the paper's grid
PAPER_SEEDS = "1-5"  # the paper's five repeats
SET_BY_SWEEP = {"--lr": "give the sweep a list: --lr 10^-3,10^-3.5",  # option: what to do instead
                "--seed": "give the sweep the seeds: --seeds 1-5",
                "--log": "each run's log is FOLDER/lr=.../seed=.../log.csv",
                "--checkpoint": "each run's checkpoint is FOLDER/lr=.../seed=.../checkpoint.npz",
                "--noise-log": "each run's noise log is FOLDER/lr=.../seed=.../noise.csv",
                "--plot": "the sweep draws FOLDER/summary.png"}
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS")
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM,  # a runner's exit after Ctrl-C or SIGTERM:
           -signal.SIGINT, -signal.SIGTERM}  # it stopped after a step and saved its checkpoint;
# or the signal came while it started or ended (no handler then), when there was nothing to save
NOT_STARTED = "not started: the sweep was stopped first"  # a Dask task that was still queued
DIVERGED = "diverged"  # the runners end a diverging run with an error line saying so (README)
POLL_SECONDS = 0.2  # how often the sweep looks at its runs
PROGRESS_SECONDS = 60.0  # a line on the running runs at most this often
SWEEP_FILE, SUMMARY_TEXT, SUMMARY_FIGURE = "sweep.json", "summary.txt", "summary.png"


class UsageError(Exception):
    """A command line the sweep cannot run: one line, exit status 2."""


# --- The grid: learning rates and seeds as people type them, one folder per run ---------------


def parse_lr(text):
    """One learning rate: 10^-3.5 (or 10**-3.5), 1e-3, 3.16e-4 or 0.001 -> a float > 0."""
    plain = text.strip().replace(" ", "")
    power = re.fullmatch(r"10(?:\^|\*\*)\(?([+-]?\d+(?:\.\d*)?)\)?", plain)
    try:
        value = 10.0 ** float(power.group(1)) if power else float(plain)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--lr: {text!r} is not a learning rate > 0 (write 10^-3.5, 1e-3 or "
                         "3.16e-4, several separated by commas)")
    return value


def parse_lrs(text):
    """'10^-2.5,10^-3' -> [10^-2.5, 10^-3], largest first (the paper's order), duplicates once."""
    return sorted({parse_lr(part) for part in text.split(",") if part.strip()}, reverse=True)


def parse_seeds(text):
    """'1-5', '1,3,5' or '1-3,7' -> [1, 2, 3, 4, 5] ... (integers >= 0, in order, once each)."""
    seeds = set()
    for part in (p.strip() for p in text.split(",")):
        span = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not span or (span.group(2) and int(span.group(2)) < int(span.group(1))):
            raise UsageError(f"--seeds: {part!r} is not a seed or a range of seeds (write 1-5, "
                             "1,3,5 or 1-3,7)")
        seeds.update(range(int(span.group(1)), int(span.group(2) or span.group(1)) + 1))
    return sorted(seeds)


def lr_name(lr):
    """How a learning rate is shown and names its folder: '10^-3.5' when lr is 10 ** e for an e
    of at most two decimals (as parse_lr computes it, so 1e-3 and 10^-3 are one run), else its
    shortest exact decimal ('0.000316')."""
    e = round(math.log10(lr), 2)
    return f"10^{e:g}" if 10.0 ** e == lr else repr(lr)


def run_folder(folder, lr, seed):
    return os.path.join(folder, f"lr={lr_name(lr)}", f"seed={seed}")


def runner_options(extra, lr, seed):
    """The options that define one run: the user's runner options, its learning rate (repr: the
    runner parses back the same float) and its seed. A finished run is skipped under the same
    options only."""
    return list(extra) + ["--lr", repr(lr), "--seed", str(seed)]


def runner_files(task, run_dir):
    """The run's outputs, in its own folder. The noise log too, so that runs with
    --measure-noise do not share run_copy.py's default file."""
    files = ["--log", os.path.join(run_dir, "log.csv"),
             "--checkpoint", os.path.join(run_dir, "checkpoint.npz")]
    return files + (["--noise-log", os.path.join(run_dir, "noise.csv")] if task == "copy" else [])


def check_runner_options(extra):
    """Refuse runner options that the sweep sets per run (or abbreviations the runner's argparse
    would read as one of them)."""
    for token in extra:
        name = token.split("=", 1)[0]
        taken = [option for option in SET_BY_SWEEP if token.startswith("--")
                 and option.startswith(name)]
        if taken:
            raise UsageError(f"{name}: the sweep sets {taken[0]} for every run: "
                             f"{SET_BY_SWEEP[taken[0]]}")


# --- One run: its subprocess, threads, lock and status (the same code here and on a worker) ---


BATCH_CPUS = ("SLURM_CPUS_ON_NODE", "NCPUS", "PBS_NUM_PPN")  # a job's CPUs on its node: SLURM,
# PBS Pro, Torque. Where the batch system does not pin the job to its CPUs, the affinity mask
# shows the whole node.


def available_cores():
    """Cores this process may use: its affinity mask, and no more than its batch job's CPUs."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    for name in BATCH_CPUS:
        with contextlib.suppress(KeyError, ValueError):
            cores = min(cores, max(1, int(os.environ[name])))
    return cores


def run_environment(threads):
    """This process's environment with the libraries' own thread pools (Numba, OpenBLAS, OpenMP,
    MKL) set to threads, as the runner's --threads sets its training steps', so that runs side by
    side do not fight over the cores."""
    env = dict(os.environ)
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


def write_atomically(path, text):
    """text into path through a temporary file and a rename: never half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp",
                               prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path):
    """The JSON object in path, or None when there is none (absent, or not JSON)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    return None


def is_finished(run_dir, options):
    status = read_json(os.path.join(run_dir, "status.json"))
    return bool(status) and status.get("state") == "finished" and status.get("options") == options


def lock_run(run_dir):
    """Hold the run's lock file, so that two sweeps (or a rerun while a lost worker still runs
    it) never run one run at once: the open file, or None when another process holds it. On a
    file system without locks (some cluster file systems) the run goes unlocked."""
    f = open(os.path.join(run_dir, ".lock"), "a")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    except (ImportError, OSError):
        pass
    return f


def die_with_parent():
    """In a local runner, before it starts: SIGTERM when the sweep dies, even by SIGKILL or a
    closed terminal, so the run saves (Linux; elsewhere nothing happens)."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def launch(task, options, run_dir, cwd, threads, local):
    """Start the runner on one run: `python run_<task>.py OPTIONS --log ... --checkpoint ...`
    --threads THREADS in cwd, its output appended to the run's stdout.txt and stderr.txt.
    -> the started run (a dict for finish), or None when another process holds the run.

    local: the runner gets its own session, so that Ctrl-C in the terminal reaches the sweep
    only and the sweep forwards it once (a second signal makes a runner quit without saving),
    and it is stopped when the sweep dies. On a Dask worker it stays in the worker's process
    group, where the batch system's signals reach it."""
    lock = lock_run(run_dir)
    if lock is None:
        return None
    script = os.path.join(HERE, RUNNERS[task])
    try:
        out = open(os.path.join(run_dir, "stdout.txt"), "ab")
        err = open(os.path.join(run_dir, "stderr.txt"), "ab")
        offset = err.tell()  # this session's errors start here
        process = subprocess.Popen(
            [sys.executable, script] + options + runner_files(task, run_dir)
            + ["--threads", str(threads)], cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=run_environment(threads),
            start_new_session=local, preexec_fn=die_with_parent if local else None)
    except BaseException:
        lock.close()
        raise
    return {"process": process, "files": (out, err), "lock": lock, "offset": offset,
            "run_dir": run_dir, "options": options}


def finish(started):
    """After the runner has exited: its status.json (finished, interrupted or failed, with the
    options and the last line it wrote to stderr), then the lock is released.
    -> (exit status, that line)."""
    code = started["process"].returncode
    for f in started["files"]:
        f.close()
    message = ""
    with contextlib.suppress(OSError):
        with open(os.path.join(started["run_dir"], "stderr.txt"), "rb") as f:
            f.seek(started["offset"])
            lines = f.read().decode(errors="replace").strip().splitlines()
        message = lines[-1] if lines else ""
    if code < 0:
        message = f"the runner was killed by signal {-code} (out of memory?) {message}".strip()
    state = "finished" if code == 0 else "interrupted" if code in STOPPED else "failed"
    status = {"state": state, "exit": code, "message": message, "options": started["options"]}
    try:
        write_atomically(os.path.join(started["run_dir"], "status.json"),
                         json.dumps(status, indent=1) + "\n")
    finally:
        started["lock"].close()
    return code, message


def run_on_worker(task, options, run_dir, cwd, threads, stop_event):
    """One run as a Dask task: the runner as a subprocess of the worker, with threads threads
    (None: this machine's cores divided by the runs the worker runs at once, its thread count),
    sent SIGTERM when the sweep sets the Dask Event stop_event. -> (exit status or None,
    message); None: the run did not start (its message says why)."""
    from distributed import Event, get_worker
    worker = get_worker()
    threads = threads or max(1, available_cores() // worker.state.nthreads)
    where = f"on Dask worker {worker.address}"
    if not os.path.isdir(run_dir) or not os.path.isdir(cwd):
        missing = run_dir if not os.path.isdir(run_dir) else cwd
        return None, (f"{missing} does not exist {where}: the sweep folder, the folder the "
                      "sweep was started in and the repository must be on storage that every "
                      "worker shares, at the same path")
    stop, stopping = Event(stop_event), False
    if stop.is_set():  # queued when the sweep was stopped
        return None, NOT_STARTED
    started = launch(task, options, run_dir, cwd, threads, local=False)
    if started is None:
        return None, f"{run_dir} is being run by another process (its lock is held)"
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            started["process"].wait(timeout=1.0)
            return finish(started)
        if not stopping and stop.is_set():
            started["process"].send_signal(signal.SIGTERM)  # it saves and exits 143
            stopping = True


# --- Where the runs go: this machine's processes, or a Dask cluster ----------------------------


def local_backend(task, workers, threads, cwd):
    """Start, poll and signal runs as subprocesses of this process, workers at a time."""
    def start(run_dir, options):
        return launch(task, options, run_dir, cwd, threads, local=True)

    def poll(started):
        return None if started["process"].poll() is None else finish(started)

    def stop(running, signum):
        for started in running:
            with contextlib.suppress(ProcessLookupError):
                started["process"].send_signal(signum)

    return {"start": start, "poll": poll, "stop": stop, "capacity": workers, "close": None,
            "verb": None,
            "where": f"{workers} at a time on this machine, {threads} thread(s) each"}


def dask_backend(task, address, threads, cwd):
    """Start, poll and stop runs as tasks on the Dask cluster whose scheduler is at address. The
    cluster queues them: as many run at once as its workers have threads."""
    try:
        import cloudpickle
        from distributed import Client, Event
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install dask distributed") from None
    if __name__ != "__main__":  # imported (tests): send this module's functions by value too,
        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import it
    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError, ValueError) as e:
        raise RuntimeError(f"cannot reach the Dask scheduler at {address} ({e})") from None
    stop_event = f"ok-rtrl-sweep-stop-{uuid.uuid4().hex}"

    def start(run_dir, options):
        lr, seed = run_dir.split(os.sep)[-2:]  # the task's name on the dashboard
        return client.submit(run_on_worker, task, options, run_dir, cwd, threads, stop_event,
                             pure=False, key=f"sweep-{lr}-{seed}-{uuid.uuid4().hex[:8]}")

    def poll(future):
        if not future.done():
            return None
        if future.status == "error":  # e.g. its workers died repeatedly
            return None, f"the Dask task failed: {future.exception()!r}"
        if future.status != "finished":
            return None, f"the Dask task was {future.status}"
        return future.result()

    def stop(running, signum):
        Event(stop_event, client=client).set()  # every task sends SIGTERM to its runner

    workers = client.nthreads()  # {worker address: threads}
    slots = sum(workers.values())
    return {"start": start, "poll": poll, "stop": stop, "capacity": math.inf,
            "close": client.close, "verb": "queued", "where": f"the Dask cluster at {address} "
            f"({len(workers)} workers, {slots} runs at a time for now)"}


# --- The sweep: start, watch and stop the runs -------------------------------------------------


def log_signature(run_dir):
    """(inode, mtime, size) of the run's log, or None: the runner (re)writes its log once it has
    checked its options, outputs, memory, data and checkpoint, just before its first step."""
    with contextlib.suppress(OSError):
        s = os.stat(os.path.join(run_dir, "log.csv"))
        return s.st_ino, s.st_mtime_ns, s.st_size
    return None


def last_row(run_dir):
    """The last data row of the run's log as {column: text}, or None."""
    rows = read_log(os.path.join(run_dir, "log.csv"))[1]
    return rows[-1] if rows else None


def describe(task, run_dir):
    """'T 9 at step 100,000' or 'valid BPC 2.65 (best 2.60), test 2.58': the run's log in short."""
    row = last_row(run_dir)
    if row is None:
        return "no log row yet"
    if task == "copy":
        return f"T {row.get('T')} at step {int(row['step']):,}"
    result = ptb_result(os.path.join(run_dir, "log.csv"))
    test = f", test {result['test']:.4f}" if result["test"] is not None else ""
    best = f", best valid BPC {result['valid']:.4f}" if result["valid"] is not None else ""
    return f"step {int(row['step']):,}{best}{test}"


def run_sweep(task, folder, grid, extra, backend):
    """Run every unfinished run of grid [(lr, seed)], backend["capacity"] at a time; -> the exit
    status: 0 all finished, 1 some failed, 128 + signal if stopped by a signal.

    Ctrl-C or SIGTERM: no new run starts, the signal goes to every running runner (each saves
    its checkpoint after its current step and exits), and the sweep waits for them; a second
    one is forwarded too (runners then quit at once, without saving)."""
    runs = [(lr, seed, run_folder(folder, lr, seed), tuple(runner_options(extra, lr, seed)))
            for lr, seed in grid]  # tuples: a run is a key of sweep["running"]
    pending = [run for run in runs if not is_finished(run[2], list(run[3]))]
    print(f"{PROG}: {task}, {len(grid)} runs ({len({lr for lr, _ in grid})} learning rates x "
          f"{len({seed for _, seed in grid})} seeds) in {folder}: "
          f"{len(runs) - len(pending)} finished before, {len(pending)} to run, "
          f"{backend['where']}", flush=True)
    sweep = {"pending": pending, "running": {}, "failed": [], "busy": [], "signals": [],
             "probe": None, "probe_log": None, "checked": False, "shown": time.monotonic()}
    forwarded = 0
    with recording_signals(sweep["signals"]):
        try:
            while sweep["running"] or (sweep["pending"] and not sweep["signals"]):
                if len(sweep["signals"]) > forwarded:
                    print(f"{PROG}: {signal.Signals(sweep['signals'][-1]).name}: stopping the "
                          "runs (each saves its checkpoint); rerun the same command to resume",
                          flush=True)
                    backend["stop"](list(sweep["running"].values()), sweep["signals"][-1])
                    forwarded = len(sweep["signals"])
                start_runs(backend, sweep)
                collect_runs(task, backend, sweep)
                show_progress(task, sweep)
                time.sleep(POLL_SECONDS)
        except BaseException:  # the sweep fails (e.g. its output is gone): the runs save first,
            backend["stop"](list(sweep["running"].values()), signal.SIGTERM)  # and the sweep
            with contextlib.suppress(Exception):  # waits, since a local runner gets another
                wait_for(backend, sweep["running"])  # SIGTERM when it exits (die_with_parent)
            raise
    if sweep["signals"]:
        print(f"{PROG}: stopped by {signal.Signals(sweep['signals'][0]).name}: "
              f"{len(sweep['pending'])} runs not started; rerun the same command to go on",
              flush=True)
        return 128 + sweep["signals"][0]
    if sweep["busy"]:
        print(f"{PROG}: {len(sweep['busy'])} runs were being run by another process: rerun when "
              "it ends")
    if sweep["failed"]:
        print(f"{PROG}: {len(sweep['failed'])} runs failed (their stderr.txt says why); a rerun "
              "tries them again from their last checkpoint")
    return 1 if sweep["failed"] or sweep["busy"] else 0


@contextlib.contextmanager
def recording_signals(signals):
    """Inside the block, Ctrl-C and SIGTERM only append their number to signals."""
    previous = {s: signal.signal(s, lambda signum, frame: signals.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def start_runs(backend, sweep):
    """Start pending runs while the backend has room and no signal has come. The first run to
    start goes alone (the probe) until its runner has (re)written its log, i.e. accepted its
    options, outputs, memory, data and checkpoint: if those are wrong, they are wrong for every
    run, and one error is enough."""
    running = sweep["running"]
    if sweep["probe"] in running and log_signature(sweep["probe"][2]) != sweep["probe_log"]:
        sweep["checked"] = True
    while (sweep["pending"] and not sweep["signals"] and len(running) < backend["capacity"]
           and (sweep["checked"] or sweep["probe"] not in running)):
        lr, seed, run_dir, options = run = sweep["pending"].pop(0)
        os.makedirs(run_dir, exist_ok=True)
        before = log_signature(run_dir)
        started = backend["start"](run_dir, list(options))
        if started is None:
            sweep["busy"].append(run)
            say("busy", lr, seed, ": another process is running it")
            continue
        running[run] = started
        if sweep["probe"] is None:
            sweep["probe"], sweep["probe_log"] = run, before
        row = last_row(run_dir)
        say(backend["verb"] or ("resuming" if before else "starting"), lr, seed,
            f" (its log at step {int(row['step']):,})" if row else "")


def collect_runs(task, backend, sweep):
    """Report the runs that have ended. A failure of the probe before it passed stops the sweep
    with the runner's error line (UsageError for a bad option, exit 2); any other failure
    (diverged, a full disk) is that run's, and the others go on."""
    running = sweep["running"]
    for run in list(running):
        ended = backend["poll"](running[run])
        if ended is None:
            continue
        del running[run]
        code, message = ended
        lr, seed, run_dir, _ = run
        if message == NOT_STARTED:
            sweep["pending"].append(run)
        elif code == 0:
            say("done", lr, seed, f": {describe(task, run_dir)}")
        elif code in STOPPED:
            say("stopped", lr, seed, f": {describe(task, run_dir)}, checkpoint saved")
        elif run == sweep["probe"] and not sweep["checked"]:
            backend["stop"](list(running.values()), signal.SIGTERM)
            wait_for(backend, running)
            refused = UsageError if code == 2 else RuntimeError
            raise refused("the first run failed before training, so every run would; nothing "
                          f"else was started: {message}")
        else:
            sweep["failed"].append(run)
            say("failed", lr, seed, f": {message}")


def show_progress(task, sweep):
    """Every PROGRESS_SECONDS, one line on the running runs (from their logs)."""
    if sweep["running"] and time.monotonic() - sweep["shown"] >= PROGRESS_SECONDS:
        print("  running: " + "; ".join(f"lr {lr_name(lr)} seed {seed} {describe(task, run_dir)}"
                                        for lr, seed, run_dir, _ in sweep["running"]), flush=True)
        sweep["shown"] = time.monotonic()


def say(what, lr, seed, text):
    print(f"  {what:9s}lr {lr_name(lr)} seed {seed}{text}", flush=True)


def wait_for(backend, running):
    """Wait until every run in running has ended (they have been told to stop)."""
    while running:
        for run in list(running):
            if backend["poll"](running[run]) is not None:
                del running[run]
        time.sleep(POLL_SECONDS)


# --- The summary: the paper's metric per learning rate, from the logs --------------------------


def read_log(path):
    """A runner's CSV log -> (column names, rows as {column: text}, '#' comment lines).
    Columns are read from its header row, so the sweep depends only on their names."""
    columns, rows, comments = None, [], []
    with contextlib.suppress(OSError):
        with open(path, newline="") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.startswith("#"):
                    comments.append(line)
                elif columns is None:
                    columns = line.split(",")
                elif line.count(",") == len(columns) - 1 and line.split(",", 1)[0].isdigit():
                    rows.append(dict(zip(columns, line.split(","))))  # not a row half-written
    return columns, rows, comments


# run_ptb.py's last log line: "# test BPC 2.6200 of the best weights (step 20,000, validation ...)"
TEST_LINE = re.compile(r"test BPC ([0-9.]+|nan|inf) of the best weights")


def ptb_result(path):
    """{'valid': the best validation BPC of a PTB log (None before the first validation),
    'test': the test BPC of those weights (None until the run has finished)}."""
    _, rows, comments = read_log(path)
    valid = [float(row["valid_bpc"]) for row in rows if row.get("valid_bpc")]
    tests = [TEST_LINE.search(line) for line in comments]
    tests = [float(m.group(1)) for m in tests if m]
    return {"valid": min(valid) if valid else None, "test": tests[-1] if tests else None}


def run_outcome(task, run_dir):
    """One run for the summary: (state, {metric: value}, step of the last log row).
    state: finished, diverged (counts as the worst value), failed, unfinished or not started."""
    status = read_json(os.path.join(run_dir, "status.json")) or {}
    row = last_row(run_dir)
    step = int(row["step"]) if row else None
    state = status.get("state")
    if state == "finished":
        if task == "copy":
            return "finished", {"T": float(row["T"]) if row else math.nan}, step
        result = ptb_result(os.path.join(run_dir, "log.csv"))
        return "finished", {k: math.nan if v is None else v for k, v in result.items()}, step
    if state == "failed":
        return ("diverged" if DIVERGED in status.get("message", "") else "failed"), {}, step
    return ("unfinished" if os.path.isdir(run_dir) else "not started"), {}, step


# The paper's metric per task: (key, what it is, higher is better), the first one picks the lr
METRICS = {"copy": [("T", "T", True)],
           "ptb": [("valid", "valid BPC", False), ("test", "test BPC", False)]}


def lr_rows(task, folder, lrs, seeds):
    """Per learning rate: its name, per-metric values over the seeds that count (finished;
    diverged as the worst value), and the counts of each state. -> list of dicts."""
    rows = []
    for lr in lrs:
        values, states, steps = {key: [] for key, _, _ in METRICS[task]}, {}, set()
        for seed in seeds:
            state, metrics, step = run_outcome(task, run_folder(folder, lr, seed))
            states[state] = states.get(state, 0) + 1
            for key, _, higher in METRICS[task]:
                if state == "finished" and not math.isnan(metrics[key]):
                    values[key].append(metrics[key])
                    steps.add(step)
                elif state == "diverged":
                    values[key].append(-math.inf if higher else math.inf)
        rows.append({"lr": lr, "values": values, "states": states, "steps": steps})
    return rows


def pick(task, rows):
    """The paper's rule: the learning rate with the best median of the first metric; ties go to
    the better mean, then to the larger learning rate. -> (row, tied rows) or (None, [])."""
    key, _, higher = METRICS[task][0]
    sign = 1 if higher else -1
    scored = [(sign * median(r["values"][key]), sign * mean(r["values"][key]), r)
              for r in rows if not math.isnan(median(r["values"][key]))]
    if not scored:
        return None, []
    best = max(scored, key=lambda s: (s[0], s[1]))  # max keeps the first (largest lr) of equals
    return best[2], [s[2] for s in scored if s[0] == best[0] and s[2] is not best[2]]


def mean(values):
    with contextlib.suppress(OverflowError, ValueError):
        return statistics.fmean(values)
    return math.nan


def median(values):
    return statistics.median(values) if values else math.nan


def number(x, task):
    if math.isinf(x):
        return "diverged"
    return "-" if math.isnan(x) else f"{x:g}" if task == "copy" else f"{x:.4f}"


def summary_table(task, folder, lrs, seeds):
    """The summary as text: per learning rate the median and range over the seeds of the paper's
    metric, how many runs count, and the learning rate the paper's rule picks."""
    rows = lr_rows(task, folder, lrs, seeds)
    metrics = METRICS[task]
    seeds_text = ",".join(map(str, seeds))
    title = (f"{TASKS[task]}: curriculum T reached at the last step (the log's last row)"
             if task == "copy" else f"{TASKS[task]}: best validation BPC and the test BPC of "
             "its weights")
    lines = [f"{title}; median and range over seeds {seeds_text}", ""]
    header = ["lr", "finished"]
    for _, name, _ in metrics:
        header += [f"{name}: median", "range"]
    table = [header + ["notes"]]
    for r in rows:
        n = len(seeds)
        line = [lr_name(r["lr"]), f"{r['states'].get('finished', 0)}/{n}"]
        for key, _, _ in metrics:
            v = r["values"][key]
            line += [number(median(v), task),
                     f"{number(min(v), task)} - {number(max(v), task)}" if v else "-"]
        notes = [f"{k} {state}" for state, k in sorted(r["states"].items())
                 if state != "finished"]
        if task == "copy" and r["steps"]:
            low, high = min(r["steps"]), max(r["steps"])
            notes.insert(0, f"at step {low:,}" if low == high else f"at steps {low:,}-{high:,}")
        table.append(line + ["; ".join(notes)])
    widths = [max(len(row[i]) for row in table) for i in range(len(header) + 1)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    best, tied = pick(task, rows)
    lines.append("")
    if best is None:
        lines.append("the paper's rule (the best median) picks nothing yet: no run has finished")
    else:
        incomplete = sum(r["states"].get("finished", 0) + r["states"].get("diverged", 0)
                         for r in rows) < len(rows) * len(seeds)
        lines.append(f"the paper's rule (the best median {metrics[0][1]}) picks lr "
                     f"{lr_name(best['lr'])}"
                     + (f" (tied on the median with {', '.join(lr_name(r['lr']) for r in tied)}:"
                        " the better mean decides, then the larger lr)" if tied else "")
                     + (" so far: some runs have not finished" if incomplete else ""))
    return "\n".join(lines) + "\n", rows, best


YLABELS = {"T": "curriculum T at the last step", "valid": "best validation BPC",
           "test": "test BPC of the best validation weights"}


def summary_figure(task, rows, best, path):
    """Each seed's value (dots) and the median (line) against the learning rate, one panel per
    metric, the picked learning rate starred; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = METRICS[task]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, (key, name, _) in zip(axes[0], metrics):
        for r in rows:
            finite = [v for v in r["values"][key] if math.isfinite(v)]
            ax.plot([r["lr"]] * len(finite), finite, "o", color="0.6", markersize=4)
        shown = [(r["lr"], median(r["values"][key])) for r in rows]
        shown = [(lr, m) for lr, m in shown if math.isfinite(m)]
        if shown:
            ax.plot(*zip(*shown), "-", color="C0", label="median over seeds")
        if best is not None and math.isfinite(median(best["values"][key])):
            ax.plot([best["lr"]], [median(best["values"][key])], "*", color="C3",
                    markersize=14, label=f"picked: {lr_name(best['lr'])}")
        ax.set(xscale="log", xlabel="learning rate", ylabel=YLABELS[key])
        ax.set_xticks([r["lr"] for r in rows], [lr_name(r["lr"]) for r in rows])
        ax.minorticks_off()
        if task == "copy":
            ax.yaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=8)
    fig.suptitle(f"{TASKS[task]}: the learning-rate grid (dots: seeds)")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


def summarize(folder):
    """Print the summary of the sweep in folder and write summary.txt and summary.png there."""
    sweep = read_json(os.path.join(folder, SWEEP_FILE))
    if sweep is None:
        raise UsageError(f"{folder} holds no sweep ({SWEEP_FILE} is missing or damaged): give "
                         "the folder a sweep was run in")
    task, lrs, seeds = sweep["task"], sweep["lrs"], sweep["seeds"]
    text, rows, best = summary_table(task, folder, lrs, seeds)
    print(text, end="")
    write_atomically(os.path.join(folder, SUMMARY_TEXT), text)
    figure = os.path.join(folder, SUMMARY_FIGURE)
    if summary_figure(task, rows, best, figure):
        print(f"table: {os.path.join(folder, SUMMARY_TEXT)}, figure: {figure}")
    else:
        print(f"table: {os.path.join(folder, SUMMARY_TEXT)}; the figure needs matplotlib "
              "(pip install matplotlib)")


# --- Command line -------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        usage=f"{PROG} {{copy,ptb}} FOLDER [--lr LRS] [--seeds SEEDS] [--workers N | --scheduler "
        f"ADDRESS] [--threads T] [runner options]\n       {PROG} summary FOLDER",
        description="The paper's protocol (Benzing et al. 2019, arXiv 1902.03993): one run of "
        "run_copy.py or run_ptb.py per learning rate and seed, each with its log and checkpoint "
        "in FOLDER/lr=.../seed=.../, then the median and range over the seeds of the paper's "
        "metric per learning rate and the one the paper's rule (the best median) picks. Every "
        "other option goes to each run (see python run_copy.py --help). Rerunning the command "
        "skips finished runs and resumes the others from their checkpoints; Ctrl-C or SIGTERM "
        "stops every run after a saved step. 'summary FOLDER' prints the table again.",
        epilog="With --scheduler, the runs are tasks of a Dask cluster (pip install dask "
        "distributed): FOLDER, the folder you start the sweep in and this repository must be on "
        "storage every worker shares, at the same path (the README's 'Sweeps' shows SLURM and "
        "PBS).")
    p.add_argument("--lr", default=PAPER_LRS, metavar="LRS",
                   help=f"learning rates, comma-separated: 10^-3.5, 1e-3, 3.16e-4 (default "
                   f"{PAPER_LRS}, the paper's grid)")
    p.add_argument("--seeds", default=PAPER_SEEDS,
                   help="seeds: 1-5, 1,3,5 or 1-3,7 (default 1-5, the paper's five repeats)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="runs at once on this machine (default: one per core)")
    p.add_argument("--threads", type=int, metavar="T",
                   help="threads per run: its runner's --threads, and NUMBA_NUM_THREADS, "
                   "OPENBLAS_NUM_THREADS and OMP_NUM_THREADS (default: the cores divided by "
                   "--workers here; on a Dask "
                   "worker its machine's cores divided by the worker's threads)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="send the runs to the Dask scheduler at ADDRESS (tcp://host:8786) "
                   "instead of running them here")
    return p


def sweep_command(task, folder, args, extra):
    """Check the command, write FOLDER/sweep.json and run the grid; -> exit status."""
    lrs, seeds = parse_lrs(args.lr), parse_seeds(args.seeds)
    if not lrs:
        raise UsageError("--lr: no learning rate given")
    check_runner_options(extra)
    for option, value in (("--workers", args.workers), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    if args.scheduler and args.workers:
        raise UsageError("--workers is for this machine; with --scheduler the cluster's workers "
                         "run the runs")
    folder = os.path.abspath(folder)
    previous = read_json(os.path.join(folder, SWEEP_FILE))
    if previous and previous.get("task") != task:
        raise UsageError(f"{folder} holds a {previous.get('task')} sweep, not {task}: choose "
                         "another folder")
    cwd = os.getcwd()
    if args.scheduler:
        backend = dask_backend(task, args.scheduler, args.threads, cwd)
    else:
        workers = args.workers or available_cores()
        threads = args.threads or max(1, available_cores() // workers)
        backend = local_backend(task, workers, threads, cwd)
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            write_atomically(os.path.join(folder, SWEEP_FILE), json.dumps(
                {"task": task, "lrs": lrs, "seeds": seeds, "runner_options": extra},
                indent=1) + "\n")
        except OSError as e:
            raise RuntimeError(f"cannot write the sweep folder {folder} ({e.strerror or e})") \
                from None
        status = run_sweep(task, folder, [(lr, seed) for lr in lrs for seed in seeds], extra,
                           backend)
    finally:
        if backend["close"]:
            backend["close"]()
    print()
    summarize(folder)
    return status


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] in (["-h"], ["--help"]):
        parser.print_help()
        return 0
    try:
        task = argv[0] if argv else None
        if task not in ("copy", "ptb", "summary"):
            raise UsageError("the first argument is copy, ptb or summary"
                             + (f", not {task!r}" if task else f" (see {PROG} --help)"))
        if len(argv) < 2 or argv[1].startswith("-"):
            raise UsageError(f"give the sweep folder after {task}: {PROG} {task} FOLDER ...")
        folder = argv[1]
        if task == "summary":
            if len(argv) > 2:
                raise UsageError(f"summary takes only the folder, not {' '.join(argv[2:])}")
            summarize(folder)
            return 0
        args, extra = parser.parse_known_args(argv[2:])
        return sweep_command(task, folder, args, extra)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
