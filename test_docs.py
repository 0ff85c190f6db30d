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

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
MARKDOWN = [README, os.path.join(HERE, "results", "README.md"),
            *sorted(glob.glob(os.path.join(HERE, "docs", "*.md")))]
LOGS = sorted(path for path in glob.glob(os.path.join(HERE, "results", "*.csv"))
              if not os.path.basename(path).startswith("paper-"))  # ours: the runners' logs
PAPER_LOGS = sorted(glob.glob(os.path.join(HERE, "results", "paper-*.csv")))  # the authors' numbers
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


def readme_example():
    """The first ```python block of the README's "Using the module from your own code"."""
    match = re.search(r"^```python\n(.*?)^```", section(read(README),
                      "## Using the module from your own code"), re.S | re.M)
    assert match, "no ```python block under 'Using the module from your own code'"
    return match.group(1)


def test_the_readme_example_runs_and_learns(monkeypatch, capsys):
    """The example, executed as it stands, trains: the loss of its last 100 steps is far below
    that of its first 100, which are near chance (ln 4 nats). The output it prints matches the
    README's quote of it, to float32 rounding across CPUs (the quote is one machine's)."""
    namespace = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md example", "exec"), namespace)
    early, late, guess = namespace["early"], namespace["late"], np.log(4)
    assert 0.9 * guess < early < guess and late < 0.05 * guess, (early, late)
    printed = capsys.readouterr().out
    number = r"(\d+\.\d+)"
    shape = (rf"mean loss {number} nats over the first 100 steps, {number} over the last 100 "
             rf"\(guessing: {number}\)")
    got = re.fullmatch(shape + r"\n", printed)
    quoted = re.search(shape, " ".join(section(read(README),
                       "## Using the module from your own code").split()))
    assert got and quoted, (printed, "the README quotes no output of this shape")
    # The quote is one machine's output (this code reproduces it there digit for digit); on
    # another CPU float32 rounding moves the averages a little, far less than 0.02 nats.
    for g, q in zip(got.groups(), quoted.groups()):
        assert abs(float(g) - float(q)) <= 0.02, (printed, quoted.group(0))


def slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    return {slug(line) for line in prose_lines(read(path)) if line.startswith("#")}


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: os.path.relpath(p, HERE))
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
    """The link check above has work to do: the README points at its own sections and at
    docs/ by anchor, and has the section that the paper-size results go in."""
    text = read(README)
    assert "](#results-at-the-papers-sizes)" in text
    assert re.search(r"\]\(docs/[a-z]+\.md#", text)
    assert "## Results at the paper's sizes" in text.splitlines()


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
    assert f"`{name}`" in read(os.path.join(HERE, "results", "README.md")), \
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
    assert f"`{name}`" in read(os.path.join(HERE, "results", "README.md")), \
        f"results/README.md does not describe {name}"


def test_there_are_logs_to_check():
    assert len(LOGS) >= 8 and len(PAPER_LOGS) == 2
