"""The paper's protocol in one command: a learning-rate grid times seeds, each run by a runner.

Benzing et al., "Optimal Kronecker-Sum Approximation of Real Time Recurrent Learning", ICML 2019
(arXiv:1902.03993), pick the best of four learning rates (10^-2.5, 10^-3, 10^-3.5, 10^-4) by the
median over five repeats. This script runs that grid with run_copy.py or run_ptb.py, one process
per (learning rate, seed), on this machine or on a Dask cluster, and summarises it:

    python -m tools.sweep copy sweeps/copy --lr 10^-2.5,10^-3,10^-3.5,10^-4 --seeds 1-5 --steps 1e5
    python -m tools.sweep ptb sweeps/ptb --steps 20000 --eval-every 2000 --scheduler tcp://HOST:8786
    python -m tools.sweep summary sweeps/copy

Every option the sweep does not know goes to each run unchanged (--steps, --hidden, --method...);
the sweep sets --lr, --seed, --log, --checkpoint and --status (and run_copy.py's --noise-log)
per run. The runners are run as programs, through their command line, never imported here: the
sweep relies on their options, their exit status and the status each writes as JSON (runlib.py),
and never on what they print. The sweep folder holds

    sweep.json                        the grid and runner options of the last command
    lr=10^-3.5/seed=1/log.csv         the run's --log
                      checkpoint.npz  its --checkpoint
                      status.json     its --status: how it stands or ended, under which options
                      stdout.txt, stderr.txt   what the runner printed, appended per session
    summary.txt, summary.png          the table and the figure

A run is finished when its status says so under the same configuration, as the runner's own
parser resolves the options (finished_runs): the runner trained to --steps, saved its checkpoint
and (PTB) measured the test BPC. docs/sweeps.md has the rest. Rerunning a command skips the
finished runs without starting their runner (their files stay untouched) and resumes every other
run from its checkpoint, which the runners do bit for bit.

A run never outlives what supervises it: each runner reads a pipe from the process that started
it (this sweep, or its task on a Dask worker) and stops with a save when the pipe ends, which it
does however that process ends (SIGKILL, a lost worker, a restarted nanny). Dask gives the task
of a lost worker to another worker, whose runner waits for the old one to save and resumes.
"""
import argparse
import contextlib
import json
import math
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid

from tools import runfiles

PROG, COMMAND = "sweep", "python -m tools.sweep"  # its messages' prefix; how it is run
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the runners are
RUNNERS = {"copy": "run_copy.py", "ptb": "run_ptb.py"}
TASKS = {"copy": "copy task", "ptb": "character-level PTB"}
PAPER_LRS = "10^-2.5,10^-3,10^-3.5,10^-4"  # the paper's grid
PAPER_SEEDS = "1-5"  # the paper's five repeats
SET_BY_SWEEP = {"--lr": "give the sweep a list: --lr 10^-3,10^-3.5",  # option: what to do instead
                "--seed": "give the sweep the seeds: --seeds 1-5",
                "--log": "each run's log is FOLDER/lr=.../seed=.../log.csv",
                "--checkpoint": "each run's checkpoint is FOLDER/lr=.../seed=.../checkpoint.npz",
                "--noise-log": "each run's noise log is FOLDER/lr=.../seed=.../noise.csv",
                "--status": "each run's status is FOLDER/lr=.../seed=.../status.json",
                "--plot": "the sweep draws FOLDER/summary.png",
                "--stop-at-eof": "the sweep gives every run a pipe that ends when the sweep does",
                "--wait-if-held": "a run waits for one that is stopping on its files (up to "
                                  "10 minutes)"}
# The options the sweep adds to each run's command line (how many values each takes): they say
# where and how it runs, not what it is, so a finished run is recognised without them.
SWEEP_SETTINGS = {"--log": 1, "--checkpoint": 1, "--noise-log": 1, "--status": 1, "--threads": 1,
                  "--stop-at-eof": 0, "--wait-if-held": 1}
# Resolves command lines of a runner in a process of its own, as the runner would (runlib.resolve),
# so that this one never imports numpy or Numba: a JSON list of argv in, of configurations out.
RESOLVE = ("import json, sys; from tools import runlib; import {module} as task; "
           "json.dump([runlib.resolve(task, argv) for argv in json.load(sys.stdin)], sys.stdout)")
WAIT_FOR_STOPPING = 600  # seconds a run waits for a run that is saving and ending on its files
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS")
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM,  # a runner's exit after Ctrl-C or SIGTERM:
           -signal.SIGINT, -signal.SIGTERM}  # it stopped after a step and saved its checkpoint;
# or the signal came while it started or ended (no handler then), when there was nothing to save
NOT_STARTED = "not started: the sweep was stopped first"  # a Dask task that was still queued
POLL_SECONDS = 0.2  # how often the sweep looks at its runs
PROGRESS_SECONDS = 60.0  # a line on the running runs at most this often
SWEEP_FILE, SUMMARY_TEXT, SUMMARY_FIGURE = "sweep.json", "summary.txt", "summary.png"


class UsageError(Exception):
    """A command line the sweep cannot run: one line, exit status 2."""


def plural(count, noun):
    """'1 run', '2 runs', '1 learning rate'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# --- The grid: learning rates and seeds as people type them, one folder per run ---------------


def parse_lr(text):
    """One learning rate: 10^-3.5 (or 10**-3.5), 3x10^-3 (or 3*10^-3), 1e-3, 3.16e-4 or 0.001
    -> a float > 0."""
    plain = text.strip().replace(" ", "")
    power = re.fullmatch(r"10(?:\^|\*\*)\(?([+-]?\d+(?:\.\d*)?)\)?", plain)
    times = re.fullmatch(r"(\d+(?:\.\d*)?)[x*]10(?:\^|\*\*)\(?([+-]?\d+)\)?", plain)
    try:
        if power:
            value = 10.0 ** float(power.group(1))
        else:  # a mantissa times an integer power of ten is exactly the decimal MeK
            value = float(f"{times.group(1)}e{times.group(2)}" if times else plain)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--lr: {text!r} is not a learning rate > 0 (write 10^-3.5, 3x10^-3, "
                         "1e-3 or 3.16e-4, several separated by commas)")
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
    """How a learning rate is shown and names its folder, always as a power of ten: '10^-3.5'
    when lr is 10 ** e for an e of at most two decimals (as parse_lr computes it, so 1e-3 and
    10^-3 are one run), else 'Mx10^k' with the fewest digits of M that give lr back exactly
    ('3x10^-3', '3.16x10^-4'), which parse_lr reads back."""
    e = round(math.log10(lr), 2)
    if 10.0 ** e == lr:
        return f"10^{e:g}"
    text = next(text for text in (f"{lr:.{digits}e}" for digits in range(17))
                if float(text) == lr)  # '3e-03', '3.16e-04'; 17 digits always give lr back
    mantissa, exponent = text.split("e")
    return f"{mantissa}x10^{int(exponent)}"


def run_folder(folder, lr, seed):
    return os.path.join(folder, f"lr={lr_name(lr)}", f"seed={seed}")


def runner_options(extra, lr, seed):
    """The options of one run: the user's runner options, its learning rate (repr: the runner
    parses back the same float) and its seed."""
    return list(extra) + ["--lr", repr(lr), "--seed", str(seed)]


def runner_files(task, run_dir):
    """The run's outputs, in its own folder. The noise log too, so that runs with
    --measure-noise do not share run_copy.py's default file."""
    files = ["--log", os.path.join(run_dir, "log.csv"),
             "--checkpoint", os.path.join(run_dir, "checkpoint.npz"),
             "--status", os.path.join(run_dir, "status.json")]
    return files + (["--noise-log", os.path.join(run_dir, "noise.csv")] if task == "copy" else [])


def options_of(argv):
    """The options that define a run, from the command line its status records: argv without
    the sweep's settings (SWEEP_SETTINGS: files, threads, how it is supervised), so that a
    sweep folder moved elsewhere still knows its runs."""
    options, skip = [], 0
    for token in argv:
        if skip:
            skip -= 1
        elif token in SWEEP_SETTINGS:
            skip = SWEEP_SETTINGS[token]
        else:
            options.append(token)
    return options


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


# --- One run: its subprocess, threads and status (the same code here and on a worker) ----------


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


def run_status(run_dir):
    """The status the run's runner last wrote (runlib.py: state, step, result, message, pid,
    argv), or {} when there is none."""
    return runfiles.read_json(os.path.join(run_dir, "status.json")) or {}


def finished_runs(task, runs):
    """The run folders of runs [(run_dir, options)] whose runner says it finished under the
    configuration these options resolve to: '2e3' and '2000', or options in another order, are
    the same run. The runner's own code resolves both the options and the command lines the
    statuses record (options_of: without the sweep's settings), in one process."""
    done = [(run_dir, options, run_status(run_dir)) for run_dir, options in runs]
    done = [(run_dir, options, status["argv"]) for run_dir, options, status in done
            if status.get("state") == "finished" and isinstance(status.get("argv"), list)]
    if not done:
        return set()
    argvs = [argv for _, options, stored in done for argv in (options, options_of(stored))]
    answer = subprocess.run([sys.executable, "-c", RESOLVE.format(module=RUNNERS[task][:-3])],
                            cwd=TOP, input=json.dumps(argvs), capture_output=True, text=True)
    if answer.returncode:
        lines = answer.stderr.strip().splitlines() or ["no message"]
        raise RuntimeError(f"cannot read the runs' configurations with {RUNNERS[task]}: "
                           f"{lines[-1]}")
    configs = json.loads(answer.stdout)
    return {run_dir for (run_dir, _, _), wanted, had in zip(done, configs[::2], configs[1::2])
            if wanted is not None and wanted == had}


def launch(task, options, run_dir, cwd, threads, local):
    """Start the runner on one run: `python run_<task>.py OPTIONS --log ... --checkpoint ...
    --status ... --threads THREADS --stop-at-eof --wait-if-held ...` in cwd, its output appended
    to the run's stdout.txt and stderr.txt. -> the started run, a dict for finish.

    Its standard input is a pipe that this process holds and never writes: when this process
    ends, however it ends, the pipe ends and the runner stops with a save (--stop-at-eof). If a
    runner of an earlier supervisor still holds the run's files while it saves, the new one
    waits for it (--wait-if-held). local: the runner gets its own session, so that Ctrl-C in the
    terminal reaches the sweep only and the sweep forwards it once (a second signal makes a
    runner quit without saving). On a Dask worker it stays in the worker's process group, where
    the batch system's signals reach it."""
    script = os.path.join(TOP, RUNNERS[task])
    out = open(os.path.join(run_dir, "stdout.txt"), "ab")
    err = open(os.path.join(run_dir, "stderr.txt"), "ab")
    offset = err.tell()  # this session's errors start here
    try:
        process = subprocess.Popen(
            [sys.executable, script] + options + runner_files(task, run_dir)
            + ["--threads", str(threads), "--stop-at-eof", "--wait-if-held",
               str(WAIT_FOR_STOPPING)], cwd=cwd, stdin=subprocess.PIPE, stdout=out, stderr=err,
            env=run_environment(threads), start_new_session=local)
    except BaseException:
        out.close()
        err.close()
        raise
    return {"process": process, "files": (out, err), "offset": offset, "run_dir": run_dir}


def finish(started):
    """After the runner has exited: its pipe and files closed -> how it ended, a dict: exit
    (its status), state (what its status says, if this session wrote it) and message (its
    status's, else the last line this session wrote to stderr, for people)."""
    process = started["process"]
    code = process.returncode
    for f in (process.stdin,) + started["files"]:
        with contextlib.suppress(OSError):
            f.close()
    status = run_status(started["run_dir"])
    if status.get("pid") != process.pid:  # written by an earlier session, or none
        status = {}
    message = status.get("message", "")
    if not message:
        with contextlib.suppress(OSError):
            with open(os.path.join(started["run_dir"], "stderr.txt"), "rb") as f:
                f.seek(started["offset"])
                lines = f.read().decode(errors="replace").strip().splitlines()
            message = lines[-1] if lines else ""
    if code < 0:
        message = f"the runner was killed by signal {-code} (out of memory?) {message}".strip()
    return {"exit": code, "state": status.get("state"), "message": message}


def run_on_worker(task, options, run_dir, cwd, threads, stop_event):
    """One run as a Dask task: the runner as a subprocess of the worker, with threads threads
    (None: this machine's cores divided by the runs the worker runs at once, its thread count),
    sent SIGTERM when the sweep sets the Dask Event stop_event. -> finish's dict; exit None: the
    run did not start (its message says why). If this worker dies, the runner's pipe ends: it
    saves and exits, and Dask runs this task again on another worker, whose runner waits for it
    and resumes."""
    from distributed import Event, get_worker
    worker = get_worker()
    threads = threads or max(1, available_cores() // worker.state.nthreads)
    where = f"on Dask worker {worker.address}"
    if not os.path.isdir(run_dir) or not os.path.isdir(cwd):
        missing = run_dir if not os.path.isdir(run_dir) else cwd
        return {"exit": None, "state": None, "message": (
            f"{missing} does not exist {where}: the sweep folder, the folder the sweep was "
            "started in and the repository must be on storage that every worker shares, at "
            "the same path")}
    stop, stopping = Event(stop_event), False
    if stop.is_set():  # queued when the sweep was stopped
        return {"exit": None, "state": None, "message": NOT_STARTED}
    started = launch(task, options, run_dir, cwd, threads, local=False)
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

    return {"start": start, "poll": poll, "stop": stop, "lost": list, "key": id,
            "capacity": workers, "close": None, "verb": None,
            "where": f"{workers} at a time on this machine, {plural(threads, 'thread')} each"}


def dask_backend(task, address, threads, cwd):
    """Start, poll and stop runs as tasks on the Dask cluster whose scheduler is at address. The
    cluster queues them: as many run at once as its workers have threads. lost() lists the
    workers lost since its last call, each with the keys of the tasks it was running (Dask runs
    those again on other workers)."""
    try:
        import cloudpickle
        from distributed import Client, Event
    except ImportError:
        raise UsageError("--scheduler needs Dask: pip install dask distributed") from None
    cloudpickle.register_pickle_by_value(runfiles)  # workers need not import the repository's
    if __name__ != "__main__":  # modules: this one goes by value too when it is imported (tests)
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        client = Client(address, timeout="30s")
    except (OSError, TimeoutError, ValueError) as e:
        raise RuntimeError(f"cannot reach the Dask scheduler at {address} ({e})") from None
    stop_event = f"ok-rtrl-sweep-stop-{uuid.uuid4().hex}"
    removed = queue.SimpleQueue()  # filled by the client's event loop, emptied by lost()

    def on_event(event):
        _, message = event
        if isinstance(message, dict) and message.get("action") == "remove-worker":
            removed.put((message.get("worker"), set(message.get("processing-tasks", ()))))
    client.subscribe_topic("all", on_event)  # before any task: the scheduler keeps the order

    def start(run_dir, options):
        lr, seed = run_dir.split(os.sep)[-2:]  # the task's name on the dashboard
        return client.submit(run_on_worker, task, options, run_dir, cwd, threads, stop_event,
                             pure=False, key=f"sweep-{lr}-{seed}-{uuid.uuid4().hex[:8]}")

    def poll(future):
        if not future.done():
            return None
        if future.status == "error":  # e.g. its workers died repeatedly
            return {"exit": None, "state": None,
                    "message": f"the Dask task failed: {future.exception()!r}"}
        if future.status != "finished":
            return {"exit": None, "state": None, "message": f"the Dask task was {future.status}"}
        return future.result()

    def stop(running, signum):
        Event(stop_event, client=client).set()  # every task sends SIGTERM to its runner

    def close():
        client.unsubscribe_topic("all")  # first: the scheduler would send us our own leaving
        client.close()

    def lost():
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(removed.get_nowait())
        return found

    workers = client.nthreads()  # {worker address: threads}
    slots = sum(workers.values())
    return {"start": start, "poll": poll, "stop": stop, "lost": lost,
            "key": lambda future: future.key, "capacity": math.inf, "close": close,
            "verb": "queued", "where": f"the Dask cluster at {address} ("
            f"{plural(len(workers), 'worker')}, {slots} runs at a time for now)"}


# --- The sweep: start, watch and stop the runs -------------------------------------------------


def status_signature(run_dir):
    """(inode, mtime, size) of the run's status.json, or None. Every write of it is a new file
    (runfiles.write_atomically), so a new signature means that a runner holds the run's files
    and has accepted its options, memory, data and checkpoint, or refused them."""
    with contextlib.suppress(OSError):
        s = os.stat(os.path.join(run_dir, "status.json"))
        return s.st_ino, s.st_mtime_ns, s.st_size
    return None


def describe(task, status):
    """A run's status in short: 'T 9 at step 100,000', or 'step 20,000, best valid BPC 2.6500
    (step 20,000), test BPC 2.6200'."""
    step, result = status.get("step"), status.get("result") or {}
    if step is None:
        return "no step yet"
    if task == "copy":
        return f"T {result.get('T')} at step {step:,}"
    text = f"step {step:,}"
    if result.get("best_valid_bpc") is not None:
        text += f", best valid BPC {result['best_valid_bpc']:.4f} (step {result['best_step']:,})"
    if result.get("test_bpc") is not None:
        text += f", test BPC {result['test_bpc']:.4f}"
    return text


def logged_step(run_dir):
    """The step of the last row of the run's log (a run's progress between its saves), or
    None."""
    with contextlib.suppress(runfiles.UserError, ValueError):
        rows = runfiles.read_log(os.path.join(run_dir, "log.csv")).rows
        return int(rows[-1][1][0]) if rows else None
    return None


def run_sweep(task, folder, grid, extra, backend):
    """Run every unfinished run of grid [(lr, seed)], backend["capacity"] at a time; -> the exit
    status: 0 all finished, 1 some failed, 128 + signal if stopped by a signal.

    Ctrl-C or SIGTERM: no new run starts, the signal goes to every running runner (each saves
    its checkpoint after its current step and exits), and the sweep waits for them; a second
    one is forwarded too (runners then quit at once, without saving). A lost Dask worker is
    reported with the runs it was running, which Dask runs again elsewhere."""
    runs = [(lr, seed, run_folder(folder, lr, seed), tuple(runner_options(extra, lr, seed)))
            for lr, seed in grid]  # tuples: a run is a key of sweep["running"]
    finished = finished_runs(task, [(run_dir, list(options)) for _, _, run_dir, options in runs])
    pending = [run for run in runs if run[2] not in finished]
    print(f"{PROG}: {task}, {plural(len(grid), 'run')} ("
          f"{plural(len({lr for lr, _ in grid}), 'learning rate')} x "
          f"{plural(len({seed for _, seed in grid}), 'seed')}) in {folder}: "
          f"{len(runs) - len(pending)} finished before, {len(pending)} to run, "
          f"{backend['where']}", flush=True)
    sweep = {"pending": pending, "running": {}, "done": [], "failed": [], "busy": [],
             "lost": [], "retried": [], "signals": [], "probe": None, "probe_status": None,
             "checked": False, "shown": time.monotonic()}
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
                notice_lost_workers(backend, sweep)
                collect_runs(task, backend, sweep)
                show_progress(sweep)
                time.sleep(POLL_SECONDS)
        except BaseException:  # the sweep fails (e.g. its output is gone): the runs save first,
            backend["stop"](list(sweep["running"].values()), signal.SIGTERM)  # and the sweep
            with contextlib.suppress(Exception):  # waits for them, so that a rerun finds them
                wait_for(backend, sweep["running"])  # saved
            raise
    report_lost_workers(sweep)
    if sweep["signals"]:
        print(f"{PROG}: stopped by {signal.Signals(sweep['signals'][0]).name}: "
              f"{plural(len(sweep['pending']), 'run')} not started; rerun the same command to go "
              "on", flush=True)
        return 128 + sweep["signals"][0]
    if sweep["busy"]:
        print(f"{PROG}: {plural(len(sweep['busy']), 'run')} held by another process: rerun "
              "when it ends")
    if sweep["failed"]:
        print(f"{PROG}: {plural(len(sweep['failed']), 'run')} failed (their stderr.txt says "
              "why); a rerun tries them again from their last checkpoint")
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
    start goes alone (the probe) until its runner has written its status running, i.e. accepted
    its options, outputs, memory, data and checkpoint: if those are wrong, they are wrong for
    every run, and one error is enough."""
    running, probe = sweep["running"], sweep["probe"]
    if (probe in running and status_signature(probe[2]) != sweep["probe_status"]
            and run_status(probe[2]).get("state") != "refused"):
        sweep["checked"] = True
    while (sweep["pending"] and not sweep["signals"] and len(running) < backend["capacity"]
           and (sweep["checked"] or sweep["probe"] not in running)):
        lr, seed, run_dir, options = run = sweep["pending"].pop(0)
        os.makedirs(run_dir, exist_ok=True)
        before, status = status_signature(run_dir), run_status(run_dir)
        running[run] = backend["start"](run_dir, list(options))
        if sweep["probe"] is None:
            sweep["probe"], sweep["probe_status"] = run, before
        saved = os.path.exists(os.path.join(run_dir, "checkpoint.npz"))
        say(backend["verb"] or ("resuming" if saved else "starting"), lr, seed,
            f" (its checkpoint at step {status['step']:,})"
            if saved and status.get("step") is not None else "")


def notice_lost_workers(backend, sweep):
    """Say which Dask workers were lost, and which runs they were running: Dask runs those
    again on another worker, whose runner waits for the old one to save, then resumes."""
    keys = {backend["key"](started): run for run, started in sweep["running"].items()}
    for worker, processing in backend["lost"]():
        mine = [keys[key] for key in processing if key in keys]
        sweep["lost"].append(worker)
        print(f"  lost     Dask worker {worker}" + (": it ran no run of this sweep" if not mine
              else ", which ran " + ", ".join(f"lr {lr_name(lr)} seed {seed}"
                                              for lr, seed, _, _ in mine)), flush=True)
        for lr, seed, run_dir, options in mine:
            sweep["retried"].append((lr, seed, run_dir, options))
            say("retrying", lr, seed, " on another worker, from the checkpoint its runner saves "
                "now that its worker is gone")


def report_lost_workers(sweep):
    if sweep["lost"]:
        retried = sorted(set(sweep["retried"]))
        finished = [run for run in retried if run in sweep["done"]]
        print(f"{PROG}: lost {plural(len(sweep['lost']), 'Dask worker')} "
              f"({', '.join(sweep['lost'])}); {plural(len(retried), 'run')} retried"
              + (": " + ", ".join(f"lr {lr_name(lr)} seed {seed}" for lr, seed, _, _ in retried)
                 + f"; {len(finished)} of them finished" if retried else ""), flush=True)


def collect_runs(task, backend, sweep):
    """Report the runs that have ended, from their exit status and the status their runner
    wrote. A failure of the probe before it passed stops the sweep with the runner's error line
    (UsageError for a bad option, exit 2); any other failure (diverged, a full disk) is that
    run's, and the others go on."""
    running = sweep["running"]
    for run in list(running):
        ended = backend["poll"](running[run])
        if ended is None:
            continue
        del running[run]
        code, message = ended["exit"], ended["message"]
        lr, seed, run_dir, _ = run
        if message == NOT_STARTED:
            sweep["pending"].append(run)
        elif code == 0:
            sweep["done"].append(run)
            again = " (retried after a lost worker)" if run in sweep["retried"] else ""
            say("done", lr, seed, f": {describe(task, run_status(run_dir))}{again}")
        elif code in STOPPED:
            say("stopped", lr, seed, f": {describe(task, run_status(run_dir))}, checkpoint saved")
        elif code == runfiles.BUSY_EXIT:
            sweep["busy"].append(run)
            say("busy", lr, seed, f": {message}")
        elif run == sweep["probe"] and not sweep["checked"]:
            backend["stop"](list(running.values()), signal.SIGTERM)
            wait_for(backend, running)
            refused = UsageError if code == 2 else RuntimeError
            raise refused("the first run failed before training, so every run would; nothing "
                          f"else was started: {message}")
        else:
            sweep["failed"].append(run)
            say("diverged" if ended["state"] == "diverged" else "failed", lr, seed,
                f": {message}")


def show_progress(sweep):
    """Every PROGRESS_SECONDS, one line on the running runs (the last rows of their logs)."""
    if sweep["running"] and time.monotonic() - sweep["shown"] >= PROGRESS_SECONDS:
        steps = [(lr, seed, logged_step(run_dir)) for lr, seed, run_dir, _ in sweep["running"]]
        print("  running: " + "; ".join(
            f"lr {lr_name(lr)} seed {seed} " + (f"at step {step:,}" if step else "starting")
            for lr, seed, step in steps), flush=True)
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


# --- The summary: the paper's metric per learning rate, from the runs' status --------------------


def run_outcome(run_dir, finished):
    """One run for the summary: (state, its result, its step), from the status its runner
    wrote. state: finished (under the sweep's configuration: run_dir in finished), diverged
    (counts as the worst value), failed, unfinished or not started."""
    status = run_status(run_dir)
    state, step = status.get("state"), status.get("step")
    if state == "finished" and run_dir in finished:
        return "finished", status.get("result") or {}, step
    if state in ("diverged", "failed"):
        return state, {}, step
    if state == "refused":
        return "failed", {}, step
    return ("unfinished" if os.path.isdir(run_dir) else "not started"), {}, step


# The paper's metric per task: (key in a run's result, what it is, higher is better), the first
# one picks the learning rate
METRICS = {"copy": [("T", "T", True)],
           "ptb": [("best_valid_bpc", "valid BPC", False), ("test_bpc", "test BPC", False)]}


def lr_rows(task, folder, lrs, seeds, extra):
    """Per learning rate: its name, per-metric values over the seeds that count (finished under
    the sweep's options extra; diverged as the worst value), and the counts of each state.
    -> list of dicts."""
    rows, finished = [], finished_runs(task, [(run_folder(folder, lr, seed),
                                               runner_options(extra, lr, seed))
                                              for lr in lrs for seed in seeds])
    for lr in lrs:
        values, states, steps = {key: [] for key, _, _ in METRICS[task]}, {}, set()
        for seed in seeds:
            state, result, step = run_outcome(run_folder(folder, lr, seed), finished)
            states[state] = states.get(state, 0) + 1
            for key, _, higher in METRICS[task]:
                value = result.get(key)
                if state == "finished" and value is not None and not math.isnan(value):
                    values[key].append(value)
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


def summary_table(task, folder, lrs, seeds, extra):
    """The summary as text: per learning rate the median and range over the seeds of the paper's
    metric, how many runs count, and the learning rate the paper's rule picks."""
    rows = lr_rows(task, folder, lrs, seeds, extra)
    metrics = METRICS[task]
    seeds_text = ",".join(map(str, seeds))
    title = (f"{TASKS[task]}: curriculum T reached at the end of each run" if task == "copy"
             else f"{TASKS[task]}: best validation BPC and the test BPC of its weights")
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


YLABELS = {"T": "curriculum T at the last step", "best_valid_bpc": "best validation BPC",
           "test_bpc": "test BPC of the best validation weights"}


def summary_figure(task, rows, best, path):
    """Each seed's value (dots) and the median (line) against the learning rate, one panel per
    metric, the picked learning rate starred; False when matplotlib is missing."""
    plt = runfiles.matplotlib_pyplot()
    if plt is None:
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
    runfiles.save_figure(plt, fig, path)
    return True


def summarize(folder):
    """Print the summary of the sweep in folder and write summary.txt and summary.png there."""
    sweep = runfiles.read_json(os.path.join(folder, SWEEP_FILE))
    if sweep is None:
        raise UsageError(f"{folder} holds no sweep ({SWEEP_FILE} is missing or damaged): give "
                         "the folder a sweep was run in")
    task, lrs, seeds = sweep["task"], sweep["lrs"], sweep["seeds"]
    text, rows, best = summary_table(task, folder, lrs, seeds, sweep["runner_options"])
    print(text, end="")
    runfiles.write_atomically(os.path.join(folder, SUMMARY_TEXT), lambda f: f.write(text.encode()),
                              "summary")
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
        usage=f"{COMMAND} {{copy,ptb}} FOLDER [--lr LRS] [--seeds SEEDS] [--workers N | "
        f"--scheduler ADDRESS] [--threads T] [runner options]\n       {COMMAND} summary FOLDER",
        description="The paper's protocol (Benzing et al. 2019, arXiv 1902.03993): one run of "
        "run_copy.py or run_ptb.py per learning rate and seed, each with its log and checkpoint "
        "in FOLDER/lr=.../seed=.../, then the median and range over the seeds of the paper's "
        "metric per learning rate and the one the paper's rule (the best median) picks. Every "
        "other option goes to each run (see python run_copy.py --help). Rerunning the command "
        "skips finished runs and resumes the others from their checkpoints; Ctrl-C or SIGTERM "
        "stops every run after a saved step, and so does the end of the sweep's process, "
        "however it ends. 'summary FOLDER' prints the table again.",
        epilog="With --scheduler, the runs are tasks of a Dask cluster (pip install dask "
        "distributed): FOLDER, the folder you start the sweep in and this repository must be on "
        "storage every worker shares, at the same path (docs/sweeps.md shows SLURM and "
        "PBS).")
    p.add_argument("--lr", default=PAPER_LRS, metavar="LRS",
                   help=f"learning rates, comma-separated: 10^-3.5, 3x10^-3, 1e-3, 3.16e-4; "
                   f"shown and named as powers of ten (default {PAPER_LRS}, the paper's grid)")
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
    previous = runfiles.read_json(os.path.join(folder, SWEEP_FILE))
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
        except OSError as e:
            raise RuntimeError(f"cannot make the sweep folder {folder} ({e.strerror or e})") \
                from None
        runfiles.write_json(os.path.join(folder, SWEEP_FILE), {
            "task": task, "lrs": lrs, "seeds": seeds, "runner_options": extra}, "the sweep's grid")
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
    if "-h" in argv or "--help" in argv:  # sweep.py --help, sweep.py copy --help, ...
        parser.print_help()
        if argv[0] in RUNNERS:
            print(f"\nEvery other option goes to each run: python {RUNNERS[argv[0]]} --help "
                  "lists them.")
        return 0
    try:
        task = argv[0] if argv else None
        if task not in ("copy", "ptb", "summary"):
            raise UsageError("the first argument is copy, ptb or summary"
                             + (f", not {task!r}" if task else f" (see {COMMAND} --help)"))
        if len(argv) < 2 or argv[1].startswith("-"):
            raise UsageError(f"give the sweep folder after {task}: {COMMAND} {task} FOLDER ...")
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
    except (RuntimeError, OSError, runfiles.UserError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
