"""Tests of sweep.py: the paper's learning-rate grid times seeds, run through the runners.

The sweep runs the runners as programs, so these tests do too, on tiny configurations (n 8, a few
thousand steps of the copy task; a small synthetic corpus in the real PTB files' format): a grid
run here, the same grid on a real Dask cluster on 127.0.0.1 (the same summary and logs), a sweep
killed part-way and rerun (the same summary; finished runs untouched, interrupted ones resumed),
a bad runner option (one error line, one run started), and the summary of hand-written logs
(the median, range and the paper's pick checked by hand). The Dask test is skipped where
distributed is not installed.
"""
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
from hypothesis import example, given, strategies as st

from tools import sweep

try:
    import distributed
except ImportError:
    distributed = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's top
SWEEP = [sys.executable, "-m", "tools.sweep"]  # as a user runs it, from the top
TINY_COPY = ["--hidden", "8", "--batch", "3", "--rank", "2", "--steps", "4000", "--log-every",
             "500"]
GRID = ["--lr", "10^-1,10^-1.5", "--seeds", "1-2"]
RUNS = [("10^-1", 1), ("10^-1", 2), ("10^-1.5", 1), ("10^-1.5", 2)]
needs_dask = pytest.mark.skipif(distributed is None, reason="Dask is not installed (pip install "
                                "dask distributed; .ci/run installs them)")


# --- Helpers ------------------------------------------------------------------------------------


def sweep_command(args, cwd, env=None):
    """Run `python -m tools.sweep ARGS` as a user would; -> the CompletedProcess."""
    return subprocess.run(SWEEP + args, cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def run_dir(folder, lr, seed):
    return os.path.join(folder, f"lr={lr}", f"seed={seed}")


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def log_rows(path, drop_rate=True):
    """The data rows of a runner's CSV log, without the timing column (it varies run to run)."""
    lines = [line for line in read(path).splitlines() if not line.startswith("#")][1:]
    return [line.rsplit(",", 1)[0] if drop_rate else line for line in lines]


def assert_run_equals_runner_by_hand(runner, options, sweep_log, tmp_path):
    """The sweep's log of one run has the rows of the runner run by hand with the same options
    (the rate column aside): the sweep runs each run through the runner's own code path."""
    by_hand = str(tmp_path / "by-hand.csv")
    done = subprocess.run([sys.executable, os.path.join(ROOT, runner)] + options
                          + ["--log", by_hand], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert log_rows(by_hand) == log_rows(sweep_log)


def state(folder, lr, seed):
    path = os.path.join(run_dir(folder, lr, seed), "status.json")
    return json.loads(read(path))["state"] if os.path.exists(path) else None


def table_rows(summary):
    """{lr: [cells]} of a summary's table, cells split at two or more spaces."""
    return {line.split()[0]: re.split(r"\s{2,}", line) for line in summary.splitlines()
            if re.match(r"(\d+(\.\d+)?x)?10\^", line)}


def children(pid):
    """Process ids whose parent is pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = read(f"/proc/{entry}/stat")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state
                found.append(int(entry))
    return found


def runner_processes(pid):
    """Environment and command line (as one list of byte strings) of each child of pid that runs
    a runner. A child that has exited, or has been forked but has not yet started the runner (it
    still has the sweep's environment), is left out."""
    found = []
    for child in children(pid):
        try:
            environ = read(f"/proc/{child}/environ", "rb").split(b"\0")
            cmdline = read(f"/proc/{child}/cmdline", "rb").split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(arg).decode() in sweep.RUNNERS.values() for arg in cmdline):
            found.append(environ + cmdline)
    return found


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The copy-task grid (2 learning rates x 2 seeds) run here, 2 runs at a time, 1 thread each;
    -> (folder, what the sweep printed)."""
    folder = str(tmp_path_factory.mktemp("local") / "copy")
    done = sweep_command(["copy", folder] + GRID + TINY_COPY + ["--workers", "2", "--threads",
                                                                "1"], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return folder, done.stdout


# --- The grid as people type it -------------------------------------------------------------------


def test_learning_rates_and_seeds_as_people_type_them():
    """The paper's grid parses to the very floats 10 ** e (so 10^-3.5 is the runners' default
    lr exactly); 1e-3, 10^-3, 10**-3 and 0.001 are one run; seeds as ranges and lists."""
    assert sweep.parse_lrs("10^-2.5,10^-3,10^-3.5,10^-4") == [10 ** -2.5, 10 ** -3, 10 ** -3.5,
                                                              10 ** -4]
    assert sweep.parse_lrs("1e-3, 10^-3,0.001,10**-3") == [0.001]
    assert sweep.parse_lrs("3.16e-4,1e-2,3x10^-3,2.5*10^-3") == [1e-2, 3e-3, 2.5e-3, 3.16e-4]
    assert [sweep.lr_name(x) for x in (10 ** -3.5, 1e-3, 3e-3, 3.16e-4, 1.0)] == \
        ["10^-3.5", "10^-3", "3x10^-3", "3.16x10^-4", "10^0"]
    assert sweep.parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert sweep.parse_seeds("5,1,3") == [1, 3, 5]
    assert sweep.parse_seeds("1-3,7,2") == [1, 2, 3, 7]
    for text in ("1e-3.5", "0", "-1e-3", "nan", "inf", "ten", "10^x"):
        with pytest.raises(sweep.UsageError, match="--lr"):
            sweep.parse_lrs(text)
    for text in ("5-1", "a", "1-", "", "-2"):
        with pytest.raises(sweep.UsageError, match="--seeds"):
            sweep.parse_seeds(text)


@given(st.floats(min_value=1e-300, max_value=1e300, allow_subnormal=False))
@example(10 ** -2.5)
@example(0.1 + 0.2)
def test_every_learning_rate_is_named_as_a_power_of_ten_that_reads_back(lr):
    """One notation in folders, table and figure: 10^e or Mx10^k, with 1 <= M < 10, and
    parse_lr reads the name back to the very float (so a rerun finds the run's folder)."""
    name = sweep.lr_name(lr)
    assert re.fullmatch(r"10\^-?\d+(\.\d+)?|[1-9](\.\d+)?x10\^-?\d+", name), name
    assert sweep.parse_lr(name) == lr


@pytest.mark.parametrize("argv", [["--help"], ["copy", "--help"], ["ptb", "-h"],
                                  ["copy", "sweeps/copy", "--steps", "10", "--help"]])
def test_help_wherever_it_is_asked_for(capsys, argv):
    """`sweep.py copy --help` is help, not an error about the missing folder; it says where the
    runner's own options are listed."""
    assert sweep.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m tools.sweep") and err == ""
    assert "docs/sweeps.md shows SLURM" in " ".join(out.split())  # where the recipe is
    if argv[0] in sweep.RUNNERS:
        assert f"python {sweep.RUNNERS[argv[0]]} --help lists them" in out


def test_a_batch_jobs_cpus_cap_the_cores(monkeypatch):
    """On a node that the batch system does not pin, a job with 1 CPU must not count the node."""
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    assert sweep.available_cores() == 1


@pytest.mark.parametrize("extra, says", [
    (["--seed", "3"], "--seeds 1-5"),
    (["--log=run.csv"], "log.csv"),
    (["--checkpoint", "run.npz"], "checkpoint.npz"),
    (["--lo", "run.csv"], "log.csv"),  # the runner's argparse would read it as --log
    (["--plot", "curve.png"], "summary.png"),
    (["--noise-log", "noise.csv"], "noise.csv"),
])
def test_options_the_sweep_sets_are_refused_before_anything_is_written(tmp_path, capsys, extra,
                                                                       says):
    folder = str(tmp_path / "sweep")
    assert sweep.main(["copy", folder] + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: error: ") and says in lines[0]
    assert not os.path.exists(folder)
    sweep.check_runner_options(["--log-every", "5", "--checkpoint-every", "60", "--steps", "1e5"])


def test_without_dask_the_scheduler_option_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    folder = str(tmp_path / "sweep")
    assert sweep.main(["copy", folder, "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["sweep: error: --scheduler needs Dask: pip install dask distributed"]
    assert not os.path.exists(folder)


# --- The summary, from hand-written logs ---------------------------------------------------------


def write_run(folder, lr, seed, state, step=None, result=None, message="", options=()):
    """A run folder as a runner leaves it: status.json, its command line as the sweep gives it
    (the sweep's settings, which the summary ignores, around the options that define it)."""
    path = run_dir(folder, lr, seed)
    os.makedirs(path)
    argv = (list(options) + ["--lr", repr(sweep.parse_lr(lr)), "--seed", str(seed), "--log",
                             os.path.join(path, "log.csv"), "--threads", "1", "--stop-at-eof"])
    with open(os.path.join(path, "status.json"), "w") as f:
        json.dump({"state": state, "step": step, "steps": 4000, "result": result or {},
                   "message": message, "pid": 1, "argv": argv}, f)


def write_sweep_file(folder, task, lrs, seeds, options=()):
    with open(os.path.join(folder, "sweep.json"), "w") as f:
        json.dump({"task": task, "lrs": lrs, "seeds": seeds, "runner_options": list(options)}, f)


def test_copy_summary_medians_ranges_and_the_paper_pick(tmp_path, capsys):
    """Worked by hand. 10^-2.5: T 5, 9 and a diverged seed (worse than any T): median 5.
    10^-3: 6, 7, 8 and 10^-3.5: 7, 7, 9 both have median 7, the best; 10^-3.5 has the better mean
    (7.67 against 7), so the paper's rule picks it. 10^-4: one seed at T 3, one stopped at step
    2,000, one not started: the pick is 'so far'."""
    folder = str(tmp_path)
    Ts = {"10^-2.5": [5, 9], "10^-3": [6, 7, 8], "10^-3.5": [7, 7, 9], "10^-4": [3]}
    for lr, values in Ts.items():
        for seed, T in enumerate(values, 1):
            write_run(folder, lr, seed, "finished", 4000, {"T": T, "avg_bits": 0.2})
    write_run(folder, "10^-2.5", 3, "diverged", 2344, {"T": 2, "avg_bits": 0.5},
              message="step 2345: the loss is not finite: the run diverged; lower the learning "
              "rate or train in float64")
    write_run(folder, "10^-4", 2, "stopped", 2000, {"T": 2, "avg_bits": 0.5})
    write_sweep_file(folder, "copy", [10 ** -2.5, 10 ** -3, 10 ** -3.5, 10 ** -4], [1, 2, 3])
    assert sweep.main(["summary", folder]) == 0
    expected = """\
copy task: curriculum T reached at the end of each run; median and range over seeds 1,2,3

lr       finished  T: median  range         notes
10^-2.5  2/3       5          diverged - 9  at step 4,000; 1 diverged
10^-3    3/3       7          6 - 8         at step 4,000
10^-3.5  3/3       7          7 - 9         at step 4,000
10^-4    1/3       3          3 - 3         at step 4,000; 1 not started; 1 unfinished

the paper's rule (the best median T) picks lr 10^-3.5 (tied on the median with 10^-3: the better mean decides, then the larger lr) so far: some runs have not finished
"""
    assert read(os.path.join(folder, "summary.txt")) == expected
    assert capsys.readouterr().out.startswith(expected)


def test_a_run_finished_under_other_options_does_not_count(tmp_path):
    """The summary counts a run as finished only under the sweep's options: one finished with
    --hidden 16 when the sweep's are none is unfinished; the sweep's own settings (files,
    threads, --stop-at-eof) do not matter."""
    folder = str(tmp_path)
    write_run(folder, "3x10^-3", 1, "finished", 4000, {"T": 6, "avg_bits": 0.2})
    write_run(folder, "3x10^-3", 2, "finished", 4000, {"T": 9, "avg_bits": 0.2},
              options=["--hidden", "16"])
    write_sweep_file(folder, "copy", [3e-3], [1, 2])
    assert sweep.main(["summary", folder]) == 0
    assert table_rows(read(os.path.join(folder, "summary.txt")))["3x10^-3"] == [
        "3x10^-3", "1/2", "6", "6 - 6", "at step 4,000; 1 unfinished"]


def test_a_run_is_recognised_by_its_configuration_not_its_spelling(tmp_path):
    """The sweep's options are --hidden 16 --steps 2000. Seed 1 finished under --steps 2e3
    --hidden 16 (another spelling and order: the same configuration), seed 2 under --hidden 16
    --steps 2_000 --seed 2 --lr ... given twice over (argparse keeps the last), seed 3 under
    --steps 2001: only seed 3 is unfinished. The files the sweep gave each run are no part of
    it: seed 1's log was in a folder that is gone (the sweep folder moved)."""
    folder = str(tmp_path)
    for seed, options in ((1, ["--steps", "2e3", "--hidden", "16"]),
                          (2, ["--hidden", "16", "--steps", "2_000", "--seed", "9"]),
                          (3, ["--hidden", "16", "--steps", "2001"])):
        write_run(folder, "3x10^-3", seed, "finished", 2000, {"T": 5 + seed, "avg_bits": 0.2},
                  options=options)
    status_file = os.path.join(run_dir(folder, "3x10^-3", 1), "status.json")
    status = json.loads(read(status_file))
    status["argv"] = [str(tmp_path / "gone" / "log.csv") if arg.endswith("log.csv") else arg
                      for arg in status["argv"]]
    with open(status_file, "w") as f:
        json.dump(status, f)
    write_sweep_file(folder, "copy", [3e-3], [1, 2, 3], ["--hidden", "16", "--steps", "2000"])
    assert sweep.main(["summary", folder]) == 0
    assert table_rows(read(os.path.join(folder, "summary.txt")))["3x10^-3"] == [
        "3x10^-3", "2/3", "6.5", "6 - 7", "at step 2,000; 1 unfinished"]


def test_summary_figure_or_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    """The figure is a PNG next to the table; without matplotlib the table comes with one line
    saying what to install, and no figure."""
    write_run(str(tmp_path), "10^-3", 1, "finished", 1000, {"T": 4, "avg_bits": 0.2})
    write_sweep_file(str(tmp_path), "copy", [10 ** -3], [1])
    figure = tmp_path / "summary.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert sweep.main(["summary", str(tmp_path)]) == 0
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        figure.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert sweep.main(["summary", str(tmp_path)]) == 0
    assert "the figure needs matplotlib (pip install matplotlib)" in capsys.readouterr().out
    assert not figure.exists() and (tmp_path / "summary.txt").exists()


def test_ptb_summary_takes_the_best_validation_and_its_test_bpc(tmp_path):
    """Best validation BPC and the test BPC of those weights, as each run's status gives them.
    10^-3: best 1.80 and 1.90 (median 1.85), 10^-3.5: 1.75 and 1.77 (median 1.76): the
    paper's rule picks 10^-3.5."""
    folder = str(tmp_path)
    best = {("10^-3", 1): (1.8, 1.79), ("10^-3", 2): (1.9, 1.88), ("10^-3.5", 1): (1.75, 1.74),
            ("10^-3.5", 2): (1.77, 1.78)}
    for (lr, seed), (valid, test) in best.items():
        write_run(folder, lr, seed, "finished", 4000,
                  {"best_valid_bpc": valid, "best_step": 2000, "test_bpc": test})
    write_sweep_file(folder, "ptb", [10 ** -3, 10 ** -3.5], [1, 2])
    assert sweep.main(["summary", folder]) == 0
    rows = table_rows(read(os.path.join(folder, "summary.txt")))
    assert rows["10^-3"] == ["10^-3", "2/2", "1.8500", "1.8000 - 1.9000", "1.8350",
                             "1.7900 - 1.8800"]
    assert rows["10^-3.5"] == ["10^-3.5", "2/2", "1.7600", "1.7500 - 1.7700", "1.7600",
                               "1.7400 - 1.7800"]
    assert "picks lr 10^-3.5\n" in read(os.path.join(folder, "summary.txt"))


# --- Sweeps that run ------------------------------------------------------------------------------


def test_local_sweep_runs_each_run_through_its_runner(local_sweep, tmp_path):
    """Every run finished, with its own log; one of them equals run_copy.py run by hand with the
    same options; the summary's medians and ranges are those of the logs' last rows, and
    `sweep.py summary` prints the table again."""
    folder, out = local_sweep
    assert all(state(folder, lr, seed) == "finished" for lr, seed in RUNS)
    assert_run_equals_runner_by_hand("run_copy.py", TINY_COPY + ["--lr", "0.1", "--seed", "2"],
                                     os.path.join(run_dir(folder, "10^-1", 2), "log.csv"), tmp_path)
    summary = read(os.path.join(folder, "summary.txt"))
    medians = {}
    for lr in ("10^-1", "10^-1.5"):
        Ts = [int(log_rows(os.path.join(run_dir(folder, lr, seed), "log.csv"))[-1].split(",")[1])
              for seed in (1, 2)]
        medians[lr] = statistics.median(Ts)
        assert table_rows(summary)[lr][:4] == [lr, "2/2", f"{medians[lr]:g}",
                                               f"{min(Ts)} - {max(Ts)}"]
    best = max(medians.values())
    assert f"picks lr {[lr for lr in medians if medians[lr] == best][0]}" in summary
    assert summary in out
    again = sweep_command(["summary", folder], cwd=ROOT)
    assert again.returncode == 0 and again.stdout.startswith(summary)


@needs_dask
def test_dask_cluster_gives_the_same_runs_and_summary(local_sweep, tmp_path):
    """A scheduler and two worker processes on 127.0.0.1: the same command with --scheduler
    gives the same logs and the same summary as the local path."""
    local_folder, _ = local_sweep
    folder = str(tmp_path / "copy")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        done = sweep_command(["copy", folder] + GRID + TINY_COPY + ["--scheduler", address,
                                                                    "--threads", "1"], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the Dask cluster at tcp://127.0.0.1:" in done.stdout
    for lr, seed in RUNS:
        assert state(folder, lr, seed) == "finished"
        assert (log_rows(os.path.join(run_dir(folder, lr, seed), "log.csv"))
                == log_rows(os.path.join(run_dir(local_folder, lr, seed), "log.csv")))
    assert read(os.path.join(folder, "summary.txt")) == \
        read(os.path.join(local_folder, "summary.txt"))


def checkpoint_step(path):
    """The step a runner's checkpoint holds (its counters, JSON)."""
    import numpy as np
    with np.load(path) as f:
        return json.loads(str(f["counters"]))["step"]


def test_the_same_grid_written_differently_runs_nothing_again(local_sweep, tmp_path):
    """The local sweep's command again on a copy of its folder, its runner options reordered and
    --steps 4000 written 4e3: every run is recognised as finished, none is started, and no log
    is touched."""
    folder = str(tmp_path / "copy")
    shutil.copytree(local_sweep[0], folder)
    logs = {run: read(os.path.join(run_dir(folder, *run), "log.csv")) for run in RUNS}
    respelled = ["--log-every", "500", "--steps", "4e3", "--rank", "2", "--batch", "3",
                 "--hidden", "8"]
    assert sorted(respelled) != sorted(TINY_COPY)  # the same runs, not the same tokens
    done = sweep_command(["copy", folder, "--seeds", "1-2", "--lr", "10^-1.5,10^-1"] + respelled
                         + ["--workers", "2", "--threads", "1"], cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "4 finished before, 0 to run" in done.stdout
    assert "starting" not in done.stdout and "resuming" not in done.stdout
    assert logs == {run: read(os.path.join(run_dir(folder, *run), "log.csv")) for run in RUNS}
    assert read(os.path.join(folder, "summary.txt")) == \
        read(os.path.join(local_sweep[0], "summary.txt"))


def test_killed_sweep_reruns_to_the_same_summary_running_nothing_twice(local_sweep, tmp_path):
    """SIGTERM to the sweep while some runs have finished and others are half-way: it stops them
    (exit 143, they save) and reports each where its checkpoint is, and the rerun of the same
    command leaves every finished run's files untouched (its runner is not started again:
    stdout.txt gains nothing), resumes the interrupted ones (the log rows written before the
    kill are kept byte for byte, timing column included, which a restart would rewrite), and
    gives the local path's summary. While it runs, each runner has --threads 1 and 1 thread in
    its environment, whatever the sweep's environment says."""
    local_folder, _ = local_sweep
    folder = str(tmp_path / "copy")
    argv = ["copy", folder] + GRID + TINY_COPY + ["--workers", "2", "--threads", "1"]
    env = dict(os.environ, **{name: "7" for name in sweep.THREAD_VARIABLES})
    process = subprocess.Popen(SWEEP + argv, cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runner_env, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline:
        finished = [run for run in RUNS if state(folder, *run) == "finished"]
        halfway = halfway_runs(folder)
        if finished and halfway:
            runner_env = runner_processes(process.pid)
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out + err
    assert runner_env, "no runner was running when the sweep was stopped"
    for variables in runner_env:
        for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            assert f"{name}=1".encode() in variables
        assert b"--threads" in variables and variables[variables.index(b"--threads") + 1] == b"1"
    finished = [run for run in RUNS if state(folder, *run) == "finished"]
    unfinished = [run for run in RUNS if run not in finished]
    assert finished and unfinished
    for lr, seed in halfway:  # stopped with a save, and reported where that save is
        status = json.loads(read(os.path.join(run_dir(folder, lr, seed), "status.json")))
        step = checkpoint_step(os.path.join(run_dir(folder, lr, seed), "checkpoint.npz"))
        assert status["state"] == "stopped" and status["step"] == step
        assert (f"stopped  lr {lr} seed {seed}: T {status['result']['T']} at step {step:,}, "
                "checkpoint saved") in out
    files = ("log.csv", "checkpoint.npz", "status.json", "stdout.txt", "stderr.txt")
    before = {(run, name): (read(os.path.join(run_dir(folder, *run), name), "rb"),
                            os.stat(os.path.join(run_dir(folder, *run), name)).st_mtime_ns)
              for run in finished for name in files}
    # A stopped run keeps its log rows byte for byte, and the one that was half-way goes on from
    # them. Another run may have been caught before its runner wrote a log or a checkpoint (the
    # rerun starts it afresh) or just after its last row (nothing left to add).
    logs = {run: os.path.join(run_dir(folder, *run), "log.csv") for run in unfinished}
    rows_before = {run: log_rows(log, drop_rate=False) if os.path.exists(log) else None
                   for run, log in logs.items()}
    saved = {run: os.path.exists(os.path.join(run_dir(folder, *run), "checkpoint.npz"))
             for run in unfinished}
    assert all(rows_before.get(run) for run in halfway)
    rerun = sweep_command(argv, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(finished)} finished before" in rerun.stdout
    for (run, name), (content, mtime) in before.items():
        path = os.path.join(run_dir(folder, *run), name)
        assert read(path, "rb") == content and os.stat(path).st_mtime_ns == mtime, path
    for run, rows in rows_before.items():
        verb = "resuming" if saved[run] else "starting"
        assert f"{verb} lr {run[0]} seed {run[1]}" in rerun.stdout
        kept, now = rows or [], log_rows(logs[run], drop_rate=False)
        assert now[:len(kept)] == kept and (len(now) > len(kept) or run not in halfway)
    assert_same_as_local_sweep(folder, local_sweep[0])


def halfway_runs(folder, runs=RUNS, most=3):
    """The runs whose runner says it is running and whose log has 1 to most rows (of 8): at
    least 500 steps done, and (at most=5) 1,500 or more to go, time enough to catch it there."""
    return [run for run in runs if state(folder, *run) == "running"
            and os.path.exists(os.path.join(run_dir(folder, *run), "log.csv"))
            and 1 <= len(log_rows(os.path.join(run_dir(folder, *run), "log.csv"))) <= most]


def assert_same_as_local_sweep(folder, local_folder, runs=RUNS):
    """Every run finished at --steps with the local path's log rows (the rate column aside: a
    resume is bit-exact), and the same summary when the grid is the same."""
    for lr, seed in runs:
        status = json.loads(read(os.path.join(run_dir(folder, lr, seed), "status.json")))
        assert (status["state"], status["step"]) == ("finished", 4000), (lr, seed)
        assert (log_rows(os.path.join(run_dir(folder, lr, seed), "log.csv"))
                == log_rows(os.path.join(run_dir(local_folder, lr, seed), "log.csv"))), (lr, seed)
    if runs == RUNS:
        assert read(os.path.join(folder, "summary.txt")) == \
            read(os.path.join(local_folder, "summary.txt"))


def live_runners(folder):
    """Process ids of runners working in folder that are still alive (Linux /proc). An orphan
    that has exited stays a zombie until its new parent, the init process, collects it: that is
    no process running, and is left out."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = read(f"/proc/{entry}/cmdline", "rb").split(b"\0")
                stat = read(f"/proc/{entry}/stat")
            except OSError:
                continue
            if (stat.rsplit(")", 1)[1].split()[0] != "Z" and folder.encode() in b" ".join(cmdline)
                    and any(os.path.basename(arg).decode() in sweep.RUNNERS.values()
                            for arg in cmdline)):
                found.append(int(entry))
    return found


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the runners")
def test_a_sweep_killed_outright_leaves_no_runner_going(local_sweep, tmp_path):
    """SIGKILL to the sweep (--workers 2) while a run is half-way: nothing of the sweep runs its
    clean-up, yet every runner's pipe ends with it, so each saves and exits within seconds
    instead of training on alone; the half-way run says stopped at its checkpoint's step. The
    rerun resumes the runs (a runner still saving would be waited for) and ends with the local
    path's logs and summary."""
    folder = str(tmp_path / "copy")
    argv = ["copy", folder] + GRID + TINY_COPY + ["--workers", "2", "--threads", "1"]
    with open(tmp_path / "sweep.out", "w") as out:
        process = subprocess.Popen(SWEEP + argv, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: halfway_runs(folder), 300, "no run was half-way")
        halfway = halfway_runs(folder)
        process.kill()
    finally:
        process.wait()
    runners = live_runners(folder)
    wait_until(lambda: not live_runners(folder), 60, f"runners {runners} went on alone")
    for lr, seed in halfway:
        status = json.loads(read(os.path.join(run_dir(folder, lr, seed), "status.json")))
        step = checkpoint_step(os.path.join(run_dir(folder, lr, seed), "checkpoint.npz"))
        assert (status["state"], status["step"]) == ("stopped", step)
        assert "standard input has ended" in read(os.path.join(run_dir(folder, lr, seed),
                                                               "stderr.txt"))
    rerun = sweep_command(argv, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for lr, seed in halfway:
        assert f"resuming lr {lr} seed {seed}" in rerun.stdout
    assert_same_as_local_sweep(folder, local_sweep[0])


@contextlib.contextmanager
def dask_workers(address, count, nanny, logs):
    """count `dask worker` processes for the scheduler at address, 1 thread each, every port on
    127.0.0.1; with nanny, each a nanny process with the worker process under it, which the
    nanny restarts when it dies. -> the worker processes' ids, by address."""
    command = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
               "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
               "--memory-limit", "0", "--nanny" if nanny else "--no-nanny"]
    started = []
    try:
        for k in range(count):
            with open(logs / f"worker-{k}.log", "w") as log:
                started.append(subprocess.Popen(command, cwd=ROOT, stdout=log,
                                                stderr=subprocess.STDOUT))
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(count, timeout=120)
            yield client.run(os.getpid)
    finally:
        for process in started:  # a nanny ends its worker process as it ends
            process.terminate()
        for process in started:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def parent(pid):
    return int(read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[1])


@needs_dask
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the runners")
@pytest.mark.parametrize("nanny", [False, True], ids=["worker", "nanny"])
def test_a_dask_worker_killed_mid_run_loses_nothing(local_sweep, tmp_path, nanny):
    """A scheduler and three `dask worker` processes on 127.0.0.1 run two runs. The worker
    hosting one of them is killed with SIGKILL half-way through the run (with a nanny: the
    worker process under it, which the nanny restarts). The runner's pipe ends with its worker,
    so it saves and exits instead of training on alone; Dask gives the task to another worker,
    whose runner waits for the old one if it is still saving, and resumes from its checkpoint.
    The sweep names the lost worker and the retried run, exits 0 with every run at --steps and
    no runner left, and the killed run's log equals the uninterrupted one's (local_sweep): the
    resume is bit-exact."""
    runs, victim = [("10^-1", 1), ("10^-1", 2)], ("10^-1", 1)
    folder = str(tmp_path / "copy")
    with distributed.LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0") as cluster, \
            dask_workers(cluster.scheduler_address, 3, nanny, tmp_path) as workers:
        with open(tmp_path / "sweep.out", "w") as out:
            process = subprocess.Popen(
                SWEEP + ["copy", folder, "--lr", "10^-1", "--seeds", "1-2"]
                + TINY_COPY + ["--scheduler", cluster.scheduler_address, "--threads", "1"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: halfway_runs(folder, [victim], most=5), 300,
                       "the run was not seen half-way")
            [runner] = live_runners(run_dir(folder, *victim))
            host = parent(runner)  # the worker process (under its nanny, if it has one)
            [lost] = [address for address, pid in workers.items() if pid == host]
            os.kill(host, signal.SIGKILL)
            process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    out = read(tmp_path / "sweep.out")
    assert process.returncode == 0, out
    assert not live_runners(folder)
    assert f"  lost     Dask worker {lost}, which ran lr 10^-1 seed 1\n" in out
    assert "  retrying lr 10^-1 seed 1 on another worker" in out
    assert re.search(r"  done     lr 10\^-1 seed 1: T \d+ at step 4,000 \(retried after a lost "
                     r"worker\)\n", out), out
    assert (f"sweep: lost 1 Dask worker ({lost}); 1 run retried: lr 10^-1 seed 1; 1 of them "
            "finished\n") in out
    # The killed run's runner stopped at the end of its pipe, and the next one resumed there.
    assert "standard input has ended" in read(os.path.join(run_dir(folder, *victim),
                                                           "stderr.txt"))
    resumed = re.findall(r"resuming from .* at step ([\d,]+)",
                         read(os.path.join(run_dir(folder, *victim), "stdout.txt")))
    assert len(resumed) == 1 and 0 < int(resumed[0].replace(",", "")) < 4000, resumed
    assert_same_as_local_sweep(folder, local_sweep[0], runs)


def test_bad_runner_option_is_one_error_and_one_run_started(tmp_path):
    """The first run goes alone until its runner accepts the options: a bad one gives the
    runner's line once, exit 2, and no other run is started."""
    folder = str(tmp_path / "copy")
    done = sweep_command(["copy", folder, "--seeds", "1-3", "--hidden", "many", "--threads", "1"],
                         cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: error: the first run failed")
    assert "run_copy.py: error: argument --hidden" in lines[0]
    started = [os.path.join(lr, seed) for lr in os.listdir(folder) if lr.startswith("lr=")
               for seed in os.listdir(os.path.join(folder, lr))]
    assert started == [os.path.join("lr=10^-2.5", "seed=1")]


def ptb_char_text(lines):
    """Word-level lines as the archive's ptb.char.*.txt: words joined by '_', every character
    followed by a space, one line per sentence."""
    return "".join(ch + " " for ch in "\n".join("_".join(words) for words in lines) + "\n")


def write_corpus(folder):
    import numpy as np
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "<unk>", "N", "dog's", "ran", "$", "1.5"]
    os.makedirs(folder)
    for split, n_lines in (("train", 400), ("valid", 40), ("test", 40)):
        lines = [list(rng.choice(words, size=int(rng.integers(2, 8)))) for _ in range(n_lines)]
        with open(os.path.join(folder, f"{split}.txt"), "w") as f:
            f.write(ptb_char_text(lines))


def test_ptb_sweep_reports_the_best_validation_and_its_test_bpc(tmp_path):
    """A PTB grid on a small synthetic corpus: each run's log equals run_ptb.py's run by hand,
    and the summary (from each runner's status) holds the least validation BPC of its log and
    the BPC of its log's test line. One seed is '1 seed', not '1 seeds'."""
    data = str(tmp_path / "data")
    write_corpus(data)
    tiny = ["--hidden", "8", "--batch", "4", "--rank", "2", "--reset-every", "20", "--steps", "60",
            "--eval-every", "20", "--log-every", "10", "--data-dir", data]
    folder = str(tmp_path / "ptb")
    done = sweep_command(["ptb", folder, "--lr", "10^-1.5,10^-2", "--seeds", "3"] + tiny
                         + ["--threads", "1"], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 runs (2 learning rates x 1 seed) in" in done.stdout
    assert_run_equals_runner_by_hand("run_ptb.py", tiny + ["--lr", "0.01", "--seed", "3"],
                                     os.path.join(run_dir(folder, "10^-2", 3), "log.csv"), tmp_path)
    summary = read(os.path.join(folder, "summary.txt"))
    for lr in ("10^-1.5", "10^-2"):
        log = read(os.path.join(run_dir(folder, lr, 3), "log.csv"))
        valid = min(float(row.split(",")[2]) for row in log_rows(
            os.path.join(run_dir(folder, lr, 3), "log.csv")) if row.split(",")[2])
        test = float(re.search(r"# test BPC ([0-9.]+) ", log).group(1))
        assert table_rows(summary)[lr] == [lr, "1/1", f"{valid:.4f}", f"{valid:.4f} - {valid:.4f}",
                                           f"{test:.4f}", f"{test:.4f} - {test:.4f}"]


# --- The documentation: where sweeps go, what they cost ------------------------------------------


def test_the_sweep_folder_of_the_readme_is_ignored_by_git():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "sweeps/" in f.read().split()


def section(page, heading):
    """The text of a markdown page's section under '## heading', to the next such heading."""
    return page.split(f"## {heading}\n")[1].split("\n## ")[0]


def benchmark_ms(speed):
    """docs/speed.md's benchmark table as {row: {column: ms}}: the rows named in parentheses
    ("copy task", "PTB"), the columns by their heads ("floor H A", "OK", "KF", ...), the cells
    given in ms."""
    head, *rows = [[cell.strip() for cell in line.split("|")[1:-1]]
                   for line in section(speed, "The benchmark").splitlines()
                   if line.startswith("| ") and "---" not in line]
    return {re.search(r"\((.+)\)", row[0]).group(1):
            {column: float(cell[:-3]) for column, cell in zip(head, row) if cell.endswith(" ms")}
            for row in rows if "(" in row[0]}


def test_every_cost_estimate_comes_from_the_speed_table():
    """docs/sweeps.md's costs and docs/speed.md's "How long" figures are the measured OK step
    times (the rows of docs/speed.md's benchmark at the copy task's and PTB's sizes) times the
    paper's steps: hours per run, and days for 20 runs on 1, 4, 10 and 20 machines."""
    speed = read(os.path.join(ROOT, "docs", "speed.md"))
    costs = " ".join(read(os.path.join(ROOT, "docs", "sweeps.md")).split())

    table = benchmark_ms(speed)
    copy_ms, ptb_ms = table["copy task"]["OK"], table["PTB"]["OK"]
    hours = {"copy": copy_ms * 2_000_000 / 3.6e6, "ptb": ptb_ms * 1_000_000 / 3.6e6}
    assert f"{copy_ms:g} ms a step at the copy task's size" in costs
    assert f"{ptb_ms:g} ms at PTB's" in costs
    assert f"copy run then takes {hours['copy']:.1f} hours" in costs
    assert f"PTB run takes {hours['ptb']:.1f} hours, {20 * hours['ptb'] / 24:.1f} days" in costs
    for machines in (1, 4, 10, 20):
        rounds = math.ceil(20 / machines)
        assert (f"| {machines} | {rounds * hours['copy'] / 24:.1f} days | "
                f"{rounds * hours['ptb'] / 24:.1f} days |") in costs
    how_long = " ".join(section(speed, "How long the paper's runs take").split())
    assert (f"at {copy_ms:g} ms a step takes {copy_ms * 1e5 / 6e4:.0f} minutes for 100k steps "
            f"and {hours['copy']:.1f} hours") in how_long
    assert (f"at {ptb_ms:g} ms a step takes {ptb_ms * 2e4 / 6e4:.0f} minutes for 20k steps "
            f"and {hours['ptb']:.1f} hours") in how_long
    assert (f"In short: {20 * hours['copy'] / 24:.0f} days of this 2-core machine for the copy "
            f"task's 20 runs and {20 * hours['ptb'] / 24:.0f} for PTB's, or "
            f"{2 * hours['copy'] / 24:.0f}-{2 * hours['ptb'] / 24:.0f} days on ten such "
            "machines") in costs


def test_the_baselines_costs_and_side_by_side_runs_come_from_the_benchmark():
    """docs/speed.md's per-step ratios of each baseline to OK at the paper's two sizes are its
    table's, and the gain of two runs side by side that it and docs/sweeps.md quote is the one
    its benchmark measured."""
    speed = read(os.path.join(ROOT, "docs", "speed.md"))
    costs = " ".join(read(os.path.join(ROOT, "docs", "sweeps.md")).split())
    table = benchmark_ms(speed)
    sizes = ("copy task", "PTB")
    kf, uoro, tbptt = ([table[size]["OK"] / table[size][column] for size in sizes]
                       for column in ("KF", "UORO", "TBPTT-20"))  # how many times cheaper
    kf_avg = [table[size]["kf-avg"] / table[size]["OK"] for size in sizes]  # times as dear
    how_long = " ".join(section(speed, "How long the paper's runs take").split())
    assert (f"KF-RTRL is {min(kf):.0f}-{max(kf):.0f} times cheaper than OK, UORO "
            f"{min(uoro):.0f}-{max(uoro):.0f} times, kf-avg {min(kf_avg):.1f}-{max(kf_avg):.1f} "
            f"times as dear, TBPTT-20 more than {100 * math.floor(min(tbptt) / 100)} times "
            "cheaper.") in how_long
    after, beside, ratio = re.search(r"2 threads each, against side by side, 1 thread each, "
                                     r"([\d.]+) against ([\d.]+) s \(([\d.]+)\)",
                                     " ".join(speed.split())).groups()
    after, beside = float(after), float(beside)  # seconds to 1 decimal, ratio to 2: as printed
    assert (beside - 0.05) / (after + 0.05) - 0.005 <= float(ratio) <= (beside + 0.05) / (
        after - 0.05) + 0.005
    assert f"and take {ratio} of the time of one after the other" in how_long
    assert (f"Two runs side by side with 1 thread each take {ratio} of the time of the same two "
            f"one after the other with 2 threads") in costs
    assert f"saves {100 - round(100 * float(ratio))}% of a sweep's time" in costs


def test_the_costs_on_a_machine_without_avx512_follow_from_its_measurements():
    """docs/speed.md's second machine: its ratios to the table's times, and the hours they make."""
    speed = read(os.path.join(ROOT, "docs", "speed.md"))
    table = benchmark_ms(speed)
    speed = " ".join(speed.split())
    numbers = [float(x) for x in re.search(
        r"the floor took ([\d.]+) ms at the copy size and ([\d.]+) ms at PTB's \(([\d.]+) and "
        r"([\d.]+) times the table's\), the OK step ([\d.]+) and ([\d.]+) ms \(([\d.]+) and "
        r"([\d.]+) times; OK / floor ([\d.]+) and ([\d.]+)\)\. There 100k copy steps take "
        r"(\d+) minutes, the copy task's 2M ([\d.]+) hours and PTB's 1M (\d+) hours",
        speed).groups()]
    floor_copy, floor_ptb, ok_copy, ok_ptb = numbers[0], numbers[1], numbers[4], numbers[5]
    quoted = numbers[2:4] + numbers[6:]
    assert quoted == [round(floor_copy / table["copy task"]["floor H A"], 1),
                      round(floor_ptb / table["PTB"]["floor H A"], 1),
                      round(ok_copy / table["copy task"]["OK"], 1),
                      round(ok_ptb / table["PTB"]["OK"], 1),
                      round(ok_copy / floor_copy, 2), round(ok_ptb / floor_ptb, 2),
                      round(ok_copy * 1e5 / 6e4), round(ok_copy * 2e6 / 3.6e6, 1),
                      round(ok_ptb * 1e6 / 3.6e6)]
