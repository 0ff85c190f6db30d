"""The documentation cannot go stale: the README's example runs and does what the README says,
every relative link of the Markdown files reaches a file and a heading that exist, and every log
in results/ is described in results/README.md and records no folder of the machine it ran on.
"""
import glob
import json
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's top
README = os.path.join(ROOT, "README.md")
MARKDOWN = [README, os.path.join(ROOT, "results", "README.md"),
            *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LOGS = sorted(path for path in glob.glob(os.path.join(ROOT, "results", "*.csv"))
              + glob.glob(os.path.join(ROOT, "results", "1m", "*.csv"))  # the runs to 1M steps
              if not os.path.basename(path).startswith("paper-"))  # ours: the runners' logs
PAPER_LOGS = sorted(glob.glob(os.path.join(ROOT, "results", "paper-*.csv")))  # the authors' numbers
FENCE = re.compile(r"^```")
# An absolute path of two or more parts (/a/b) or a Windows drive, at the start of a word,
# string or code span: the mark of a folder of the machine a file was written on.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'(=`])((?:/[\w.-]+){2,}|[A-Za-z]:\\)", re.M)


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose_lines(text):
    """The lines of a Markdown text outside fenced code blocks."""
    inside = False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            yield line


def section(text, heading):
    """The text under the heading line (e.g. "## Install") up to the next heading of its level
    or above."""
    level = heading.split(" ")[0]
    lines, inside, found = [], False, False
    for line in text.splitlines():
        if FENCE.match(line):
            inside = not inside
        if not inside and line.startswith("#"):
            if line.strip() == heading:
                found = True
                continue
            if found and len(line.split(" ")[0]) <= len(level):
                break
        if found:
            lines.append(line)
    assert found, f"README.md has no heading {heading!r}"
    return "\n".join(lines)


CELLS = os.path.join(ROOT, "docs", "cells.md")


def python_blocks(text):
    """The ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def run_training_example(text, where, capsys, early_at_least):
    """Run a training example (a ```python block that prints its mean loss over its first and
    last 100 steps) as it stands: it learns the toy task, from near or below chance (ln 4 nats)
    to far below, and prints what the text quotes it printed, to rounding across CPUs (the
    quote is one machine's; this code reproduces it there digit for digit)."""
    namespace = {"__name__": "example"}
    exec(compile(python_blocks(text)[0], where, "exec"), namespace)
    early, late, guess = namespace["early"], namespace["late"], np.log(4)
    assert early_at_least * guess < early < guess and late < 0.05 * guess, (early, late)
    printed = capsys.readouterr().out
    number = r"(\d+\.\d+)"
    shape = (rf"mean loss {number} nats over the first 100 steps, {number} over the last 100 "
             rf"\(guessing: {number}\)")
    got, quoted = re.fullmatch(shape + r"\n", printed), re.search(shape, " ".join(text.split()))
    assert got and quoted, (printed, f"{where} quotes no output of this shape")
    for g, q in zip(got.groups(), quoted.groups()):  # far less than 0.02 nats across CPUs
        assert abs(float(g) - float(q)) <= 0.02, (printed, quoted.group(0))


def test_the_readme_example_runs_and_learns(capsys):
    """The README's example (float32, the highway cell's Learner) trains from near chance."""
    run_training_example(section(read(README), "## Using the module from your own code"),
                         "README.md example", capsys, early_at_least=0.9)


def test_the_tanh_rnn_example_runs_and_learns(capsys):
    """docs/cells.md's tanh RNN, trained through ok.OK with its own H_t and D_t, learns."""
    run_training_example(read(CELLS), "docs/cells.md example", capsys, early_at_least=0.5)


def test_the_noise_measurement_runs_and_falls_with_the_rank(capsys):
    """docs/cells.md's measurement of OK's noise against exact RTRL runs, prints what the page
    quotes, and the noise falls as the rank rises (at rank 16 of at most m = 21 the estimate is
    nearly exact)."""
    text = read(CELLS)
    exec(compile(python_blocks(text)[2], "docs/cells.md noise", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    noise = [float(line.split("= ")[1].split()[0]) for line in lines]
    assert noise == sorted(noise, reverse=True) and noise[-1] < 0.1, lines
    quoted = " ".join(text.split())  # the page's text, white space folded
    for line in lines:
        said = " ".join(line.split("(")[0].replace("|OK - RTRL| / |RTRL|", "...").split())
        assert f"`{said}`" in quoted, line


def test_the_lstm_jacobians_are_its_derivatives():
    """docs/cells.md's lstm_step gives H_t = d[h_t, c_t]/d[h_{t-1}, c_{t-1}] and D_t =
    d[h_t, c_t]/dz_t equal to central finite differences of its own h_t and c_t (z_t through
    the bias row of W, which z_t = a_t W adds as it is: a_t ends in 1)."""
    namespace = {"np": np}
    exec(compile(python_blocks(read(CELLS))[1], "docs/cells.md lstm_step", "exec"), namespace)
    lstm_step = namespace["lstm_step"]
    rng = np.random.default_rng(0)
    V, n, B, eps = 3, 2, 2, 1e-6
    W, x = rng.normal(0, 0.7, (V + n + 1, 4 * n)), rng.integers(0, V, B)
    h, c = rng.normal(size=(B, n)), rng.normal(size=(B, n))
    _, _, a, H, D = lstm_step(W, x, h, c)
    assert (a.shape, H.shape, D.shape) == ((B, V + n + 1), (B, 2 * n, 2 * n), (B, 2 * n, 4 * n))

    def state(W, h, c):
        return np.hstack(lstm_step(W, x, h, c)[:2])  # (B, 2n) = [h_t, c_t]

    for k in range(2 * n):  # column k of H: a nudge of h_{t-1} (k < n) or of c_{t-1}
        dh, dc = np.zeros((B, n)), np.zeros((B, n))
        (dh if k < n else dc)[:, k % n] = eps
        column = (state(W, h + dh, c + dc) - state(W, h - dh, c - dc)) / (2 * eps)
        # eps^2 truncation and 1e-16 / eps rounding on O(1) values: 1e-8 is far above both
        np.testing.assert_allclose(H[:, :, k], column, rtol=0, atol=1e-8)
    for j in range(4 * n):  # column j of D: a nudge of z_j
        dW = np.zeros_like(W)
        dW[-1, j] = eps
        column = (state(W + dW, h, c) - state(W - dW, h, c)) / (2 * eps)
        np.testing.assert_allclose(D[:, :, j], column, rtol=0, atol=1e-8)


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line) for line in prose_lines(read(path)) if line.startswith("#")}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_reach_files_and_headings_that_exist(path):
    """Every relative link [text](target) or [text](target#anchor) outside code blocks names a
    file of the repository and, for a Markdown file, one of its headings; and no Markdown file
    names a folder of the machine it was written on."""
    text = read(path)
    links = [target for line in prose_lines(text)
             for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    for target in links:
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(full), f"{target}: no such file"
        if anchor:
            assert full.endswith(".md"), f"{target}: an anchor into a file that is not Markdown"
            assert anchor in anchors(full), f"{target}: no such heading in {file or 'this file'}"
    found = ABSOLUTE_PATH.search(text)
    assert not found, f"{path} names a folder of a machine: {found.group(1)}"


def test_the_readme_links_by_anchor():
    """The link check above has work to do: the README points at docs/ by anchor, and has the
    section that the paper-size results go in, in the order of a first reading, at most about
    200 lines long."""
    text = read(README)
    assert re.search(r"\]\(docs/[a-z]+\.md#", text)
    headings = [line for line in prose_lines(text) if line.startswith("## ")]
    assert headings == ["## Install and test", "## Two quick runs",
                        "## Results at the paper's sizes", "## Using the module from your own code",
                        "## Porting", "## Where the rest is"]
    assert len(text.splitlines()) <= 200


@pytest.mark.parametrize("path", LOGS, ids=os.path.basename)
def test_every_log_is_described_and_records_no_folder(path):
    """A log's header is the runner's configuration as JSON with file names and no folders
    (log, checkpoint, plot, noise_log: base names; no data_dir: the data are named by their
    sha256), its log key is its own name, and results/README.md describes it."""
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        header = f.readline()
    match = re.fullmatch(r"# (run_copy\.py|run_ptb\.py) config: (\{.*\})\n", header)
    assert match, f"{name}: the first line is not a runner's config header"
    config = json.loads(match.group(2))
    assert "data_dir" not in config
    assert config["log"] == name
    for key in ("checkpoint", "plot", "noise_log"):
        value = config.get(key)
        assert value is None or value == os.path.basename(value.replace("\\", "/")), (key, value)
    if match.group(1) == "run_ptb.py":
        assert set(config["data_sha256"]) == {"train", "valid", "test"}
    text = read(path)
    found = ABSOLUTE_PATH.search(text)
    assert not found and "../" not in text, f"{name} names a folder"
    assert f"`{name}`" in read(os.path.join(ROOT, "results", "README.md")), \
        f"results/README.md does not describe {name}"


@pytest.mark.parametrize("path", PAPER_LOGS, ids=os.path.basename)
def test_the_authors_numbers_say_where_they_come_from(path):
    """The authors' curves open with '#' lines naming the paper and the repository they were
    taken from, name no folder of a machine, and results/README.md describes them."""
    text = read(path)
    assert text.startswith("# ") and "arXiv 1902.03993" in text
    assert "marcelomatheusgauy/optimal_kronecker_approximation" in text
    assert not ABSOLUTE_PATH.search(text)
    name = os.path.basename(path)
    assert f"`{name}`" in read(os.path.join(ROOT, "results", "README.md")), \
        f"results/README.md does not describe {name}"


def test_there_are_logs_to_check():
    assert len(LOGS) >= 8 and len(PAPER_LOGS) == 2
