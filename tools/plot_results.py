"""One command redraws every figure from the logs in results/ and prints the tables of
the runs at the paper's sizes, ours beside the authors' (Benzing et al., ICML 2019, arXiv
1902.03993).

    python -m tools.plot_results          # results/*.png and the tables
    python -m tools.plot_results --table  # the tables only (needs no matplotlib)

Our logs are the CSV files the runners write with --log: a '#' line holding the run's config as
JSON, the column names, a row every --log-every steps and, for PTB, a last '#' line with the test
BPC. Each log is recognised by its config (task, size, learning rate, method, rank, seed), not by
its file name; logs of other sizes and the noise logs are left out. A run still going is drawn as
far as it has got. results/*.csv are the first 100k steps at the paper's learning rate (the
figures *-paper-size.png); results/1m/ holds the runs to 1M steps that test the paper's two
claims against truncated BPTT, PTB's TBPTT on the paper's grid of learning rates (*-1m.png).
The authors' numbers are results/paper-copy-n128-ok16-T.csv and
results/paper-ptb-n256-ok8-valid.csv; their '#' lines say where they come from. The logs are read
by runfiles.py (standard library only), so the tables need neither numpy nor Numba; only drawing
needs matplotlib.
"""
import argparse
import contextlib
import functools
import glob
import math
import os
import statistics
import sys

from tools.runfiles import UserError, log_config, matplotlib_pyplot, read_log, save_figure
from tools.sweep import METRICS, lr_name, pick

PROG = "plot_results"  # its messages' prefix; run it as python -m tools.plot_results
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
PAPER_LR = 10 ** -3.5

# The two experiments at the paper's sizes: which of our logs belong (task, size; the learning
# rate is the paper's 10^-3.5 in both; logs without a runner's config line, such as the
# authors' files, are no runs of ours), the log's columns and the one drawn, the OK rank the paper
# reports, the authors' file and column, the steps the table reports and how it writes a value,
# the figure (its title for the copy task), and whether the authors' runs are drawn as points
# rather than lines.
COPY = {"task": "copy", "hidden": 128, "batch": 16, "rank": 16,
        "columns": ["step", "T", "avg_bits", "steps_per_s"], "value": "T", "convert": int,
        "paper": "paper-copy-n128-ok16-T.csv", "paper_value": "T",
        "table_steps": (25_000, 50_000, 100_000), "what": "T at", "fmt": "{:g}".format,
        "figure": "copy-paper-size.png", "max_step": 100_000, "paper_points": False,
        "title": "Copy task, n 128, batch 16, lr 10^-3.5: curriculum T against steps"}
PTB = {"task": "ptb", "hidden": 256, "batch": 32, "rank": 8,
       "columns": ["step", "train_bits", "valid_bpc", "chars_per_s"], "value": "valid_bpc",
       "convert": float, "paper": "paper-ptb-n256-ok8-valid.csv",
       "paper_value": "valid_bpc_standard_files",
       "table_steps": (10_000, 20_000, 50_000, 100_000), "what": "valid BPC at",
       "fmt": "{:.3f}".format, "figure": "ptb-paper-size.png", "max_step": 100_000,
       "paper_points": True}  # validated every 10k steps: points, which a line would make a curve
PTB_GAP = (-0.04, 0.06)  # the right panel's range: ours minus the authors' median, in BPC

# The paper's two claims against truncated BPTT, to 1M steps: our runs in results/1m/ at any
# learning rate (PTB's TBPTT ran the paper's grid), drawn and tabulated beside the authors' OK
# and ours of 100k steps or more from the first 100k steps' experiment ("base"). "best" finds a
# run's best value (the lowest validation BPC, the highest T); the README's table ("glance")
# has the columns "glance_steps" and adds the TBPTT run best at 100k steps.
COPY_1M = {**COPY, "base": COPY, "folder": "1m", "any_lr": True, "best": max,
           "table_steps": (100_000, 250_000, 500_000, 1_000_000),
           "glance": "copy task, n 128, B 16: curriculum T",
           "glance_steps": (25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000),
           "figure": "copy-1m.png", "max_step": 1_000_000,
           "title": "Copy task, n 128, batch 16, lr 10^-3.5: OK against TBPTT to 1M steps"}
PTB_1M = {**PTB, "base": PTB, "folder": "1m", "any_lr": True, "best": min,
          "table_steps": (10_000, 20_000, 100_000, 250_000, 500_000, 1_000_000),
          "glance": "character PTB, n 256, B 32: validation BPC, standard files",
          "glance_steps": (10_000, 20_000, 100_000, 500_000, 1_000_000),
          "figure": "ptb-1m.png", "max_step": 1_000_000, "paper_points": True, "paper_ms": 4}
PTB_1M_ZOOM = ((300_000, 1_000_000), (1.74, 1.96))  # the right panel's steps and BPC

METHOD_ORDER = ("ok", "kf", "kf-avg", "uoro", "rtrl", "tbptt")
# One colour per baseline, the same in every figure it is in, and none twice in a figure (UORO
# and TBPTT-25, KF-RTRL and TBPTT-100 never meet); OK at the paper's rank is C0, the authors'
# runs grey, anything else black.
COLOURS = {"OK rank 1": "C1", "KF-RTRL": "C2", "UORO": "C3", "TBPTT-5": "C4", "TBPTT-10": "C5",
           "TBPTT-20": "C6", "exact RTRL": "C7", "OK rank 8, TensorFlow's Adam": "C9",
           "TBPTT-25": "C3", "TBPTT-50": "C8", "TBPTT-100": "C2"}
LINESTYLES = ("-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))  # run after run of one method ...
MARKERS = ("o", "s", "^", "D", "v")  # ... and, where points are marked, its marker
LEGEND_HANDLE = 4.0  # font sizes: long enough to show a dashed line's gaps beside its marker
AUTHORS = "0.55"  # their runs: grey, thin lines or points


# --- Reading the logs ---------------------------------------------------------------------------


def read_csv(path):
    """A log of ours or the authors' (runfiles.read_log); a damaged one is a UserError."""
    log = read_log(path)
    if log.columns is None:
        raise UserError(f"{path}: no column names; is the file damaged?")
    if log.damaged:
        number, fields = log.damaged[0]
        raise UserError(f"{path}, line {number}: {len(fields)} fields, the header has "
                        f"{len(log.columns)}; is the file damaged?")
    return log


@contextlib.contextmanager
def numbers(path):
    """Reading numbers from path's rows: one that does not parse becomes a UserError."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{path}: {e}; is the file damaged?") from None


def method_label(config):
    """'OK rank 16', 'KF-RTRL', 'TBPTT-20', 'OK rank 8, TensorFlow's Adam', ... from a config
    of our_runs (`--adam tensorflow` is named)."""
    method = config["method"]
    if method == "ok":
        label = f"OK rank {config['rank']}"
    elif method == "kf-avg":
        label = f"KF-avg rank {config['rank']}"
    elif method == "tbptt":
        label = f"TBPTT-{config['trunc']}"
    else:
        label = {"kf": "KF-RTRL", "uoro": "UORO", "rtrl": "exact RTRL"}.get(method, method)
    return label + (", TensorFlow's Adam" if config["adam"] == "tensorflow" else "")


def our_runs(results, experiment):
    """Our logs of an experiment at the paper's size and learning rate (any learning rate for
    the runs to 1M), sorted: OK at the paper's rank first, then the baselines, each by
    truncation, learning rate (largest first) and seed -> list of (config, curve), curve =
    {step: value} of T (copy) or of the validation BPC (PTB, rows with a validation only). The
    config's "log" is the log's path inside results/, "last_step" its last row's step (below
    "steps" while the run is going), and a PTB run's "test_bpc" the test BPC of its last line
    (None before it has one)."""
    runs, folder = [], experiment.get("folder", "")
    for path in sorted(glob.glob(os.path.join(results, folder, "*.csv"))):
        log = read_csv(path)
        prog, config = log_config(path, log) or (None, None)
        if (prog not in ("run_copy.py", "run_ptb.py") or log.columns != experiment["columns"]
                or any(config.get(key) != experiment[key] for key in ("task", "hidden", "batch"))
                or not (experiment.get("any_lr") or math.isclose(config.get("lr", 0), PAPER_LR))):
            continue
        at = log.columns.index(experiment["value"])
        with numbers(path):
            curve = {int(row[0]): experiment["convert"](row[at]) for _, row in log.rows
                     if row[at]}
            test = [float(line.split()[2]) for line in log.comments
                    if line.startswith("test BPC ")]
            last = int(log.rows[-1][1][0]) if log.rows else 0
        runs.append(({**config, "log": os.path.join(folder, os.path.basename(path)),
                      "test_bpc": test[-1] if test else None, "last_step": last}, curve))
    return sorted(runs, key=lambda run: (not is_main(run[0], experiment),
                                         METHOD_ORDER.index(run[0]["method"]),
                                         run[0]["rank"] or 0, run[0]["trunc"] or 0,
                                         -run[0]["lr"], run[0]["seed"], run[0].get("steps", 0)))


def main_runs(results, experiment):
    """our_runs of OK at the paper's rank with the default Adam (is_main), in their order."""
    return [(config, curve) for config, curve in our_runs(results, experiment)
            if is_main(config, experiment)]


def run_name(config, runs):
    """'seed 1', or 'seed 1, 100k steps' where runs (the configs of one method's runs) hold more
    than one run of config's seed, such as a longer run made later."""
    repeated = sum(c["seed"] == config["seed"] for c in runs) > 1
    return f"seed {config['seed']}" + (f", {steps_name(config['steps'])} steps" if repeated else "")


def steps_name(steps):
    """10k, 250k, 1M, 1.5M."""
    return f"{steps / 1e6:g}M" if steps >= 1_000_000 else f"{steps // 1000}k"


def steps_heads(steps, what=""):
    """A table's step columns: 'T at 25k steps', '50k', '100k' (what: 'T at')."""
    return [f"{what} {steps_name(steps[0])} steps".lstrip()] + [steps_name(s) for s in steps[1:]]


def is_main(config, experiment):
    """True for OK at the rank the paper reports for this experiment, with the runners' default
    Adam (the seeds the table takes the median of)."""
    return (config["method"] == "ok" and config["rank"] == experiment["rank"]
            and config["adam"] == "kingma-ba")


def authors_runs(results, experiment):
    """The authors' runs -> list of curves {step: value}: T (copy), or the validation BPC on the
    standard files (PTB)."""
    path = os.path.join(results, experiment["paper"])
    if not os.path.exists(path):
        raise UserError(f"{path} is missing: it comes with the repository (git checkout -- "
                        f"results/{experiment['paper']})")
    log = read_csv(path)
    if experiment["paper_value"] not in log.columns:
        raise UserError(f"{path}: no column '{experiment['paper_value']}'; is the file damaged?")
    at, runs = log.columns.index(experiment["paper_value"]), {}
    with numbers(path):
        for _, row in log.rows:
            runs.setdefault(row[0], {})[int(row[1])] = experiment["convert"](row[at])
    return list(runs.values())


# --- The table ----------------------------------------------------------------------------------


def table(results):
    """docs/results.md's markdown tables of the runs at the paper's sizes: the first 100k steps
    and, for each run of ours that reaches a step the authors validated beyond the table's first
    two, every such step; then the runs to 1M steps against TBPTT (long_table)."""
    text = ("**Copy task**, n 128, B 16, OK rank 16, lr 10^-3.5: curriculum T reached\n\n"
            + experiment_table(results, COPY)
            + "\n\n**Character-level PTB**, n 256, B 32, OK rank 8, lr 10^-3.5: validation BPC on "
              "the standard files\n\n" + experiment_table(results, PTB))
    for long_run in points_tables(results, PTB):
        text += "\n\n" + long_run
    return (text + "\n\n**Copy task to 1M steps**, n 128, B 16, lr 10^-3.5: curriculum T "
                   "reached\n\n" + long_table(results, COPY_1M)
            + "\n\n**Character-level PTB to 1M steps**, n 256, B 32, OK at lr 10^-3.5, TBPTT on "
              "the paper's grid: validation BPC on the standard files\n\n"
            + long_table(results, PTB_1M))


def glance(results):
    """The README's two tables against TBPTT (glance_table)."""
    return glance_table(results, COPY_1M) + "\n\n" + glance_table(results, PTB_1M)


def points_tables(results, experiment):
    """A table a run of ours at the paper's rank that the authors' validation steps reach past
    the table's second step (PTB's 100k run): its value at each of their steps, their min-max,
    and how far it lies above their highest (below their lowest, negative; 0 inside)."""
    theirs, fmt, tables = authors_runs(results, experiment), experiment["fmt"], []
    steps = sorted({s for curve in theirs for s in curve if s <= experiment["max_step"]})
    ours = main_runs(results, experiment)
    for config, curve in ours:
        at = [s for s in steps if s in curve]
        if not at or at[-1] <= experiment["table_steps"][1]:
            continue
        name = run_name(config, [c for c, _ in ours])
        lines = [f"**OK rank {experiment['rank']}, {name}**, against the authors' runs at their "
                 f"validation steps (`results/{config['log']}`)", "",
                 f"| steps | ours | authors' code, {len(theirs)} runs (min-max) | ours above "
                 "their range |", "|---|---|---|---|"]
        for s in at:
            values = [c[s] for c in theirs if s in c]
            above = max(curve[s] - max(values), 0.0) - max(min(values) - curve[s], 0.0)
            lines.append(f"| {steps_name(s)} | {fmt(curve[s])} | {spread(values, fmt)} | "
                         f"{fmt(above)} |")
        tables.append("\n".join(lines))
    return tables


def experiment_table(results, experiment):
    """Ours (each seed of OK at the paper's rank, then their median) beside the authors' spread,
    one column per table step; '-' where a run has not reached the step (a median needs every
    seed there)."""
    steps, fmt, rank = experiment["table_steps"], experiment["fmt"], experiment["rank"]
    lines = ["| run | " + " | ".join(steps_heads(steps, experiment["what"])) + " | log |",
             "|---" * (len(steps) + 2) + "|"]

    def row(name, values, log):
        cells = ["-" if value is None else value for value in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {log} |")

    ours = main_runs(results, experiment)
    for config, curve in ours:
        row(f"OK rank {rank}, {run_name(config, [c for c, _ in ours])}",
            [fmt(curve[s]) if s in curve else None for s in steps], f"`results/{config['log']}`")
    seeds = list({config["seed"]: curve for config, curve in reversed(ours)}.values())
    if len(seeds) > 1:  # one run a seed: its first (the shortest)
        row(f"OK rank {rank}, median of {len(seeds)} seeds",
            [fmt(statistics.median(curve[s] for curve in seeds))
             if all(s in curve for curve in seeds) else None for s in steps], "")
    theirs = authors_runs(results, experiment)
    row(f"authors' code, {len(theirs)} runs (min-max)",
        [spread([curve[s] for curve in theirs if s in curve], fmt) for s in steps],
        f"`results/{experiment['paper']}`")
    return "\n".join(lines)


def spread(values, fmt):
    """'low-high' of values as fmt writes them ('low' alone when they agree; None for none)."""
    if not values:
        return None
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}-{high}"


# --- The runs to 1M steps: the paper's claims against TBPTT --------------------------------------


def long_ok_runs(results, experiment):
    """Our runs of OK at the paper's rank of 100k steps or more: the 100k runs of results/,
    then those of results/1m/ -> list of (config, curve)."""
    return ([run for run in main_runs(results, experiment["base"]) if run[0]["steps"] >= 100_000]
            + main_runs(results, experiment))


def tbptt_picks(results, experiment):
    """Per truncation K of our TBPTT runs, the learning rate that the paper's rule picks among the
    runs of seed 1 (tools.sweep.pick: the best median of each run's best value), with that
    learning rate's runs -> list of (K, lr, runs)."""
    key = METRICS[experiment["task"]][0][0]
    runs = [(config, curve) for config, curve in our_runs(results, experiment)
            if config["method"] == "tbptt" and curve]
    picks = []
    for K in sorted({config["trunc"] for config, _ in runs}):
        rows = [{"lr": config["lr"], "values": {key: [experiment["best"](curve.values())]}}
                for config, curve in runs if config["trunc"] == K and config["seed"] == 1]
        best, _ = pick(experiment["task"], rows)
        if best is not None:
            picks.append((K, best["lr"], [(config, curve) for config, curve in runs
                                          if config["trunc"] == K and config["lr"] == best["lr"]]))
    return picks


def best_tbptt_at(results, experiment, step):
    """The TBPTT run of ours with the best value at step (lowest BPC, highest T; the first in
    our_runs' order of equals), or None."""
    sign = 1 if experiment["best"] is min else -1
    runs = [(config, curve) for config, curve in our_runs(results, experiment)
            if config["method"] == "tbptt" and step in curve]
    return min(runs, key=lambda run: sign * run[1][step], default=None)


def extra_columns(experiment):
    """The columns after the steps': PTB's best validation and test BPC of its weights."""
    return ["best valid", "test"] if experiment["task"] == "ptb" else []


def authors_cells(theirs, experiment, steps):
    """The authors' row: their min-max at each step, then (PTB) their best validation up to the
    experiment's last step; they have no test BPC."""
    fmt, last = experiment["fmt"], experiment["max_step"]
    cells = [spread([curve[s] for curve in theirs if s in curve], fmt) for s in steps]
    if extra_columns(experiment):
        cells += [spread([experiment["best"](v for s, v in curve.items() if s <= last)
                          for curve in theirs], fmt), None]
    return cells


def long_cells(runs, experiment, steps):
    """A row's cells over runs (one run, or the seeds of one): at each step the value, or the
    min-max of the runs, None unless every run has reached it; for PTB then the best validation
    and the test BPC of its weights, the same way."""
    fmt, curves = experiment["fmt"], [curve for _, curve in runs]
    cells = [spread([curve[s] for curve in curves], fmt) if all(s in c for c in curves)
             else None for s in steps]
    if experiment["task"] == "ptb":
        cells.append(spread([experiment["best"](curve.values()) for curve in curves], fmt)
                     if all(curves) else None)
        tests = [config["test_bpc"] for config, _ in runs]
        cells.append(spread(tests, fmt) if None not in tests else None)
    return cells


def long_name(runs):
    """'TBPTT-25 (ours), lr 10^-3, seed 1', 'TBPTT-25 (ours), lr 10^-3, seeds 1-3 (min-max)', 'OK
    rank 16 (ours), seed 1, 1M steps (running: at 130k)' for one run or the seeds of one."""
    config, seeds = runs[0][0], sorted(config["seed"] for config, _ in runs)
    name = method_label(config) + " (ours)"
    if config["method"] == "tbptt":
        name += f", lr {lr_name(config['lr'])}"
    if len(runs) == 1:
        name += f", seed {config['seed']}"
    elif seeds == list(range(seeds[0], seeds[-1] + 1)):
        name += f", seeds {seeds[0]}-{seeds[-1]} (min-max)"
    else:
        name += f", seeds {', '.join(map(str, seeds))} (min-max)"
    if config["method"] == "ok":  # OK's runs differ in length, TBPTT's do not
        name += f", {steps_name(config['steps'])} steps"
    return name + running(min((config for config, _ in runs), key=lambda c: c["last_step"]))


def running(config):
    """' (running: at 130k)' for a run that has not reached its steps, else ''."""
    last = config["last_step"]
    return f" (running: at {steps_name(last)})" if last < config["steps"] else ""


def long_table(results, experiment):
    """docs/results.md's table of the runs to 1M steps: OK's (ours, each run, and the authors'),
    then every TBPTT run and, per truncation, the seeds of the learning rate the paper's rule
    picks; for PTB also each run's best validation and the test BPC of its weights."""
    steps, theirs = experiment["table_steps"], authors_runs(results, experiment)
    extra = extra_columns(experiment)
    lines = ["| run | " + " | ".join(steps_heads(steps, experiment["what"]) + extra) + " | log |",
             "|---" * (len(steps) + len(extra) + 2) + "|"]

    def row(name, cells, log=""):
        lines.append(f"| {name} | " + " | ".join("-" if c is None else c for c in cells)
                     + f" | {log} |")

    for run in long_ok_runs(results, experiment):
        row(long_name([run]), long_cells([run], experiment, steps), f"`results/{run[0]['log']}`")
    row(f"OK rank {experiment['rank']}, authors' code, {len(theirs)} runs (min-max)",
        authors_cells(theirs, experiment, steps), f"`results/{experiment['paper']}`")
    picks = {K: runs for K, _, runs in tbptt_picks(results, experiment)}
    for run in our_runs(results, experiment):
        if run[0]["method"] == "tbptt":
            row(long_name([run]), long_cells([run], experiment, steps),
                f"`results/{run[0]['log']}`")
            group = picks.get(run[0]["trunc"], [])
            if len(group) > 1 and run == group[-1]:  # the picked seeds' row after the last
                row(long_name(group).replace(", seeds", " (picked), seeds"),
                    long_cells(group, experiment, steps))
    return "\n".join(lines)


def glance_table(results, experiment):
    """The README's table of an experiment against TBPTT, at experiment["glance_steps"]: OK's runs
    (ours, the seeds of one length together; the authors'), TBPTT at each truncation's picked
    learning rate, the TBPTT run best at 100k steps if it is not one of those, and our other
    baselines' seed 1 in one row, their values side by side."""
    steps, theirs = experiment["glance_steps"], authors_runs(results, experiment)
    extra = extra_columns(experiment)
    lines = [f"| {experiment['glance']} | " + " | ".join(steps_heads(steps) + extra) + " |",
             "|---" * (len(steps) + len(extra) + 1) + "|"]

    def row(name, cells):
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(c or "" for c in cells) + " |")

    ok = main_runs(results, experiment["base"]) + main_runs(results, experiment)
    for length in dict.fromkeys(config["steps"] for config, _ in ok):
        group = [run for run in ok if run[0]["steps"] == length]
        row(long_name(group), long_cells(group, experiment, steps))
    row(f"OK rank {experiment['rank']}, authors' code, {len(theirs)} runs (min-max)",
        authors_cells(theirs, experiment, steps))
    picks = tbptt_picks(results, experiment)
    for _, _, group in picks:
        row(long_name(group), long_cells(group, experiment, steps))
    first = best_tbptt_at(results, experiment, 100_000)
    if first and all(first not in group for _, _, group in picks):
        row(long_name([first]) + ", the best TBPTT at 100k",
            long_cells([first], experiment, steps))
    base = experiment["base"]
    others = [(config, curve) for config, curve in our_runs(results, base)
              if config["method"] != "tbptt" and config["seed"] == 1
              and not (config["method"] == "ok" and config["rank"] == base["rank"])]
    if others:
        cells = [long_cells([run], experiment, steps) for run in others]
        row(", ".join(method_label(config) for config, _ in others) + " (ours), seed 1",
            [", ".join(column) if None not in column else None for column in zip(*cells)])
    return "\n".join(lines)


# --- The figures --------------------------------------------------------------------------------


def draw_runs(ax, results, experiment, drawstyle, marked, minus=None, runs=None):
    """Ours and the authors' runs up to the figure's last step, in the legend's order: OK at the
    paper's rank (C0, one line style per seed and, where points are marked, one marker), the
    authors' runs (thin, grey, one entry; points where the experiment says so), our baselines
    (each in its colour). With minus ({step: value}), each run is drawn at those steps only, as
    its value minus minus[step]. runs: ours to draw (default: our_runs)."""
    last, theirs = experiment["max_step"], authors_runs(results, experiment)

    def draw(curve, **style):
        steps = sorted(s for s in curve if s <= last and (minus is None or s in minus))
        ax.plot(steps, [curve[s] - (minus[s] if minus else 0) for s in steps],
                drawstyle=drawstyle, **style)

    ours, seeds_drawn = our_runs(results, experiment) if runs is None else runs, {}

    def draw_ours(config, curve, **style):
        """One of our runs, in the next line style (and marker) for its method."""
        name = method_label(config)
        k = seeds_drawn[name] = seeds_drawn.get(name, -1) + 1
        mark = {"marker": MARKERS[k % len(MARKERS)], "ms": 4} if marked else {}
        draw(curve, ls=LINESTYLES[k % len(LINESTYLES)], **mark, **style)

    main = [config for config, _ in ours if is_main(config, experiment)]
    for config, curve in ours:
        if is_main(config, experiment):
            draw_ours(config, curve, color="C0", lw=2.0, zorder=3,
                      label=f"{method_label(config)} (ours), {run_name(config, main)}"
                      + running(config))
    authors = (dict(ls="none", marker="x", ms=experiment.get("paper_ms", 7), mew=1.2)
               if experiment["paper_points"]
               else dict(lw=0.9, marker="o" if marked else None, ms=3))
    for i, curve in enumerate(theirs):
        draw(curve, color=AUTHORS, zorder=1, **authors, label=None if i else
             f"OK rank {experiment['rank']}, authors' code, {len(theirs)} runs")
    for config, curve in ours:
        if not is_main(config, experiment):
            draw_ours(config, curve, color=COLOURS.get(method_label(config), "k"), lw=1.2,
                      zorder=2, label=f"{method_label(config)}"
                      + (f", lr {lr_name(config['lr'])}" if experiment.get("any_lr") else "")
                      + f", seed {config['seed']}" + running(config))


def steps_axis(ax, low, high, every):
    """Steps low to high on the x axis (and 2% more, so a last point is not on the frame), a
    tick every `every` steps, written 0, 10k, 20k, ..., 1M"""
    ax.set_xticks(range(-(-low // every) * every, high + 1, every))
    ax.set_xlim(low, high + (high - low) * 0.02)  # after the ticks, which would widen it
    ax.xaxis.set_major_formatter(lambda x, _: steps_name(int(x)) if x else "0")


def draw_copy(plt, results, path, experiment=COPY):
    """Curriculum T against training steps: the first 100k steps (COPY), or OK against TBPTT to
    1M (COPY_1M, long_runs_drawn)."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    draw_runs(ax, results, experiment, "steps-post", marked=False,
              runs=long_runs_drawn(results, experiment) if "folder" in experiment else None)
    ax.set(ylim=(0, None), xlabel="training steps", ylabel="curriculum length T reached",
           title=experiment["title"])
    ax.yaxis.get_major_locator().set_params(integer=True)
    steps_axis(ax, 0, experiment["max_step"], experiment["max_step"] // 10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", handlelength=LEGEND_HANDLE)
    fig.tight_layout()
    save_figure(plt, fig, path)
    print(f"plot: {path}")


def authors_median(results, experiment):
    """{step: the median of the authors' runs} at every step they validated."""
    theirs = authors_runs(results, experiment)
    return {s: statistics.median(curve[s] for curve in theirs if s in curve)
            for s in {s for curve in theirs for s in curve}}


def draw_ptb(plt, results, path):
    """Validation BPC against training steps, 0-100k: all runs (left), and at the authors'
    validation steps each run minus their median (right: the few hundredths of BPC between
    OK's runs, invisible on the left), one legend below both."""
    fig, (full, gap) = plt.subplots(1, 2, figsize=(12, 6))
    draw_runs(full, results, PTB, "default", marked=True)
    draw_runs(gap, results, PTB, "default", marked=True, minus=authors_median(results, PTB))
    gap.axhline(0.0, color=AUTHORS, lw=0.8, zorder=0)
    for ax in (full, gap):
        ax.grid(alpha=0.3)
        steps_axis(ax, 0, PTB["max_step"], 10_000)
    full.set(title="all runs", xlabel="training steps", ylabel="validation BPC (standard files)")
    gap.set(ylim=PTB_GAP, title="minus the authors' median, at their validation steps",
            xlabel="training steps", ylabel="validation BPC minus the authors' median")
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9,
               handlelength=LEGEND_HANDLE)
    fig.suptitle("Character-level PTB, n 256, batch 32, lr 10^-3.5: validation BPC against steps")
    rows = -(-len(labels) // 4)  # the legend's rows, below the panels
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 1))
    save_figure(plt, fig, path)
    print(f"plot: {path}")


def long_runs_drawn(results, experiment):
    """Ours in the figures to 1M steps: OK's long runs, every TBPTT run at its truncation's
    picked learning rate, and the TBPTT run best at 100k steps."""
    runs = long_ok_runs(results, experiment)
    for _, _, group in tbptt_picks(results, experiment):
        runs += group
    first = best_tbptt_at(results, experiment, 100_000)
    return runs + ([first] if first and first not in runs else [])


def draw_ptb_1m(plt, results, path):
    """Validation BPC against training steps, 0-1M (left) and the last stretch (right, where
    the runs lie a few hundredths apart): OK (ours to 100k, the authors') against TBPTT."""
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 6))
    runs = long_runs_drawn(results, PTB_1M)
    for ax in (full, zoom):
        draw_runs(ax, results, PTB_1M, "default", marked=False, runs=runs)
        ax.grid(alpha=0.3)
    steps_axis(full, 0, PTB_1M["max_step"], 100_000)
    (low, high), bpc = PTB_1M_ZOOM
    steps_axis(zoom, low, high, 100_000)
    full.set(title="all steps", xlabel="training steps", ylabel="validation BPC (standard files)")
    zoom.set(ylim=bpc, title=f"from {steps_name(low)} steps", xlabel="training steps",
             ylabel="validation BPC (standard files)")
    handles, labels = full.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9,
               handlelength=LEGEND_HANDLE)
    fig.suptitle("Character-level PTB, n 256, batch 32: OK (lr 10^-3.5) against TBPTT to 1M "
                 "steps")
    rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * rows, 1, 1))
    save_figure(plt, fig, path)
    print(f"plot: {path}")


# --- Command line -------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m tools.{PROG}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", action="store_true",
                        help="print the table only; draw nothing (needs no matplotlib)")
    parser.add_argument("--results", default=RESULTS, metavar="DIR",
                        help="the folder of the logs, where the figures go (default: results/ "
                             "beside this script)")
    args = parser.parse_args(argv)
    plt = None if args.table else matplotlib_pyplot()
    if not args.table and plt is None:
        print(f"{PROG} needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    try:
        if not os.path.isdir(args.results):
            raise UserError(f"no folder {args.results}; give the folder of the logs with --results")
        text = table(args.results)
        if not args.table:
            for draw, experiment in ((draw_copy, COPY), (draw_ptb, PTB),
                                     (functools.partial(draw_copy, experiment=COPY_1M), COPY_1M),
                                     (draw_ptb_1m, PTB_1M)):
                draw(plt, args.results,
                     os.path.relpath(os.path.join(args.results, experiment["figure"])))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(text + "\n\nThe README's tables:\n\n" + glance(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
