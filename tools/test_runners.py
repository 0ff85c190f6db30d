"""Tests of the two experiment runners, run_copy.py and run_ptb.py, each as its task, on tiny
configurations.

They check what a user relies on: the data are those of the paper's experiments (arXiv
1902.03993, built as its released code builds them), the curriculum learns, a run interrupted by
Ctrl-C and resumed ends bit for bit where an uninterrupted run ends, bad options and bad data
give one line and a non-zero exit, and the PTB download keeps nothing it has not verified. PTB
tests write a small synthetic corpus in the real files' format; one test reads the real files
where run_ptb.py finds them without a download ($OK_RTRL_DATA, else its cache) when they are
there. Nothing here touches the network or the user's home. The machinery both runners share
(runlib.py) is tested once, in test_runlib.py.
"""
import hashlib
import json
import os
import signal
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

import ok_rtrl as ok
import run_copy
import run_ptb
from tools import runfiles, runlib
from tools.test_runlib import (TINY_COPY, assert_same_run, checkpoint_contents, log_rows,
                         one_error_line)

TINY_PTB = ["--hidden", "8", "--batch", "4", "--rank", "2", "--lr", "0.01", "--reset-every", "20"]


# --- Helpers -------------------------------------------------------------------------------------


def drop_config_key(path, key):
    """Make checkpoint path look written before key joined the experiment: its config without it."""
    with np.load(path) as f:
        arrays = {name: f[name] for name in f.files}
    config = json.loads(str(arrays["config"]))
    del config[key]
    arrays["config"] = json.dumps(config)
    np.savez(path, **arrays)


def ptb_char_text(lines):
    """A char-level file from word-level lines, as the archive's ptb.char.*.txt are made: words
    joined by '_', one line per sentence, and every character followed by one space."""
    body = "\n".join("_".join(words) for words in lines) + "\n"
    return "".join(ch + " " for ch in body)


def synthetic_lines(rng, n_lines):
    words = ["the", "cat", "sat", "on", "a", "mat", "<unk>", "N", "dog's", "ran", "$", "1.5"]
    return [list(rng.choice(words, size=int(rng.integers(2, 8)))) for _ in range(n_lines)]


def write_corpus(folder, scheme="{}.txt", seed=0, sizes=(("train", 400), ("valid", 40),
                                                          ("test", 40))):
    """Write a synthetic corpus in the real files' format; return {split: word-level lines}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    corpus = {}
    for split, n_lines in sizes:
        corpus[split] = synthetic_lines(rng, n_lines)
        with open(os.path.join(folder, scheme.format(split)), "w") as f:
            f.write(ptb_char_text(corpus[split]))
    return corpus


def ctrl_c_at_call(monkeypatch, module, name, call):
    """Make module.name send SIGINT to this process on its call-th call, as Ctrl-C would."""
    original, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


# --- Copy task -----------------------------------------------------------------------------------


def test_copy_sequence_is_the_worked_example():
    """The docstring's example, T = 3, bits 1 0 1: input 2 1 0 1 3 3 3 3, target 3 3 3 3 2 1 0 1."""
    inputs, targets = run_copy.copy_sequence(np.array([1, 0, 1]))
    assert inputs.tolist() == [2, 1, 0, 1, 3, 3, 3, 3]
    assert targets.tolist() == [3, 3, 3, 3, 2, 1, 0, 1]


def test_curriculum_checks_at_sequence_starts_in_stream_order():
    """The paper's code: a stream starting a sequence with avg < 0.15 raises T_ by one, avg to 0.3,
    so the next stream's check in the same step does not raise it again; lengths are
    max(1, T_ - U{0..4})."""
    rng = np.random.default_rng(1)
    streams = run_copy.new_streams(3, T=7, avg=0.1)
    x, y, reset = run_copy.next_symbols(streams, rng)
    assert streams.T == 8 and streams.avg == 0.3
    assert reset.all() and x.tolist() == [2, 2, 2] and y.tolist() == [3, 3, 3]
    lengths = [(len(s) - 2) // 2 for s in streams.inputs]
    assert all(4 <= T <= 8 for T in lengths)
    x, y, reset = run_copy.next_symbols(streams, rng)  # mid-sequence: no reset, no check
    assert not reset.any() and streams.T == 8


def test_copy_curriculum_rises_above_one(tmp_path, capsys):
    """A tiny network learns T = 1 and moves on. The moving average needs >= 1,897 steps to fall
    from 1.0 below 0.15 even at zero loss (0.999^k < 0.15), so the run has 3,000 steps."""
    log = str(tmp_path / "copy.csv")
    argv = ["--hidden", "16", "--batch", "4", "--rank", "2", "--lr", "0.01", "--steps", "3000",
            "--log", log, "--log-every", "500"]
    assert run_copy.main(argv) == 0
    out = capsys.readouterr().out
    assert "  method           ok" in out  # the resolved config is printed first
    with open(log) as f:
        header = f.readline()
    assert header.startswith("# run_copy.py config: ")
    config = json.loads(header.split("config: ", 1)[1])
    assert config["rank"] == 2 and config["log"] == "copy.csv"  # no folder of this machine
    assert str(tmp_path) not in header
    rows = log_rows(log, drop_last_column=False)
    assert rows[0] == "step,T,avg_bits,steps_per_s" and len(rows) == 1 + 6
    assert int(rows[-1].split(",")[1]) >= 2


@pytest.mark.parametrize("method", ["ok", "tbptt"])
def test_copy_resume_after_ctrl_c_is_identical(tmp_path, monkeypatch, capsys, method):
    """Ctrl-C at step 170 saves; resuming ends exactly where an uninterrupted run ends: weights,
    Adam, learner state, h, streams, curriculum, rng and log. TBPTT (window 7) stops mid-window.
    The three runs use 1, 3 and the default number of threads: the results do not depend on it."""
    extra = ["--trunc", "7", "--method", "tbptt"] if method == "tbptt" else ["--rank", "2"]
    argv = ["--hidden", "8", "--batch", "3", "--lr", "0.01", "--steps", "400",
            "--log-every", "50"] + extra
    whole, parts = str(tmp_path / "whole.npz"), str(tmp_path / "parts.npz")
    log_whole, log_parts = str(tmp_path / "whole.csv"), str(tmp_path / "parts.csv")
    assert run_copy.main(argv + ["--checkpoint", whole, "--log", log_whole,
                                 "--threads", "1"]) == 0
    with monkeypatch.context() as patch:
        ctrl_c_at_call(patch, run_copy, "next_symbols", 170)
        assert run_copy.main(argv + ["--checkpoint", parts, "--log", log_parts,
                                     "--threads", "3"]) == 130
    assert "Ctrl-C" in capsys.readouterr().err
    assert checkpoint_contents(parts)[1]["counters"].item().startswith('{"step": 170,')
    assert run_copy.main(argv + ["--checkpoint", parts, "--log", log_parts]) == 0
    assert_same_run(whole, parts)
    assert log_rows(log_whole) == log_rows(log_parts)


def test_copy_extending_a_finished_run_is_identical(tmp_path):
    """--steps 200 then --steps 300 on the same checkpoint equals one run of 300 steps."""
    whole, parts = str(tmp_path / "whole.npz"), str(tmp_path / "parts.npz")
    assert run_copy.main(TINY_COPY + ["--steps", "300", "--checkpoint", whole]) == 0
    assert run_copy.main(TINY_COPY + ["--steps", "200", "--checkpoint", parts]) == 0
    assert run_copy.main(TINY_COPY + ["--steps", "300", "--checkpoint", parts]) == 0
    assert_same_run(whole, parts)


@pytest.mark.parametrize("method", ["ok", "tbptt"])
def test_spec_trains_as_the_engine_does(tmp_path, method):
    """--spec trains with ok_rtrl.py's plain-numpy Part I: in float64, 300 steps of the copy task
    reach the weights of the engine's run to rounding (each step's results agree to ~1e-15, and
    the weights' gradient descent does not amplify that over 300 steps beyond 1e-9), and the
    config records it, so that a run is never resumed with the other."""
    argv = ["--hidden", "8", "--batch", "3", "--lr", "0.01", "--steps", "300", "--dtype",
            "float64", "--method", method] + (["--trunc", "5"] if method == "tbptt" else
                                              ["--rank", "2"])
    engine, spec = str(tmp_path / "engine.npz"), str(tmp_path / "spec.npz")
    assert run_copy.main(argv + ["--checkpoint", engine]) == 0
    assert run_copy.main(argv + ["--checkpoint", spec, "--spec"]) == 0
    (config_engine, arrays_engine), (config_spec, arrays_spec) = map(checkpoint_contents,
                                                                      (engine, spec))
    assert config_spec.pop("spec") is True and "spec" not in config_engine
    for name in ("params.W", "params.W_out"):
        np.testing.assert_allclose(arrays_spec[name], arrays_engine[name], rtol=0, atol=1e-9,
                                   err_msg=name)


def test_measure_noise_leaves_training_unchanged_and_logs_every_learner(tmp_path):
    """--measure-noise draws from its own Generator, so the run trains exactly as without it; each
    measurement logs one row per learner, and OK of rank 16 >= the Kronecker rank of G (m = 13
    here) is exact RTRL: cosine 1 (ok_rtrl.py, sections 3-4)."""
    argv = TINY_COPY + ["--steps", "300", "--dtype", "float64"]
    plain, measured = str(tmp_path / "plain.npz"), str(tmp_path / "measured.npz")
    noise = str(tmp_path / "noise.csv")
    assert run_copy.main(argv + ["--checkpoint", plain]) == 0
    assert run_copy.main(argv + ["--checkpoint", measured, "--measure-noise", "100",
                                 "--noise-steps", "20", "--noise-log", noise]) == 0
    arrays_plain, arrays_measured = checkpoint_contents(plain)[1], checkpoint_contents(measured)[1]
    assert arrays_plain.keys() == arrays_measured.keys()
    for name in arrays_plain.keys() - {"noise"}:
        np.testing.assert_array_equal(arrays_plain[name], arrays_measured[name], err_msg=name)
    rows = [row.split(",") for row in log_rows(noise, drop_last_column=False)]
    assert rows[0] == ["step", "T", "method", "rank", "median_cosine", "median_rel_error"]
    learners = [(method, int(rank)) for _, _, method, rank, _, _ in rows[1:]]
    assert learners == list(runlib.NOISE_LEARNERS) * 3  # at steps 100, 200, 300
    cosines = {(int(step), method, int(rank)): float(c) for step, _, method, rank, c, _ in rows[1:]}
    assert all(-1 <= c <= 1 for c in cosines.values())
    for step in (100, 200, 300):
        assert cosines[step, "ok", 16] == 1.0  # exact up to rounding, printed to 6 decimals
    assert len(arrays_measured["noise"]) == 3 * len(runlib.NOISE_LEARNERS)


@pytest.mark.parametrize("argv, says", [
    (["--rank", "0"], "--rank"),
    (["--steps", "-1"], "--steps"),
    (["--method", "bogus"], "--method"),
    (["--lr", "nan"], "--lr"),
    (["--hidden", "many"], "--hidden"),
    (["--method", "kf", "--rank", "3"], "kf-avg"),
    (["--trunc", "5"], "--trunc"),
    (["--method", "uoro", "--rank", "2"], "--rank"),
    (["--checkpoint", "/no/such/folder/run.npz"], "does not exist"),
])
def test_copy_bad_options_give_usage_and_exit_2(capsys, argv, says):
    assert run_copy.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: run_copy.py") and "Traceback" not in err
    assert says in one_error_line(err, "run_copy.py")


def test_copy_refuses_checkpoint_of_another_config(tmp_path, capsys):
    path = str(tmp_path / "run.npz")
    assert run_copy.main(TINY_COPY + ["--steps", "5", "--checkpoint", path]) == 0
    capsys.readouterr()
    argv = ["--hidden", "9", "--batch", "3", "--rank", "2", "--lr", "0.01"]
    assert run_copy.main(argv + ["--steps", "10", "--checkpoint", path]) == 1
    line = one_error_line(capsys.readouterr().err, "run_copy.py")
    assert "--hidden 8 there, 9 here" in line
    write_corpus(str(tmp_path / "data"))
    data = ["--data-dir", str(tmp_path / "data")]
    assert run_ptb.main(TINY_PTB + data + ["--checkpoint", path]) == 1
    assert "from another task ('copy', not 'ptb')" in one_error_line(capsys.readouterr().err,
                                                                     "run_ptb.py")


@pytest.mark.parametrize("runner", ["copy", "ptb"])
def test_plot_without_matplotlib_is_a_note_not_a_crash(tmp_path, monkeypatch, capsys, runner):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    plot = str(tmp_path / "curve.png")
    if runner == "copy":
        code = run_copy.main(TINY_COPY + ["--steps", "20", "--log-every", "10", "--plot", plot])
    else:
        write_corpus(str(tmp_path / "data"))
        code = run_ptb.main(TINY_PTB + ["--steps", "20", "--eval-every", "10", "--plot", plot,
                                        "--data-dir", str(tmp_path / "data")])
    assert code == 0 and not os.path.exists(plot)
    assert "pip install matplotlib" in capsys.readouterr().out


# --- Character-level PTB -------------------------------------------------------------------------


def test_symbols_are_whitespace_separated_with_one_eos_per_line(tmp_path):
    """Each line's characters (words joined by '_') and then one EOS; vocabulary from train."""
    corpus = write_corpus(str(tmp_path))
    ids, vocab, sha = run_ptb.load_ptb(run_ptb.split_files(str(tmp_path)))
    for split, lines in corpus.items():
        expected = [ch for words in lines for ch in list("_".join(words)) + [run_ptb.EOS]]
        assert [vocab[i] for i in ids[split]] == expected
    train_symbols = {ch for words in corpus["train"] for ch in "_".join(words)}
    assert vocab == sorted(train_symbols | {run_ptb.EOS})
    with open(tmp_path / "valid.txt", "rb") as f:
        assert sha["valid"] == hashlib.sha256(f.read()).hexdigest()


def real_ptb_files():
    """The real files where run_ptb.py looks without downloading: $OK_RTRL_DATA, else its cache
    (--data-dir is the runner's; a test is given its folder through $OK_RTRL_DATA)."""
    return run_ptb.split_files(os.environ.get("OK_RTRL_DATA") or run_ptb.cache_folder())


@pytest.mark.skipif(real_ptb_files() is None, reason="no PTB char files in $OK_RTRL_DATA or the "
                    "cache (OK_RTRL_DATA=DIR python -m pytest ... runs this test)")
def test_real_ptb_files_have_the_published_counts_and_sha256():
    """Mikolov's split: 50 symbols; 5,017,482 / 393,042 / 442,423 tokens; the published sha256."""
    ids, vocab, sha = run_ptb.load_ptb(real_ptb_files())
    assert {split: len(ids[split]) for split in run_ptb.SPLITS} == {
        "train": 5_017_482, "valid": 393_042, "test": 442_423}
    assert len(vocab) == 50
    assert sha == run_ptb.PTB_SHA256


def test_chunked_validation_equals_one_stream(tmp_path):
    """bits_per_character runs the text as many chunks with a warm-up overlap; it counts every
    symbol once. At the paper's initialisation the state forgets within the warm-up (the carry
    gate is ~1/2 per step), so it matches one stream run over the whole text to rounding
    (float64, ~600 summed losses: rtol 1e-9 is far above their rounding, far below any error)."""
    write_corpus(str(tmp_path))
    ids, vocab, _ = run_ptb.load_ptb(run_ptb.split_files(str(tmp_path)))
    params = ok.init_params(len(vocab), 8, len(vocab), np.random.default_rng(0), np.float64)
    eos = vocab.index(run_ptb.EOS)
    one_stream = run_ptb.bits_per_character(params, ids["valid"], eos, warmup=60, rows=1)
    losses, _ = ok.evaluate(params, np.concatenate([[eos], ids["valid"][:-1]])[:, None],
                            ids["valid"][:, None])
    np.testing.assert_allclose(one_stream, ok.bits(losses.mean()), rtol=1e-12)
    for rows in (2, 5, 16):
        chunked = run_ptb.bits_per_character(params, ids["valid"], eos, warmup=60, rows=rows)
        np.testing.assert_allclose(chunked, one_stream, rtol=1e-9)


def test_ptb_trains_validates_and_reports_test_bpc(tmp_path, capsys):
    data = str(tmp_path / "data")
    write_corpus(data, scheme="ptb.char.{}.txt")  # the archive's naming scheme
    log = str(tmp_path / "ptb.csv")
    argv = ["--hidden", "16", "--batch", "4", "--rank", "2", "--lr", "0.01", "--steps", "600",
            "--eval-every", "200", "--log-every", "100", "--data-dir", data, "--log", log]
    assert run_ptb.main(argv) == 0
    out = capsys.readouterr().out
    assert "not the published PTB files" in out and "test BPC" in out
    rows = [row.split(",") for row in log_rows(log, drop_last_column=False)[1:]]
    assert [int(r[0]) for r in rows] == [100, 200, 300, 400, 500, 600]
    valid = [float(r[2]) for r in rows if r[2]]
    assert len(valid) == 3 and valid[-1] < valid[0] < np.log2(24)  # 24 symbols: log2 24 = guessing
    with open(log) as f:
        lines = f.read().splitlines()
    assert lines[-1].startswith("# test BPC")
    config = json.loads(lines[0].split("config: ", 1)[1])  # the data known by sha256, not folder
    assert "data_dir" not in config and len(config["data_sha256"]) == 3
    assert config["log"] == "ptb.csv" and str(tmp_path) not in lines[0]


@pytest.mark.parametrize("method", ["ok", "tbptt"])
def test_ptb_resume_after_ctrl_c_is_identical(tmp_path, monkeypatch, capsys, method):
    """Ctrl-C at step 130 saves; resuming ends exactly where an uninterrupted run ends, best
    weights and validation curve included. TBPTT (window 30) is stopped mid-window. The run
    resumes after its checkpoint, log and data have moved to other folders: nothing in it
    depends on where its files were."""
    write_corpus(str(tmp_path / "data"))
    extra = ["--method", "tbptt", "--trunc", "30"] if method == "tbptt" else []
    argv = ["--hidden", "8", "--batch", "4", "--lr", "0.01", "--steps", "300", "--eval-every",
            "100", "--log-every", "50"] + extra
    whole, parts = str(tmp_path / "whole.npz"), str(tmp_path / "parts.npz")
    log_whole, log_parts = str(tmp_path / "whole.csv"), str(tmp_path / "parts.csv")
    data = ["--data-dir", str(tmp_path / "data")]
    assert run_ptb.main(argv + data + ["--checkpoint", whole, "--log", log_whole]) == 0
    with monkeypatch.context() as patch:
        ctrl_c_at_call(patch, run_ptb, "stream_positions", 130)
        assert run_ptb.main(argv + data + ["--checkpoint", parts, "--log", log_parts]) == 130
    os.mkdir(tmp_path / "moved")
    for name in ("parts.npz", "parts.csv", "data"):
        os.rename(tmp_path / name, tmp_path / "moved" / name)
    parts, log_parts = str(tmp_path / "moved" / "parts.npz"), str(tmp_path / "moved" / "parts.csv")
    data = ["--data-dir", str(tmp_path / "moved" / "data")]
    assert run_ptb.main(argv + data + ["--checkpoint", parts, "--log", log_parts]) == 0
    assert_same_run(whole, parts)
    assert log_rows(log_whole) == log_rows(log_parts)


def test_ptb_refuses_checkpoint_of_other_data(tmp_path, capsys):
    write_corpus(str(tmp_path / "a"), seed=0)
    write_corpus(str(tmp_path / "b"), seed=1)
    path = str(tmp_path / "run.npz")
    assert run_ptb.main(TINY_PTB + ["--steps", "5", "--data-dir", str(tmp_path / "a"),
                                    "--checkpoint", path]) == 0
    capsys.readouterr()
    assert run_ptb.main(TINY_PTB + ["--steps", "5", "--data-dir", str(tmp_path / "b"),
                                    "--checkpoint", path]) == 1
    assert "other data files" in one_error_line(capsys.readouterr().err, "run_ptb.py")


def test_ptb_streams_reset_at_their_own_positions():
    """As in the paper's code, each stream is reset where its position in the training text is a
    multiple of --reset-every: once every 100 of its characters, and the 32 streams of the
    paper's run (evenly spaced over the real text's 5,017,482 symbols) at different steps."""
    N, B, every = 5_017_482, 32, 100
    resets = np.array([run_ptb.stream_resets(run_ptb.stream_positions(step, B, N), every)
                       for step in range(5 * every)])  # (steps, B)
    for b in range(B):
        steps = np.flatnonzero(resets[:, b])
        assert len(steps) == 5 and set(np.diff(steps)) == {every}
        assert run_ptb.stream_positions(steps[0], B, N)[b] % every == 0
    assert resets.sum(axis=1).max() <= 2  # never all at once: at most 2 streams share a step


def test_ptb_refuses_checkpoint_from_before_per_stream_resets(tmp_path, capsys):
    """A checkpoint written before resets went by stream position (all streams reset together,
    its config has no "resets") would resume into another protocol: refused in one line."""
    write_corpus(str(tmp_path / "data"))
    path = str(tmp_path / "run.npz")
    argv = TINY_PTB + ["--data-dir", str(tmp_path / "data"), "--checkpoint", path]
    assert run_ptb.main(argv + ["--steps", "5"]) == 0
    drop_config_key(path, "resets")
    capsys.readouterr()
    assert run_ptb.main(argv + ["--steps", "10"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_ptb.py")
    assert "older version" in line and "resets" in line and "another --checkpoint" in line



def test_copy_adam_is_part_of_the_experiment(tmp_path, capsys):
    """--adam tensorflow trains differently from the default, a checkpoint resumes only under its
    own --adam, and one written before --adam existed (no "adam" in its config) resumes as
    kingma-ba, ending where an uninterrupted run ends."""
    paths = {name: str(tmp_path / f"{name}.npz") for name in ("tf", "kb", "old", "whole")}
    assert run_copy.main(TINY_COPY + ["--steps", "30", "--checkpoint", paths["tf"],
                                      "--adam", "tensorflow"]) == 0
    assert run_copy.main(TINY_COPY + ["--steps", "30", "--checkpoint", paths["kb"]]) == 0
    W_tf, W_kb = (checkpoint_contents(paths[k])[1]["params.W"] for k in ("tf", "kb"))
    assert not np.array_equal(W_tf, W_kb)
    capsys.readouterr()
    assert run_copy.main(TINY_COPY + ["--steps", "40", "--checkpoint", paths["tf"]]) == 1
    assert "--adam tensorflow there, kingma-ba here" in one_error_line(
        capsys.readouterr().err, "run_copy.py")
    assert run_copy.main(TINY_COPY + ["--steps", "20", "--checkpoint", paths["old"]]) == 0
    drop_config_key(paths["old"], "adam")
    assert run_copy.main(TINY_COPY + ["--steps", "30", "--checkpoint", paths["old"]]) == 0
    assert run_copy.main(TINY_COPY + ["--steps", "30", "--checkpoint", paths["whole"]]) == 0
    assert_same_run(paths["old"], paths["whole"])

def test_data_lookup_order(tmp_path, monkeypatch):
    """--data-dir first, then $OK_RTRL_DATA, then the cache; named folders are only read."""
    for name in ("flag", "env", "cache/ok-rtrl/ptb-char"):
        write_corpus(str(tmp_path / name))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("OK_RTRL_DATA", str(tmp_path / "env"))
    folder = lambda paths: os.path.dirname(paths["train"])  # noqa: E731
    assert folder(run_ptb.locate_ptb(str(tmp_path / "flag"))) == str(tmp_path / "flag")
    assert folder(run_ptb.locate_ptb(None)) == str(tmp_path / "env")
    monkeypatch.delenv("OK_RTRL_DATA")
    assert folder(run_ptb.locate_ptb(None)) == str(tmp_path / "cache/ok-rtrl/ptb-char")
    missing = r"does not hold the PTB char files \(the folder does not exist\): put"
    with pytest.raises(run_ptb.UserError, match=missing):
        run_ptb.locate_ptb(str(tmp_path / "empty"))
    assert not os.path.exists(tmp_path / "empty")


def make_archive(tmp_path):
    """A stand-in for simple-examples.tgz: a synthetic corpus under simple-examples/data/."""
    source = str(tmp_path / "source")
    write_corpus(source, scheme="ptb.char.{}.txt")
    archive = str(tmp_path / "simple-examples.tgz")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(source, "ptb.char.train.txt"), "./simple-examples/README")
        for split in run_ptb.SPLITS:
            name = f"ptb.char.{split}.txt"
            tar.add(os.path.join(source, name), f"./simple-examples/data/{name}")
    sums = {}
    for split in run_ptb.SPLITS:
        with open(os.path.join(source, f"ptb.char.{split}.txt"), "rb") as f:
            sums[split] = hashlib.sha256(f.read()).hexdigest()
    return "file://" + archive, sums, source


def test_download_verifies_then_fills_the_cache(tmp_path, monkeypatch, capsys):
    url, sums, source = make_archive(tmp_path)
    monkeypatch.setattr(run_ptb, "PTB_URL", url)
    monkeypatch.setattr(run_ptb, "PTB_SHA256", sums)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OK_RTRL_DATA", raising=False)
    paths = run_ptb.locate_ptb(None)
    cache = str(tmp_path / "cache" / "ok-rtrl" / "ptb-char")
    assert paths == {split: os.path.join(cache, f"{split}.txt") for split in run_ptb.SPLITS}
    for split in run_ptb.SPLITS:
        with open(paths[split], "rb") as a, open(os.path.join(source, f"ptb.char.{split}.txt"),
                                                   "rb") as b:
            assert a.read() == b.read()
    assert os.listdir(tmp_path / "cache" / "ok-rtrl") == ["ptb-char"]  # no staging folder left
    assert run_ptb.main(TINY_PTB + ["--steps", "10", "--eval-every", "10"]) == 0
    assert "verified and saved" in capsys.readouterr().out


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path, monkeypatch, capsys):
    url, _, _ = make_archive(tmp_path)
    monkeypatch.setattr(run_ptb, "PTB_URL", url)  # the real sums: the synthetic files fail them
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OK_RTRL_DATA", raising=False)
    assert run_ptb.main(TINY_PTB + ["--steps", "10"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_ptb.py")
    assert "sha256" in line and "put train.txt" in line
    assert os.listdir(tmp_path / "cache" / "ok-rtrl") == []  # nothing, not even a staging folder


def test_no_network_gives_one_line_saying_where_to_put_the_files(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("OK_RTRL_DATA", raising=False)
    assert run_ptb.main(["--rank", "8"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_ptb.py")
    assert "cannot download" in line and str(tmp_path / "cache" / "ok-rtrl" / "ptb-char") in line


@pytest.mark.parametrize("argv, says", [
    (["--eval-every", "0"], "--eval-every"),
    (["--reset-every", "-3"], "--reset-every"),
    (["--dtype", "float16"], "--dtype"),
    (["--method", "rtrl", "--trunc", "10"], "--trunc"),
])
def test_ptb_bad_options_give_usage_and_exit_2(capsys, argv, says):
    assert run_ptb.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: run_ptb.py") and says in one_error_line(err, "run_ptb.py")


# --- No traceback: bad data files, a cache that cannot be made -----------------------------------


def test_data_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    """One byte of valid.txt set to 0xff: the line names the file, the byte's line and offset,
    and says that it is not the PTB text."""
    data = tmp_path / "data"
    write_corpus(str(data))
    raw = bytearray((data / "valid.txt").read_bytes())
    offset = raw.index(b"\n") + 5  # on the second line
    raw[offset] = 0xFF
    (data / "valid.txt").write_bytes(bytes(raw))
    assert run_ptb.main(TINY_PTB + ["--steps", "5", "--data-dir", str(data)]) == 1
    line = one_error_line(capsys.readouterr().err, "run_ptb.py")
    assert str(data / "valid.txt") in line and "UTF-8" in line
    assert "line 2" in line and f"byte {offset}" in line and "not the PTB" in line


@pytest.mark.parametrize("text, says", [
    (" the cat sat \n a dog ran \n", "not character-level: 5 of its symbols are longer than one "
     "character (cat, dog, ran, ...); expected PTB's char files, one character a symbol"),
    (" ".join(chr(0x100 + k) for k in range(300)) + "\n", "has 301 different symbols, expected "
     "about 50 (PTB's char files), at most 200: not the PTB char text")],
    ids=["word-level", "too many symbols"])
def test_a_text_that_is_not_character_level_is_refused_in_one_line(tmp_path, capsys, text, says):
    """A word-level train.txt (or one of hundreds of symbols) is not trained on as if its symbols
    were characters: the run stops before training with one line saying what it expected."""
    data = tmp_path / "data"
    write_corpus(str(data))
    (data / "train.txt").write_text(text, encoding="utf-8")
    assert run_ptb.main(TINY_PTB + ["--steps", "5", "--data-dir", str(data)]) == 1
    out, err = capsys.readouterr()
    line = one_error_line(err, "run_ptb.py")
    assert str(data / "train.txt") in line and says in line, line
    assert "step 1" not in out


@pytest.mark.parametrize("cache", ["a file", "under /proc"])
def test_cache_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, capsys, cache):
    """$XDG_CACHE_HOME naming a file, or a place where no folder can be made: one line naming
    the folder and what to do, and no download is even tried."""
    if cache == "a file":
        base = tmp_path / "cache"
        base.write_text("not a folder")
    else:
        base = "/proc/ok-rtrl-no-such-cache"
        if not os.path.isdir("/proc"):
            pytest.skip("no /proc here")

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the cache folder cannot be made")
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    monkeypatch.delenv("OK_RTRL_DATA", raising=False)
    assert run_ptb.main(TINY_PTB + ["--steps", "5"]) == 1
    line = one_error_line(capsys.readouterr().err, "run_ptb.py")
    assert "cannot create the data cache" in line and str(base) in line
    assert "XDG_CACHE_HOME" in line and "--data-dir" in line


# --- Small things: logs, rates, help, messages ---------------------------------------------------


def test_rerun_and_extension_keep_one_test_line_at_the_end(tmp_path):
    """Rerunning a finished PTB command, then extending it, leaves one '# test BPC' line, last."""
    data = str(tmp_path / "data")
    write_corpus(data)
    log, path = str(tmp_path / "ptb.csv"), str(tmp_path / "ptb.npz")
    argv = TINY_PTB + ["--eval-every", "10", "--log-every", "5", "--data-dir", data, "--log", log,
                       "--checkpoint", path]
    for steps in ("20", "20", "30"):
        assert run_ptb.main(argv + ["--steps", steps]) == 0
    with open(log) as f:
        lines = f.read().splitlines()
    assert [line for line in lines if line.startswith("# test BPC")] == [lines[-1]]
    assert [line.split(",")[0] for line in lines[2:-1]] == ["5", "10", "15", "20", "25", "30"]


def fake_clock(monkeypatch, step_seconds, pause_seconds, pauses):
    """A clock that advances only by step_seconds per training step and by pause_seconds per call
    of each (module, name) in pauses (validations, saves): rates must not count the pauses."""
    now = [1000.0]
    monkeypatch.setattr(runlib.time, "monotonic", lambda: now[0])

    def advancing(function, seconds):
        def wrapped(*args, **kwargs):
            now[0] += seconds
            return function(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(runlib, "train_step", advancing(runlib.train_step, step_seconds))
    for module, name in pauses:
        monkeypatch.setattr(module, name, advancing(getattr(module, name), pause_seconds))


def test_ptb_rate_counts_training_time_only(tmp_path, monkeypatch):
    """Every row's chars_per_s is B / (seconds per step), also on rows that span a validation, a
    save or a resume."""
    data = str(tmp_path / "data")
    write_corpus(data)
    fake_clock(monkeypatch, 0.01, 100.0, [(run_ptb, "validate"), (runlib, "save_atomically")])
    log, path = str(tmp_path / "ptb.csv"), str(tmp_path / "ptb.npz")
    argv = TINY_PTB + ["--eval-every", "30", "--log-every", "20", "--data-dir", data, "--log", log,
                       "--checkpoint", path]
    assert run_ptb.main(argv + ["--steps", "50"]) == 0
    assert run_ptb.main(argv + ["--steps", "100"]) == 0
    rates = [float(row.split(",")[-1]) for row in log_rows(log, drop_last_column=False)[1:]]
    assert len(rates) == 8 and all(rate == pytest.approx(4 / 0.01) for rate in rates)


def test_copy_rate_counts_training_time_only(tmp_path, monkeypatch):
    fake_clock(monkeypatch, 0.01, 100.0, [(runlib, "save_atomically")])
    log, path = str(tmp_path / "copy.csv"), str(tmp_path / "copy.npz")
    argv = TINY_COPY + ["--log-every", "20", "--log", log, "--checkpoint", path,
                        "--checkpoint-every", "0.15"]
    assert run_copy.main(argv + ["--steps", "50"]) == 0
    assert run_copy.main(argv + ["--steps", "100"]) == 0
    rates = [float(row.split(",")[-1]) for row in log_rows(log, drop_last_column=False)[1:]]
    assert len(rates) == 5 and all(rate == pytest.approx(1 / 0.01) for rate in rates)


@pytest.mark.parametrize("runner", [run_copy, run_ptb, runlib, runfiles])
def test_nothing_cites_a_document_the_repository_lacks(runner, capsys):
    """The help, the first line of a run and the runners' sources cite the paper or ok_rtrl.py,
    never a document that is not in the repository."""
    word = "SP" + "EC"  # spelled apart, so that this file does not cite it either
    if runner in (run_copy, run_ptb):
        with pytest.raises(SystemExit):
            runlib.build_parser(runner).parse_args(["--help"])
        assert word not in capsys.readouterr().out
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in (runner.__file__, __file__, os.path.join(here, "README.md")):
        with open(name) as f:
            assert word not in f.read(), name


def test_ptb_checkpoint_help_says_it_holds_the_current_run():
    helps = {action.dest: action.help for action in runlib.build_parser(run_ptb)._actions}
    assert "current" in helps["checkpoint"] and "best" in helps["checkpoint"]


def test_missing_data_says_which_file_or_that_the_folder_does_not_exist(tmp_path):
    with pytest.raises(run_ptb.UserError, match="folder does not exist"):
        run_ptb.locate_ptb(str(tmp_path / "nowhere"))
    write_corpus(str(tmp_path / "data"))
    os.remove(tmp_path / "data" / "valid.txt")
    with pytest.raises(run_ptb.UserError, match=r"files \(no valid\.txt or ptb\.char\.valid\.txt in it\): put"):
        run_ptb.locate_ptb(str(tmp_path / "data"))


def test_gitignore_keeps_virtual_environments_out():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, ".gitignore")) as f:
        assert ".venv/" in f.read().split()
