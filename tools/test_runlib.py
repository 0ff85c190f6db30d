"""Tests of runlib.py, the machinery that both experiment runners share, each checked once.

A full run needs a task, so most of these run run_copy.py on a tiny configuration (the cheapest
task); what they check lives in runlib.py: numbers as people type them, exact resume after
SIGTERM, damaged checkpoints, output files (their mode, a folder that takes no file, saves that
fail, a second run on the same files, one that waits for a run that is stopping), the status
file, the end of standard input (a supervisor that died), the CSV log (its header, a resumed log,
a full disk), a diverging run, and the memory estimate. Every failure must be one line and a
non-zero exit with nothing lost. test_runners.py tests each task and imports the helpers below.
"""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import ok_rtrl as ok
import run_copy
from tools import runfiles, runlib
from test_ok_rtrl import ZERO_PARAMS, make_problem, problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's top
NEEDS_FLOCK = pytest.mark.skipif(runfiles.fcntl is None, reason="no fcntl here: runs go unlocked")
TINY_COPY = ["--hidden", "8", "--batch", "3", "--rank", "2", "--lr", "0.01"]


# --- Helpers (test_runners.py uses them too) -----------------------------------------------------


def checkpoint_contents(path):
    """A checkpoint's config and arrays; the file names and the thread count, which may differ
    between runs of one experiment, are dropped."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    config = json.loads(str(arrays.pop("config")))
    for key in ("checkpoint", "log", "plot", "data_dir", "threads"):
        config.pop(key, None)
    return config, arrays


def assert_same_run(path_a, path_b):
    config_a, arrays_a = checkpoint_contents(path_a)
    config_b, arrays_b = checkpoint_contents(path_b)
    assert config_a == config_b
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:  # exact: a resumed run must be bit-identical, not close
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)


def log_rows(path, drop_last_column=True):
    """The data rows of a CSV log without the timing column (steps/s varies run to run)."""
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if not line.startswith("#")]
    return [line.rsplit(",", 1)[0] if drop_last_column else line for line in lines]


def one_error_line(stderr, prog):
    lines = stderr.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in stderr
    assert lines[-1].startswith(f"{prog}: error: ")
    return lines[-1]


def tiny_copy_checkpoint(tmp_path, name="run.npz", steps="5"):
    path = str(tmp_path / name)
    assert run_copy.main(TINY_COPY + ["--steps", steps, "--checkpoint", path]) == 0
    return path


def count_calls(monkeypatch, module, name):
    """Count the calls of module.name (still calling it); returns the one-element counter."""
    original, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def drop_key(path, key):
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files if name != key}
    np.savez(path, **arrays)


def replace_key(path, key, value):
    with np.load(path, allow_pickle=False) as f:
        arrays = {name: f[name] for name in f.files}
    arrays[key] = value
    np.savez(path, **arrays)


# --- Command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, steps", [("1e1", 10), ("2.5e1", 25), ("1_0", 10), ("1,0", 10)])
def test_steps_as_people_type_them(capsys, text, steps):
    assert run_copy.main(TINY_COPY + ["--steps", text]) == 0
    assert f"  steps            {steps}\n" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["1.5", "1e-1", "ten", "inf"])
def test_steps_that_are_not_whole_numbers_are_refused(capsys, text):
    assert run_copy.main(TINY_COPY + ["--steps", text]) == 2
    assert "--steps" in one_error_line(capsys.readouterr().err, "run_copy.py")


# --- Checkpoints: exact resume after SIGTERM, damaged files --------------------------------------


def test_a_runner_module_that_is_not_a_task_is_refused_naming_what_it_lacks():
    """main checks the runner module against the declared interface, runlib.Task, before it
    reads a single option; both runners are Tasks."""
    import run_ptb
    half = types.ModuleType("run_half")
    vars(half).update({name: getattr(run_copy, name) for name in runlib.Task.__annotations__
                       if name not in ("finish", "plot")})
    with pytest.raises(TypeError, match="^run_half is not a runlib.Task: it lacks finish, plot$"):
        runlib.main(half, ["--steps", "1"])
    assert isinstance(run_copy, runlib.Task) and isinstance(run_ptb, runlib.Task)


def test_restart_before_any_checkpoint_says_so(tmp_path, capsys):
    path = str(tmp_path / "run.npz")
    assert run_copy.main(TINY_COPY + ["--steps", "5", "--checkpoint", path]) == 0
    assert f"no checkpoint at {path} yet: starting from step 0" in capsys.readouterr().out


SIGTERM_AT_STEP = """
import signal, sys
import run_copy
original, calls = run_copy.next_symbols, [0]
def next_symbols(*args):
    calls[0] += 1
    if calls[0] == {call}:
        signal.raise_signal(signal.SIGTERM)
    return original(*args)
run_copy.next_symbols = next_symbols
sys.exit(run_copy.main({argv!r}))
"""


def test_sigterm_saves_like_ctrl_c_and_resumes_identically(tmp_path):
    """SIGTERM (timeout, kill, a batch scheduler) stops after the step and saves, like Ctrl-C:
    the resumed run ends exactly where an uninterrupted one ends. Run in a child process, so a
    SIGTERM that is not handled kills the child, not the test session."""
    argv = TINY_COPY + ["--steps", "300"]
    whole, parts = str(tmp_path / "whole.npz"), str(tmp_path / "parts.npz")
    assert run_copy.main(argv + ["--checkpoint", whole]) == 0
    script = SIGTERM_AT_STEP.format(call=170, argv=argv + ["--checkpoint", parts])
    child = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert child.returncode == 128 + signal.SIGTERM, child.stderr
    assert "SIGTERM" in child.stderr and "Traceback" not in child.stderr
    assert checkpoint_contents(parts)[1]["counters"].item().startswith('{"step": 170,')
    assert run_copy.main(argv + ["--checkpoint", parts]) == 0
    assert_same_run(whole, parts)


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.npz"
    path.write_bytes(b"not a zip file")
    assert run_copy.main(TINY_COPY + ["--steps", "5", "--checkpoint", str(path)]) == 1
    assert "cannot read checkpoint" in one_error_line(capsys.readouterr().err, "run_copy.py")


@pytest.mark.parametrize("damage", ["npy file", "no config", "no counters", "no rng",
                                    "no stream_inputs", "counters not json", "config a list",
                                    "rng not a state", "no params.W"])
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, damage):
    if damage == "npy file":
        path = str(tmp_path / "run.npy")
        np.save(path, np.arange(3))
    else:
        path = tiny_copy_checkpoint(tmp_path)
        if damage.startswith("no "):
            drop_key(path, damage[3:])
        else:
            key = damage.split()[0]
            replace_key(path, key, {"counters": "{step: 5", "config": "[1, 2]",
                                    "rng": '{"bit_generator": "nonsense"}'}[key])
    capsys.readouterr()
    assert run_copy.main(TINY_COPY + ["--steps", "10", "--checkpoint", path]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert path in line and "choose another --checkpoint file" in line


# --- Output files: mode, unwritable places, failed saves, one run per file -----------------------


def test_outputs_follow_the_umask(tmp_path):
    """Checkpoints and logs are written through temporary files (atomic), but get the mode that
    the umask gives any new file, not mkstemp's 0600."""
    previous = os.umask(0o022)
    try:
        path, log = str(tmp_path / "run.npz"), str(tmp_path / "run.csv")
        assert run_copy.main(TINY_COPY + ["--steps", "5", "--checkpoint", path, "--log", log]) == 0
    finally:
        os.umask(previous)
    for name in (path, log):
        assert oct(os.stat(name).st_mode & 0o777) == oct(0o644), name


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc here")
@pytest.mark.parametrize("option", ["--checkpoint", "--log", "--plot"])
def test_unwritable_output_is_refused_before_the_first_step(monkeypatch, capsys, option):
    """An output under /proc (its folder exists, nothing can be created in it) is refused before
    any training, not after the whole run."""
    steps = count_calls(monkeypatch, runlib, "train_step")
    path = "/proc/ok-rtrl-test." + {"--checkpoint": "npz", "--log": "csv", "--plot": "png"}[option]
    assert run_copy.main(TINY_COPY + ["--steps", "50", option, path]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert f"cannot write {option[2:]} {path}" in line and steps[0] == 0


def test_failed_saves_keep_training_and_try_again(tmp_path, monkeypatch, capsys):
    """A checkpoint that cannot be written during the run (a full disk, say) is reported, the
    run goes on from its state in memory, and the next save writes it: the run ends where an
    uninterrupted one ends."""
    argv = TINY_COPY + ["--steps", "150", "--checkpoint-every", "1e-9"]  # a save every step
    whole = str(tmp_path / "whole.npz")
    assert run_copy.main(argv + ["--checkpoint", whole]) == 0
    original, calls = np.savez, [0]

    def disk_full_twice(*args, **kwargs):
        calls[0] += 1
        if calls[0] in (100, 101):
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)
    monkeypatch.setattr(np, "savez", disk_full_twice)
    parts = str(tmp_path / "parts.npz")
    assert run_copy.main(argv + ["--checkpoint", parts]) == 0
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 2 and "Traceback" not in err
    assert "training goes on" in err and "try again at the next save" in err
    assert_same_run(whole, parts)


def test_final_save_that_fails_keeps_the_run_elsewhere(tmp_path, monkeypatch, capsys):
    """If even the last save fails, the run is written to a file in the temporary folder, and
    the error line says where and how to resume from it."""
    argv = TINY_COPY + ["--steps", "40"]
    whole = str(tmp_path / "whole.npz")
    assert run_copy.main(argv + ["--checkpoint", whole]) == 0
    original = runlib.save_atomically
    target = str(tmp_path / "parts.npz")

    def folder_gone(path, arrays):
        if path == target:
            raise runlib.UserError(f"cannot write checkpoint {path} (folder gone)")
        return original(path, arrays)
    monkeypatch.setattr(runlib, "save_atomically", folder_gone)
    monkeypatch.setattr(runlib.tempfile, "tempdir", str(tmp_path / "tmp"))
    os.mkdir(tmp_path / "tmp")
    assert run_copy.main(argv + ["--checkpoint", target]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    rescued = os.listdir(tmp_path / "tmp")
    assert len(rescued) == 1 and str(tmp_path / "tmp" / rescued[0]) in line and target in line
    assert_same_run(whole, str(tmp_path / "tmp" / rescued[0]))


HOLD_MID_RUN = """
import os, sys, time
import run_copy
original, calls = run_copy.next_symbols, [0]
def next_symbols(*args):
    calls[0] += 1
    if calls[0] == {call}:  # mid-run: say so, then wait until the test lets the run go on
        open({holding!r}, "w").close()
        while not os.path.exists({release!r}):
            time.sleep(0.01)
    return original(*args)
run_copy.next_symbols = next_symbols
sys.exit(run_copy.main({argv!r}))
"""


@NEEDS_FLOCK
def test_same_command_twice_the_second_is_refused_and_the_first_goes_on(tmp_path):
    """Two runs on one checkpoint and log would overwrite each other's work. The first run,
    a child process held mid-run, holds them; the same command started again (python
    run_copy.py ...) is refused in one line naming the first's PID and touches nothing; the
    first then ends exactly as a run that nobody disturbed, checkpoint and log."""
    argv = TINY_COPY + ["--steps", "300", "--log-every", "50"]
    whole, log_whole = str(tmp_path / "whole.npz"), str(tmp_path / "whole.csv")
    assert run_copy.main(argv + ["--checkpoint", whole, "--log", log_whole]) == 0
    path, log = str(tmp_path / "run.npz"), str(tmp_path / "run.csv")
    same = argv + ["--checkpoint", path, "--log", log]
    holding, release = str(tmp_path / "holding"), str(tmp_path / "release")
    script = HOLD_MID_RUN.format(call=170, holding=holding, release=release, argv=same)
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=out,
                                 stderr=err, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(holding):  # the first run is at step 170, holding its files
            assert first.poll() is None, (tmp_path / "first.err").read_text()
            assert time.monotonic() < deadline, "the first run did not reach step 170"
            time.sleep(0.01)
        second = subprocess.run([sys.executable, "run_copy.py"] + same, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        with open(os.path.realpath(path) + ".lock") as f:  # the first still holds its checkpoint
            assert f.read() == f"{first.pid} {socket.gethostname()} running\n"
        open(release, "w").close()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == runfiles.BUSY_EXIT
    assert second.stderr.splitlines() == [
        f"run_copy.py: error: --checkpoint {path} is held by process {first.pid}, a run that is "
        f"still going: wait until it ends (kill {first.pid} stops it and saves), or give "
        "--checkpoint another file"]
    assert "Traceback" not in (tmp_path / "first.err").read_text()
    assert_same_run(whole, path)
    assert log_rows(log_whole) == log_rows(log)
    assert not os.path.exists(path + ".lock") and not os.path.exists(log + ".lock")


HOLD_UNTIL_KILLED = """
import time
from tools import runfiles
with runfiles.claim_outputs([("--log", {path!r})]):
    print("held", flush=True)
    time.sleep(600)
"""


@NEEDS_FLOCK
def test_the_hold_dies_with_its_process(tmp_path):
    """A process killed with SIGKILL runs no clean-up, yet holds nothing after: its lock file
    stays behind, unlocked, and the next run takes it over. While the process lives, a claim of
    its file is refused with its PID."""
    path = str(tmp_path / "run.csv")
    lock = os.path.realpath(path) + ".lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_KILLED.format(path=path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(runfiles.Busy, match=f"held by process {holder.pid}, "):
            with runfiles.claim_outputs([("--log", path)]):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL and os.path.exists(lock)
    with runfiles.claim_outputs([("--log", path)]):
        with open(lock) as f:
            assert f.read() == f"{os.getpid()} {socket.gethostname()} running\n"
    assert not os.path.exists(lock)


@NEEDS_FLOCK
def test_a_file_system_without_locks_is_a_warning(tmp_path, monkeypatch, capsys):
    """Where flock fails (ENOLCK on some network mounts) the run goes on unlocked, and says so."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(runfiles.fcntl, "flock", no_locks)
    path = str(tmp_path / "run.npz")
    assert run_copy.main(TINY_COPY + ["--steps", "5", "--checkpoint", path]) == 0
    err = capsys.readouterr().err
    assert "cannot lock" in err and "No locks available" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["run.npz"]


def read_status(path):
    with open(path) as f:
        return json.load(f)


def wait_for_file(path, process, err, seconds=300):
    """Wait until path exists, while process (writing its stderr to err) is still running."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        assert process.poll() is None, err.read_text()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_status_says_how_the_run_ended(tmp_path, monkeypatch):
    """--status is the run's outcome as JSON, for programs such as sweep.py: a finished run's
    step and curriculum T (those of the log's last row) with the command line it ran under; a
    run refused before training (the checkpoint of another configuration) and a diverged one,
    each with its one line."""
    status, path, log = (str(tmp_path / name) for name in ("status.json", "run.npz", "run.csv"))
    argv = TINY_COPY + ["--steps", "200", "--log-every", "100", "--checkpoint", path, "--log",
                        log, "--status", status]
    assert run_copy.main(argv) == 0
    done, last = read_status(status), log_rows(log, drop_last_column=False)[-1].split(",")
    assert (done["state"], done["step"], done["steps"], done["message"]) == (
        "finished", 200, 200, "")
    assert done["result"]["T"] == int(last[1]) and f"{done['result']['avg_bits']:.6f}" == last[2]
    assert done["argv"] == argv and done["pid"] == os.getpid()
    assert run_copy.main(argv[:1] + ["9"] + argv[2:]) == 1  # --hidden 9
    refused = read_status(status)
    assert refused["state"] == "refused" and "--hidden 8 there, 9 here" in refused["message"]

    def diverged(*args, **kwargs):
        raise FloatingPointError("dW is not finite (NaN or inf): the run diverged")
    monkeypatch.setattr(ok, "apply_gradients", diverged)
    assert run_copy.main(TINY_COPY + ["--steps", "10", "--status", status]) == 1
    failed = read_status(status)
    assert failed["state"] == "diverged" and "step 1: dW is not finite" in failed["message"]


@NEEDS_FLOCK
def test_the_end_of_standard_input_stops_and_saves_like_sigterm(tmp_path):
    """--stop-at-eof: when the pipe on the run's standard input ends (the supervisor died,
    however it died), the run tells the runs waiting for its files that it is stopping, stops
    after its step, saves, says so in its status at the checkpoint's step and exits 143;
    resumed, it ends exactly where an uninterrupted run ends, log included."""
    argv = TINY_COPY + ["--steps", "300", "--log-every", "50"]
    whole, log_whole = str(tmp_path / "whole.npz"), str(tmp_path / "whole.csv")
    assert run_copy.main(argv + ["--checkpoint", whole, "--log", log_whole]) == 0
    path, log, status = (str(tmp_path / name) for name in ("run.npz", "run.csv", "status.json"))
    holding, release = tmp_path / "holding", tmp_path / "release"
    script = HOLD_MID_RUN.format(call=170, holding=str(holding), release=str(release),
                                 argv=argv + ["--checkpoint", path, "--log", log, "--status",
                                              status, "--stop-at-eof"])
    with open(tmp_path / "child.err", "w") as err:
        child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=err,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        wait_for_file(holding, child, tmp_path / "child.err")
        child.stdin.close()  # as when the supervisor's process ends
        deadline = time.monotonic() + 300
        while not open(path + ".lock").read().endswith(" stopping\n"):
            assert time.monotonic() < deadline, "the run did not say that it is stopping"
            time.sleep(0.01)
        release.touch()
        assert child.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "standard input has ended" in (tmp_path / "child.err").read_text()
    stopped = read_status(status)
    assert (stopped["state"], stopped["step"]) == ("stopped", 170)
    assert checkpoint_contents(path)[1]["counters"].item().startswith('{"step": 170,')
    assert run_copy.main(argv + ["--checkpoint", path, "--log", log, "--status", status]) == 0
    assert read_status(status)["state"] == "finished"
    assert_same_run(whole, path)
    assert log_rows(log_whole) == log_rows(log)


@NEEDS_FLOCK
def test_a_run_waits_for_the_one_that_is_stopping_then_resumes_it(tmp_path, monkeypatch):
    """A run with --wait-if-held refuses a holder that says it is running once the grace is
    over (exit 75), and waits for one that says it is stopping: the holder, held mid-run, has
    its standard input closed; the same command with --wait-if-held says it waits, and when the
    holder has saved and exited, resumes from its checkpoint and ends exactly where an
    uninterrupted run ends."""
    argv = TINY_COPY + ["--steps", "300", "--log-every", "50"]
    whole, log_whole = str(tmp_path / "whole.npz"), str(tmp_path / "whole.csv")
    assert run_copy.main(argv + ["--checkpoint", whole, "--log", log_whole]) == 0
    path, log = str(tmp_path / "run.npz"), str(tmp_path / "run.csv")
    same = argv + ["--checkpoint", path, "--log", log]
    holding, release = tmp_path / "holding", tmp_path / "release"
    script = HOLD_MID_RUN.format(call=170, holding=str(holding), release=str(release),
                                 argv=same + ["--stop-at-eof"])
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=err,
                                 env=dict(os.environ, PYTHONPATH=ROOT))
    second = None
    try:
        wait_for_file(holding, first, tmp_path / "first.err")
        monkeypatch.setattr(runfiles, "HOLDER_GRACE_SECONDS", 0.5)
        began = time.monotonic()
        with pytest.raises(runfiles.Busy, match=f"held by process {first.pid}, .* \\(waited "):
            with runfiles.claim_outputs([("--checkpoint", path)], wait=60):
                pass
        assert time.monotonic() - began < 30  # the grace, not the whole wait
        first.stdin.close()
        second = subprocess.Popen([sys.executable, "run_copy.py"] + same
                                  + ["--wait-if-held", "120"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said = ""
        while "waiting up to 120 s" not in said:
            line = second.stdout.readline()
            assert line, "the second run ended without waiting: " + said
            said += line
        release.touch()
        assert first.wait(timeout=300) == 128 + signal.SIGTERM
        out, err = second.communicate(timeout=300)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
    assert second.returncode == 0, err
    assert f"held by process {first.pid}, a run that is stopping" in said
    assert "is free: going on" in out
    assert "resuming from" in out and "at step 170" in out
    assert_same_run(whole, path)
    assert log_rows(log_whole) == log_rows(log)


def test_the_files_module_and_its_users_import_neither_numpy_nor_numba():
    """runfiles.py, sweep.py (whose functions run on Dask workers) and plot_results.py (whose
    table is text) work without numpy and Numba."""
    code = ("import sys; from tools import runfiles, sweep, plot_results; "
            "print([name for name in ('numpy', 'numba') if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout == "[]\n", done.stderr


def test_one_file_for_two_outputs_is_refused(tmp_path, capsys):
    path = str(tmp_path / "run.csv")
    argv = TINY_COPY + ["--steps", "5", "--measure-noise", "5", "--log", path, "--noise-log", path]
    assert run_copy.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert line.endswith(f"--noise-log {path} is the file of --log too: give each output its "
                         "own file")
    assert not os.path.exists(path) and os.listdir(tmp_path) == []


# --- The CSV log ---------------------------------------------------------------------------------


def test_log_header_names_no_folder():
    """The '#' line that opens a log: the output files by their base name, the keys naming where
    the data came from left out, every other key as it was and in the config's order."""
    config = {"task": "t", "log": os.path.join("runs", "today", "run.csv"), "steps": 5,
              "checkpoint": os.path.join("runs", "run.npz"), "plot": None, "data_dir": "ptb",
              "noise_log": "noise.csv", "lr": 0.5}
    assert runfiles.log_header("prog.py", config, local=["data_dir"]) == (
        'prog.py config: {"task": "t", "log": "run.csv", "steps": 5, "checkpoint": "run.npz", '
        '"plot": null, "noise_log": "noise.csv", "lr": 0.5}')


def test_resume_drops_log_rows_written_after_the_last_save(tmp_path):
    """A run killed between saves has log rows past its checkpoint; they will be written again."""
    path = str(tmp_path / "log.csv")
    with open(path, "w") as f:
        f.write("# config\nstep,T,avg_bits,steps_per_s\n50,1,0.9,9\n100,1,0.8,9\n150,2,0.3,9\n")
    runfiles.open_log(path, "config", ("step", "T", "avg_bits", "steps_per_s"), 100).close()
    with open(path) as f:
        assert f.read() == "# config\nstep,T,avg_bits,steps_per_s\n50,1,0.9,9\n100,1,0.8,9\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_log_that_cannot_be_written_during_the_run_costs_no_training(tmp_path, monkeypatch,
                                                                     capsys):
    """A log row that cannot be written (a full disk: /dev/full) is reported; training and the
    checkpoint go on as if nothing happened."""
    argv = TINY_COPY + ["--steps", "300", "--log-every", "50"]
    whole, parts = str(tmp_path / "whole.npz"), str(tmp_path / "parts.npz")
    assert run_copy.main(argv + ["--checkpoint", whole]) == 0
    original = runfiles.open_log

    def disk_full_log(*args, **kwargs):
        original(*args, **kwargs).close()
        return open("/dev/full", "a", buffering=1)  # every write: ENOSPC
    monkeypatch.setattr(runfiles, "open_log", disk_full_log)
    assert run_copy.main(argv + ["--checkpoint", parts, "--log", str(tmp_path / "log.csv")]) == 0
    err = capsys.readouterr().err
    assert "cannot write log" in err and "training goes on" in err and "Traceback" not in err
    assert_same_run(whole, parts)


# --- A diverging run -----------------------------------------------------------------------------


def test_diverging_run_stops_with_one_line(monkeypatch, capsys):
    def diverged(*args, **kwargs):
        raise FloatingPointError("dW is not finite (NaN or inf): the run diverged; lower the "
                                 "learning rate or train in float64")
    monkeypatch.setattr(ok, "apply_gradients", diverged)
    assert run_copy.main(TINY_COPY + ["--steps", "10"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "step 1" in line and "lower the learning rate" in line


def test_learner_state_that_overflows_stops_with_one_line(monkeypatch, capsys):
    """A learner state that is no longer finite makes OK's SVD fail: the diverged line too."""
    def overflowed(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")
    monkeypatch.setattr(np.linalg, "svd", overflowed)  # OK's step 3
    assert run_copy.main(TINY_COPY + ["--steps", "10"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "step 1" in line and "SVD did not converge" in line and "diverged" in line


@pytest.mark.parametrize("method, lr", [("ok", "1e37"), ("ok", "1e39"), ("rtrl", "1e39"),
                                        ("tbptt", "1e39")])
def test_absurd_learning_rate_is_the_diverged_line(capsys, method, lr):
    """float32: 1e39 overflows the weights to inf at the first update; that must be the same
    clear line as 1e37 gives, never a LinAlgError from the SVD."""
    argv = ["--hidden", "8", "--batch", "3", "--method", method, "--steps", "30", "--lr", lr]
    argv += ["--trunc", "5"] if method == "tbptt" else []
    assert run_copy.main(argv) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "diverged" in line and "lower the learning rate" in line


# --- Memory --------------------------------------------------------------------------------------


def test_learner_too_big_for_memory_is_refused_before_allocating(monkeypatch, capsys):
    """The learner's memory is estimated first: a run that cannot fit is refused with the figure
    and the largest --hidden that fits; rtrl is not told about --rank, which it does not have."""
    monkeypatch.setattr(runlib, "available_memory", lambda: 2**30)  # 1 GiB

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated a learner that cannot fit")
    monkeypatch.setattr(ok, "Learner", no_allocation)
    assert run_copy.main(["--method", "rtrl", "--hidden", "256", "--steps", "5"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "GiB" in line and "--hidden" in line and "fits" in line and "--rank" not in line
    assert run_copy.main(["--method", "ok", "--rank", "64", "--hidden", "512", "--steps", "5"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "GiB" in line and "--rank" in line


@pytest.mark.parametrize("method, rank", [("rtrl", 1), ("ok", 4), ("kf", 1), ("kf-avg", 3),
                                          ("uoro", 1)])
def test_memory_estimate_covers_the_measured_peak(method, rank):
    """learner_memory is an upper bound of what a learner holds at the peak of a training step
    (its state, OK's two slots of r+1 terms, and every temporary of the step and of Adam),
    measured with tracemalloc, which numpy reports to, from before the learner is made."""
    import tracemalloc
    B, n, V = 3, 12, 5
    params = ok.init_params(V, n, V, np.random.default_rng(0), np.float32)
    x = np.zeros(B, np.int64)

    def train(steps):
        learner, adam = ok.Learner(params, B, method, rank, rng=0), ok.adam_init(params)
        for _ in range(steps):  # two steps: both of OK's slots in use
            _, dW, dW_out = learner.step(params, x, x)
            ok.apply_gradients(params, adam, dW, dW_out, 1e-3, B)

    train(1)  # compile first
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        train(2)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert runlib.learner_memory(method, rank, B, n, V, np.float32) >= peak


# --- gradient_agreement: the measure behind --measure-noise -----------------------------------


@given(problems(max_n=3, max_V=2, max_T=5), st.integers(0, 2**32 - 1))
@example(ZERO_PARAMS, 0)
def test_gradient_agreement_is_perfect_for_exact_learners(problem, seed):
    """Exact RTRL and full-rank OK (exact, test_ok_rtrl.py) have cosine 1 and relative error 0
    with exact RTRL at every step, resets included; KF-RTRL's per-step cosine equals the one
    computed here from its own run with the same signs (ok_rtrl.py §2-5)."""
    p, xs, ys, _ = problem
    (T, B), (m, two_n) = xs.shape, p.W.shape
    n = two_n // 2
    resets = np.random.default_rng(seed).random((T, B)) < 0.3
    learners = [("rtrl", 1), ("ok", min(m, 2 * n * n)), ("kf", 1)]
    cosine, rel_error = runlib.gradient_agreement(p, xs, ys, learners,
                                                  np.random.default_rng(seed), resets=resets)
    assert cosine.shape == rel_error.shape == (T, 3)
    # Exact learners differ from exact RTRL by rounding only: 1e-9 leaves ~1e6 eps64 of room.
    np.testing.assert_allclose(cosine[:, :2], 1.0, rtol=0, atol=1e-9)
    np.testing.assert_allclose(rel_error[:, :2], 0.0, rtol=0, atol=1e-18)
    # KF again, by hand: the same draws (rtrl draws none, OK draws before KF at every step).
    rng = np.random.default_rng(seed)
    exact, kf = ok.Learner(p, B, "rtrl"), ok.Learner(p, B, "kf")
    for t in range(T):
        ok.random_signs(rng, (B, min(m, 2 * n * n) + 1))  # full-rank OK's signs
        g_kf = kf.step(p, xs[t], ys[t], resets[t], signs=ok.random_signs(rng, (B, 1, 2)))[1]
        g = exact.step(p, xs[t], ys[t], resets[t])[1]
        norms = np.linalg.norm(g_kf) * np.linalg.norm(g)
        want = 1.0 if norms == 0 and not g.any() and not g_kf.any() else (
            0.0 if norms == 0 else float((g_kf * g).sum() / norms))
        # Same inputs, same float64 sums in a different order: rounding only.
        assert abs(cosine[t, 2] - want) <= 1e-9, f"step {t}: {cosine[t, 2]} != {want}"


def test_gradient_agreement_refuses_non_finite_input():
    """NaN in the weights or in h0 is refused, naming it, before any learner runs."""
    p, xs, ys, _ = make_problem(n=3, V=2, O=3, T=3, B=2, scale=0.3, seed=0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="params.W_out"):
        runlib.gradient_agreement(p._replace(W_out=p.W_out * np.nan), xs, ys, [("ok", 1)], rng)
    with pytest.raises(ValueError, match="h0 must be a finite"):
        runlib.gradient_agreement(p, xs, ys, [("kf", 1)], rng, h0=np.full((2, 3), np.nan))


# --- Adam as the paper's code ran it (--adam tensorflow) ----------------------------------------


def tensorflow_adam(params, gradients, lr, B, eps=1e-8, beta1=0.9, beta2=0.999):
    """Adam as the paper's code ran it, written out from TensorFlow's AdamOptimizer: W's
    gradient divided by B and clipped to norm 1, W_out's as it is; lr_t = lr sqrt(1 - beta2^t)
    / (1 - beta1^t) and the step lr_t m / (sqrt(v) + eps)."""
    params, m, v = list(params), [0.0, 0.0], [0.0, 0.0]
    for t, (dW, dW_out) in enumerate(gradients, start=1):
        g_W = dW / B
        g_W = g_W / max(1.0, np.linalg.norm(g_W))
        lr_t = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        for i, g in enumerate((g_W, dW_out)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            params[i] = params[i] - lr_t * m[i] / (np.sqrt(v[i]) + eps)
    return params


def test_adam_tensorflow_is_the_papers_adam():
    """ok.apply_gradients with runlib.adam_eps's "tensorflow" eps (and the runners' clipping to
    norm B) takes the steps of TensorFlow's Adam on the paper's gradient scale, in float64 to
    1e-12; "kingma-ba" does not, on gradients small enough for eps to matter."""
    rng, B, lr = np.random.default_rng(0), 32, 1e-3
    params = ok.init_params(3, 4, 3, rng, np.float64)
    sizes = [1e-9, 1e-7, 1e-5, 100.0, 1e-8, 3.0]  # W's gradient norm B * 100 is clipped
    gradients = [(s * rng.standard_normal(params.W.shape),
                  s * rng.standard_normal(params.W_out.shape)) for s in sizes]
    want = tensorflow_adam(params, gradients, lr, B)
    for flavour in ("tensorflow", "kingma-ba"):
        p, adam = params, ok.adam_init(params)
        for dW, dW_out in gradients:
            eps = runlib.adam_eps({"adam": flavour, "batch": B}, adam.t + 1)
            p, adam, _ = ok.apply_gradients(p, adam, dW, dW_out, lr, max_norm=B, eps=eps)
        errors = [np.linalg.norm(got - w) / np.linalg.norm(w) for got, w in zip(p, want)]
        if flavour == "tensorflow":
            assert max(errors) < 1e-12, errors
        else:
            assert min(errors) > 1e-6, errors
