#!/usr/bin/env python3
"""Character-level Penn Treebank trained online with OK, as in Benzing et al., ICML 2019.

F. Benzing, M. M. Gauy, A. Mujika, A. Martinsson, A. Steger, "Optimal Kronecker-Sum Approximation
of Real Time Recurrent Learning", arXiv:1902.03993. A one-layer recurrent highway network of 256
units reads the training text as B = 32 streams and predicts the next symbol, updating its weights
after every symbol. Validation bits per character (BPC) are measured every 10,000 steps; the test
BPC of the best-validation weights is the result (the paper's code: best validation 1.740-1.745 on
its own tokenisation, which read the word-level text as characters and so adds nearly free
symbols; about 1.77 on the standard files used here, see docs/results.md, "Where we differ").

    python run_ptb.py --rank 8              # the paper's run; docs/speed.md says how long it takes
    python run_ptb.py --hidden 64 --batch 16 --rank 4 --lr 3e-3 --steps 20000 --eval-every 5000

Data: the Mikolov split ptb.char.{train,valid,test}.txt (50 symbols: 49 in the text plus one
end-of-line symbol per line; 5,017,482 / 393,042 / 442,423 tokens). Looked up in --data-dir, else
in $OK_RTRL_DATA, else in a per-user cache folder, where it is downloaded on first use from
Mikolov's "simple-examples" archive and checked against the published sha256 sums. This module
is a runlib.Task; the command line, the loop, checkpoints, the log, signals and the run's status
are tools/runlib.py's. One training step: step() below -> runlib.train_step -> ok_rtrl.
"""
import hashlib
import http.client
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np

import ok_rtrl as ok
from tools import runfiles, runlib
from tools.runlib import UserError

TASK, PROG = "ptb", "run_ptb.py"
TITLE = f"{PROG}: character-level Penn Treebank as in Benzing et al. 2019 (arXiv 1902.03993)"
DESCRIPTION = ("Character-level Penn Treebank as in Benzing et al. 2019 (arXiv 1902.03993), "
               "trained online with OK or a baseline. The defaults are the paper's "
               "configuration.")

# --- The data: files, download, symbols -------------------------------------------------------

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_SHA256 = {  # of the unmodified ptb.char.*.txt files in the archive's data/ folder
    "train": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    "valid": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    "test": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"}
SPLITS = ("train", "valid", "test")
FILE_NAMES = ("{}.txt", "ptb.char.{}.txt")  # the shared copy's names; the archive's names
EOS = "\n"  # the end-of-line symbol: no whitespace-separated symbol can be equal to it
DOWNLOAD_TIMEOUT = 30  # seconds without an answer before the download gives up
EVAL_ROWS = 1024  # validation runs the text as this many chunks side by side (speed)
MAX_VOCABULARY = 200  # PTB's char files have 50 symbols; a text with far more is not one of them


def cache_folder():
    """Where downloaded data is kept: $XDG_CACHE_HOME/ok-rtrl/ptb-char, or ~/.cache/..."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ok-rtrl", "ptb-char")


def split_files(folder):
    """{split: path} when folder holds all three files under either naming scheme, else None."""
    paths = {}
    for split in SPLITS:
        found = [os.path.join(folder, name.format(split)) for name in FILE_NAMES]
        found = [path for path in found if os.path.isfile(path)]
        if not found:
            return None
        paths[split] = found[0]
    return paths


def what_is_missing(folder):
    """Why split_files(folder) found nothing: the folder, or which files, are not there."""
    if not os.path.isdir(folder):
        return "the folder does not exist" if not os.path.exists(folder) else "it is not a folder"
    missing = [split for split in SPLITS
               if not any(os.path.isfile(os.path.join(folder, name.format(split)))
                          for name in FILE_NAMES)]
    return "; ".join(f"no {split}.txt or ptb.char.{split}.txt in it" for split in missing)


def where_to_put(folder):
    return (f"put train.txt, valid.txt and test.txt (or ptb.char.train.txt, ptb.char.valid.txt and "
            f"ptb.char.test.txt from the data/ folder of {PTB_URL}) into {folder}, or pass "
            "--data-dir DIR, or set OK_RTRL_DATA=DIR")


def locate_ptb(data_dir):
    """The three files: from --data-dir, else $OK_RTRL_DATA, else the cache (download if absent).

    A folder named by the user is only read, never written; only the cache gets a download.
    """
    named = (("--data-dir", data_dir), ("OK_RTRL_DATA", os.environ.get("OK_RTRL_DATA")))
    for origin, folder in named:
        if folder:
            paths = split_files(folder)
            if paths is None:
                raise UserError(f"{origin} {folder} does not hold the PTB char files "
                                f"({what_is_missing(folder)}): " + where_to_put(folder))
            return paths
    folder = cache_folder()
    paths = split_files(folder)
    if paths is None:
        download_ptb(folder)
        paths = split_files(folder)
    return paths


def download_ptb(folder, url=None):
    """Fetch the simple-examples archive, take its three char files, check every sha256, and
    only then move them into folder: nothing unchecked or half-written is ever left there."""
    url = url or PTB_URL
    parent = os.path.dirname(os.path.abspath(folder))
    try:  # first make sure that the download has somewhere to go
        os.makedirs(parent, exist_ok=True)
        staging_folder = tempfile.TemporaryDirectory(dir=parent, prefix=".ptb-char-download-")
    except OSError as e:
        raise UserError(f"cannot create the data cache {folder} ({e.strerror or e}): set "
                        "XDG_CACHE_HOME to a folder where one can be made, or put train.txt, "
                        "valid.txt and test.txt in a folder of your own and pass --data-dir DIR "
                        "or set OK_RTRL_DATA=DIR") from None
    print(f"PTB char files not found in {folder}: downloading {url} (about 34 MB)", flush=True)
    with staging_folder as staging:
        archive = os.path.join(staging, "simple-examples.tgz")
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as answer, \
                    open(archive, "wb") as f:
                shutil.copyfileobj(answer, f)
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
            raise UserError(f"cannot download {url} ({e}): {where_to_put(folder)}") from None
        for split in SPLITS:
            content = _archive_member(archive, f"ptb.char.{split}.txt", url, folder)
            digest = hashlib.sha256(content).hexdigest()
            if digest != PTB_SHA256[split]:
                raise UserError(f"ptb.char.{split}.txt in {url} has sha256 {digest}, expected "
                                f"{PTB_SHA256[split]}; nothing was kept: {where_to_put(folder)}")
            with open(os.path.join(staging, f"{split}.txt"), "wb") as f:
                f.write(content)
        try:
            os.makedirs(folder, exist_ok=True)
            for split in SPLITS:  # all three are verified: now move them in, each atomically
                os.replace(os.path.join(staging, f"{split}.txt"),
                           os.path.join(folder, f"{split}.txt"))
        except OSError as e:
            raise UserError(f"cannot save the verified files in the data cache {folder} "
                            f"({e.strerror or e}): {where_to_put(folder)}") from None
    print(f"PTB char files verified and saved in {folder}")


def _archive_member(archive, name, url, folder):
    """The bytes of data/name inside the .tgz archive."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                folder_and_name = member.name.split("/")[-2:]
                if member.isfile() and folder_and_name == ["data", name]:
                    return tar.extractfile(member).read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise UserError(f"{url} is not a readable .tgz archive ({e}): {where_to_put(folder)}")
    raise UserError(f"{url} holds no data/{name}: {where_to_put(folder)}")


def read_symbols(path):
    """The symbols of one char-level file, and the file's sha256.

    Symbols are separated by whitespace; each line adds one EOS. Worked example: the sentence
    "the cat" is stored as the line 't h e _ c a t ' (every character followed by a space, '_'
    between words), and gives the 8 symbols  t h e _ c a t EOS. Lines after the first start
    with a space and the file ends with '\\n ' (as the archive's files do), so the text
    after the last newline holds no symbol; if it held some it would count as a line too.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} on line {line} is "
                        f"0x{raw[e.start]:02x}): not the PTB char text, whose files are "
                        "plain ASCII; use the unmodified ptb.char.*.txt files") from None
    lines = text.split("\n")
    if not lines[-1].strip():
        lines.pop()
    symbols = []
    for line in lines:
        symbols.extend(line.split())
        symbols.append(EOS)
    return symbols, hashlib.sha256(raw).hexdigest()


def load_ptb(paths):
    """{split: symbol ids (N,) int32}, the vocabulary (sorted train symbols, EOS included) and
    {split: sha256}. A text that is not character-level (a symbol longer than one character,
    more than MAX_VOCABULARY symbols) or a validation or test symbol missing from train is an
    error."""
    symbols, sha = {}, {}
    for split in SPLITS:
        symbols[split], sha[split] = read_symbols(paths[split])
        if len(symbols[split]) < 2:
            raise UserError(f"{paths[split]} holds fewer than 2 symbols: not a char-level text")
        words = sorted({s for s in symbols[split] if len(s) > 1})
        if words:
            raise UserError(f"{paths[split]} is not character-level: {len(words):,} of its "
                            f"symbols are longer than one character ({', '.join(words[:3])}, "
                            "...); expected PTB's char files, one character a symbol, separated "
                            f"by spaces (ptb.char.{split}.txt, 50 symbols)")
    vocab = sorted(set(symbols["train"]))
    if len(vocab) > MAX_VOCABULARY:
        raise UserError(f"{paths['train']} has {len(vocab):,} different symbols, expected about "
                        f"50 (PTB's char files), at most {MAX_VOCABULARY}: not the PTB char text")
    index = {s: i for i, s in enumerate(vocab)}
    ids = {}
    for split in SPLITS:
        unknown = set(symbols[split]) - index.keys()
        if unknown:
            raise UserError(f"{paths[split]} has symbols that train does not have: "
                            f"{' '.join(sorted(map(repr, unknown))[:10])}")
        ids[split] = np.fromiter(map(index.__getitem__, symbols[split]), np.int32,
                                 count=len(symbols[split]))
    return ids, vocab, sha


# --- Training data stream and evaluation --------------------------------------------------------


def stream_positions(step, B, N):
    """Where each of the B streams reads at a step (B,): evenly spaced offsets into the training
    text, advancing one symbol per step and wrapping around; stream b reads x = text[p] and
    predicts y = text[p + 1], so p runs over 0..N-2."""
    offsets = np.arange(B, dtype=np.int64) * (N - 1) // B
    return (offsets + step) % (N - 1)


def stream_resets(positions, reset_every):
    """Which streams start afresh before this step (B,): those whose position in the text is a
    multiple of reset_every, as in the paper's code. Their offsets differ, so the streams reset
    at different steps, each every reset_every characters; resetting all of them at the same
    steps learns measurably slower (docs/results.md, "Where we differ")."""
    return positions % reset_every == 0


def bits_per_character(params, ids, eos_id, warmup, rows=EVAL_ROWS, spec=False):
    """Mean loss in bits over every symbol of a text, the state carried through the text.

    For speed the text is cut into `rows` chunks run side by side, one per batch row. Chunk i
    reads positions [i L, i L + L + warmup) from h = 0 and counts only its last L predictions
    (chunk 0 counts all of them): the counted ranges tile the text, and every symbol is predicted
    after at least `warmup` symbols of its own text, or all of them from the text start. With
    warmup = the training reset interval, chunking hides nothing that the model was trained to
    carry. The first symbol is predicted after an EOS, as if the text followed a line end.
    """
    N = len(ids)
    rows = max(1, min(rows, (N - warmup) // max(warmup, 1)))  # short texts: fewer, longer chunks
    L = max(1, -(-(N - warmup) // rows))  # counted steps per chunk: rows L + warmup >= N
    inputs = np.concatenate([[eos_id], ids[:-1]])  # (N,) inputs[t] precedes ids[t]
    t = np.arange(L + warmup)[:, None]  # (L + warmup, 1) step within a chunk
    position = t + L * np.arange(rows)[None, :]  # (L + warmup, rows) position in the text
    inside = position < N  # the last chunk may run past the end: padding, not counted
    counted = inside & ((t >= warmup) | (np.arange(rows)[None, :] == 0))  # (L + warmup, rows)
    position = np.where(inside, position, 0)
    losses, _ = ok.evaluate(params, inputs[position], ids[position], spec=spec)  # (L+warmup, rows)
    assert counted.sum() == N  # every symbol predicted exactly once
    return float(ok.bits(losses[counted].sum(dtype=np.float64) / N))


# --- Command line --------------------------------------------------------------------------------

DEFAULTS = {"rank": 8, "trunc": 100, "hidden": 256, "batch": 32, "steps": 1_000_000}
WORDS = {"paper": "PTB", "streams": "at evenly spaced offsets of the training text",
         "rows": " and after each validation; the test BPC in a last '#' line",
         "curve": "validation BPC against steps", "keeps": ", and the best-validation weights"}
COLUMNS = ("step", "train_bits", "valid_bpc", "chars_per_s")
RESETS = "by stream position"  # stream_resets; checkpoints without this key reset all at once
# Options that define the experiment: a checkpoint resumes only under the same values (and the
# same data). The others (--steps, files, intervals) only say how long to run and where to write.
EXPERIMENT_KEYS = ("task", "method", "rank", "trunc", "hidden", "batch", "lr", "seed", "dtype",
                   "adam", "eval_every", "reset_every", "resets", "data_sha256")


def add_options(p):
    """Validation, resets and the data, PTB's own options."""
    p.add_argument("--eval-every", type=runlib.int_at_least(1), default=10_000, metavar="STEPS",
                   help="steps between validations on the whole validation text, and one at "
                   "the last step (default 10,000, the paper's)")
    p.add_argument("--reset-every", type=runlib.int_at_least(1), default=100, metavar="STEPS",
                   help="characters between resets of a stream's h and learner state: each stream "
                   "is reset where its position in the text is a multiple of STEPS (default "
                   "100, the paper's)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder with train.txt, valid.txt, test.txt or ptb.char.*.txt (default: "
                   "$OK_RTRL_DATA, else ~/.cache/ok-rtrl/ptb-char, filled by a checked download)")


def config(args):
    """PTB's own configuration keys: validation and resets define the experiment; the data's
    folder is this machine's (the data are known by their sha256, data_sha256, added by
    prepare)."""
    return ({"eval_every": args.eval_every, "reset_every": args.reset_every, "resets": RESETS},
            {"data_dir": args.data_dir}, {})


def outputs(config):
    return [("--plot", config["plot"], None)]


# --- The run: best weights and curves beside runlib's weights, learner and checkpoint -----------


def prepare(config):
    """The three files read and checked, their sha256 in the config -> (V, data): the vocabulary
    size, and data = {split: ids, 'eos': the end-of-line symbol's id}."""
    paths = locate_ptb(config["data_dir"])
    ids, vocab, sha = load_ptb(paths)
    config["data_sha256"] = sha
    print(f"data: {os.path.dirname(os.path.abspath(paths['train']))}: "
          + ", ".join(f"{split} {len(ids[split]):,}" for split in SPLITS)
          + f" symbols; vocabulary {len(vocab)} (train, end of line included)")
    if sha != PTB_SHA256:
        print("note: these are not the published PTB files (their sha256 differs): the BPC "
              "is not comparable with the paper's")
    return len(vocab), dict(ids, eos=vocab.index(EOS))


@dataclass
class PtbRun(runlib.Run):
    """runlib's run (weights, Adam, learner) with the training loss summed since the last log
    row, the best-validation weights, the last validation's step, the curves ((step, bits)
    points), the loss since the last progress line and, once finished, the test BPC."""
    row_nats: float = 0.0
    row_steps: int = 0
    best: ok.Params | None = None  # new_run: the initial weights
    best_step: int = -1
    best_bpc: float = math.inf
    last_eval: int = -1
    train_curve: list = field(default_factory=list)
    valid_curve: list = field(default_factory=list)
    shown: tuple = (0.0, 0)  # training nats and steps since the last progress line
    test_bpc: float | None = None


COUNTERS = ("row_nats", "row_steps", "best_step", "best_bpc", "last_eval")  # after the step


def new_run(config, rng, V):
    """Fresh weights (drawn first from rng), Adam, learner state, counters."""
    run = runlib.new_run(config, rng, V, PtbRun)
    run.best = run.params
    return run


def checkpoint_arrays(config, rng, run):
    """runlib's arrays of the run, PTB's counters and its own arrays: the best-validation
    weights and the two curves."""
    counters = {"step": run.step, **{name: getattr(run, name) for name in COUNTERS}}
    return runlib.checkpoint_arrays(config, rng, run, counters, {
        "best": run.best,
        "train_curve": np.array(run.train_curve, np.float64).reshape(-1, 2),
        "valid_curve": np.array(run.valid_curve, np.float64).reshape(-1, 2)})


def restore_run(arrays, run, rng, path):
    """Overwrite the fresh run and rng with a checkpoint's arrays (shapes checked)."""
    counters = runlib.restore_run(arrays, run, rng, path, task_tuples=["best"])
    for name in COUNTERS:
        setattr(run, name, counters[name])
    run.train_curve = [tuple(row) for row in arrays["train_curve"].tolist()]
    run.valid_curve = [tuple(row) for row in arrays["valid_curve"].tolist()]


# --- One step, validation, the log row and progress line, the test BPC --------------------------


def step(run, config, rng, data):
    """Every stream's next symbol of the training text, one training step (TBPTT: 0 or K
    losses), the losses summed for the log row and the progress line."""
    text = data["train"]
    p = stream_positions(run.step, config["batch"], len(text))
    reset = stream_resets(p, config["reset_every"])
    nats = runlib.train_step(run, config, text[p], text[p + 1], reset)
    run.row_nats += float(nats.sum())
    run.row_steps += len(nats)
    run.shown = (run.shown[0] + float(nats.sum()), run.shown[1] + len(nats))


def measure(run, config, data, logs):
    """The validation BPC every --eval-every steps and at the last one (it asks for a log row
    and a save), else None."""
    if run.step % config["eval_every"] == 0 or run.step == config["steps"]:
        return validate(run, data, config)
    return None


def validate(run, data, config):
    """Validation BPC of the current weights; keeps them if they are the best so far."""
    started = time.monotonic()
    bpc = bits_per_character(run.params, data["valid"], data["eos"], config["reset_every"],
                             spec=config.get("spec", False))
    run.valid_curve.append((run.step, bpc))
    run.last_eval = run.step
    if bpc < run.best_bpc:
        run.best, run.best_bpc, run.best_step = run.params, bpc, run.step
    print(f"validation at step {run.step:,}: {bpc:.4f} BPC (best {run.best_bpc:.4f} at "
          f"step {run.best_step:,}) [{time.monotonic() - started:.1f} s]", flush=True)
    return bpc


def log_row(run, config, bpc, rate):
    """A point of the training curve (mean train bits since the last row) and the CSV row:
    step, train_bits, valid_bpc (empty between validations), chars_per_s."""
    train_bits = (float(ok.bits(run.row_nats / run.row_steps)) if run.row_steps
                  else math.nan)  # nan: no TBPTT window ended since the last row
    run.train_curve.append((run.step, train_bits))
    run.row_nats, run.row_steps = 0.0, 0
    valid = "" if bpc is None else f"{bpc:.6f}"
    return f"{run.step},{train_bits:.6f},{valid},{config['batch'] * rate:.1f}\n"


def progress(run, config, rate):
    """The mean training loss since the last progress line, the best validation, chars/s."""
    nats, steps = run.shown
    run.shown = (0.0, 0)
    recent = f"{ok.bits(nats / steps):.3f}" if steps else "-"
    best = f"  best valid {run.best_bpc:.3f}" if run.best_step >= 0 else ""
    return f"train {recent} bits{best}  {config['batch'] * rate:,.0f} chars/s"


def finish(run, config, data, logs):
    """The result: test BPC of the best-validation weights (validating first if the last step
    was not, e.g. --steps 0), printed and written as the log's last line."""
    if run.last_eval != run.step:
        validate(run, data, config)
    run.test_bpc = bits_per_character(run.best, data["test"], data["eos"], config["reset_every"],
                                      spec=config.get("spec", False))
    summary = (f"test BPC {run.test_bpc:.4f} of the best weights (step {run.best_step:,}, "
               f"validation {run.best_bpc:.4f})")
    print(summary)
    if "--log" in logs:
        runfiles.write_line(logs["--log"], f"# {summary}\n")


def result(run):
    """The best validation BPC and its step (None before the first validation) and, once the
    run has finished, the test BPC of those weights."""
    validated = run.best_step >= 0
    return {"best_valid_bpc": run.best_bpc if validated else None,
            "best_step": run.best_step if validated else None, "test_bpc": run.test_bpc}


def describe(run):
    if run.best_step < 0:
        return "no validation yet"
    return f"best validation {run.best_bpc:.4f} BPC at step {run.best_step:,}"


def plot(config, run):
    """Validation BPC against steps."""
    if run.valid_curve:
        x, y = zip(*run.valid_curve)
        runlib.write_plot(config["plot"], x, y, "step", "validation bits per character",
                          f"char PTB, {config['method']}, n {config['hidden']}")


def main(argv=None) -> int:
    return runlib.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
