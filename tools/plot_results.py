"""One command redraws every figure from the logs in results/ and prints the tables of
the runs at the paper's sizes, ours beside the authors' (Benzing et al., ICML 2019, arXiv
1902.03993).

    python -m tools.plot_results          # results/*-paper-size.png and the table
    python -m tools.plot_results --table  # the table only (needs no matplotlib)

Our logs are the CSV files the runners write with --log: a '#' line holding the run's config as
JSON, the column names, a row every --log-every steps and, for PTB, a last '#' line with the test
BPC. Each log is recognised by its config (task, size, learning rate, method, rank, seed), not by
its file name; logs of other sizes and the noise logs are left out. A run still going is drawn as
far as it has got. The authors' numbers are results/paper-copy-n128-ok16-T.csv and
results/paper-ptb-n256-ok8-valid.csv; their '#' lines say where they come from. The logs are read
by runfiles.py (standard library only), so the table needs neither numpy nor Numba; only drawing
needs matplotlib.
"""
import argparse
import contextlib
import glob
import math
import os
import statistics
import sys

from tools.runfiles import UserError, log_config, matplotlib_pyplot, read_log, save_figure

PROG = "plot_results"  # its messages' prefix; run it as python -m tools.plot_results
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
PAPER_LR = 10 ** -3.5

# The two experiments at the paper's sizes: which of our logs belong (task, size; the learning
# rate is the paper's 10^-3.5 in both; logs without a runner's config line, such as the
# authors' files, are no runs of ours), the log's columns and the one drawn, the OK rank the paper
# reports, the authors' file and column, the steps the table reports and how it writes a value,
# the figure, and whether the authors' runs are drawn as points rather than lines.
COPY = {"task": "copy", "hidden": 128, "batch": 16, "rank": 16,
        "columns": ["step", "T", "avg_bits", "steps_per_s"], "value": "T", "convert": int,
        "paper": "paper-copy-n128-ok16-T.csv", "paper_value": "T",
        "table_steps": (25_000, 50_000, 100_000), "what": "T at", "fmt": "{:g}".format,
        "figure": "copy-paper-size.png", "max_step": 100_000, "paper_points": False}
PTB = {"task": "ptb", "hidden": 256, "batch": 32, "rank": 8,
       "columns": ["step", "train_bits", "valid_bpc", "chars_per_s"], "value": "valid_bpc",
       "convert": float, "paper": "paper-ptb-n256-ok8-valid.csv",
       "paper_value": "valid_bpc_standard_files",
       "table_steps": (10_000, 20_000, 50_000, 100_000), "what": "valid BPC at",
       "fmt": "{:.3f}".format, "figure": "ptb-paper-size.png", "max_step": 100_000,
       "paper_points": True}  # validated every 10k steps: points, which a line would make a curve
PTB_GAP = (-0.04, 0.06)  # the right panel's range: ours minus the authors' median, in BPC

METHOD_ORDER = ("ok", "kf", "kf-avg", "uoro", "rtrl", "tbptt")
# One colour per baseline in both figures; OK at the paper's rank is C0, the authors' runs grey.
COLOURS = {"OK rank 1": "C1", "KF-RTRL": "C2", "UORO": "C3", "TBPTT-5": "C4", "TBPTT-10": "C5",
           "TBPTT-20": "C6", "exact RTRL": "C7", "OK rank 8, TensorFlow's Adam": "C9"}
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
    """Our logs of an experiment at the paper's size and learning rate, sorted: OK at the paper's
    rank first, then the baselines, each by seed -> list of (config, curve), curve = {step:
    value} of T (copy) or of the validation BPC (PTB, rows with a validation only)."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "*.csv"))):
        log = read_csv(path)
        prog, config = log_config(path, log) or (None, None)
        if (prog not in ("run_copy.py", "run_ptb.py") or log.columns != experiment["columns"]
                or any(config.get(key) != experiment[key] for key in ("task", "hidden", "batch"))
                or not math.isclose(config.get("lr", 0), PAPER_LR)):
            continue
        at = log.columns.index(experiment["value"])
        with numbers(path):
            curve = {int(row[0]): experiment["convert"](row[at]) for _, row in log.rows
                     if row[at]}
        runs.append(({**config, "log": os.path.basename(path)}, curve))
    return sorted(runs, key=lambda run: (not is_main(run[0], experiment),
                                         METHOD_ORDER.index(run[0]["method"]),
                                         run[0]["rank"] or 0, run[0]["trunc"] or 0,
                                         run[0]["seed"], run[0].get("steps", 0)))


def main_runs(results, experiment):
    """our_runs of OK at the paper's rank with the default Adam (is_main), in their order."""
    return [(config, curve) for config, curve in our_runs(results, experiment)
            if is_main(config, experiment)]


def run_name(config, runs):
    """'seed 1', or 'seed 1, 100k steps' where runs (the configs of one method's runs) hold more
    than one run of config's seed, such as a longer run made later."""
    repeated = sum(c["seed"] == config["seed"] for c in runs) > 1
    return f"seed {config['seed']}" + (f", {config['steps'] // 1000}k steps" if repeated else "")


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
    """docs/results.md's markdown tables of the runs at the paper's sizes, and, for each run of ours
    that reaches a step the authors validated beyond the table's first two, every such step."""
    text = ("**Copy task**, n 128, B 16, OK rank 16, lr 10^-3.5: curriculum T reached\n\n"
            + experiment_table(results, COPY)
            + "\n\n**Character-level PTB**, n 256, B 32, OK rank 8, lr 10^-3.5: validation BPC on "
              "the standard files\n\n" + experiment_table(results, PTB))
    for long_run in points_tables(results, PTB):
        text += "\n\n" + long_run
    return text


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
            lines.append(f"| {s // 1000}k | {fmt(curve[s])} | {spread(values, fmt)} | "
                         f"{fmt(above)} |")
        tables.append("\n".join(lines))
    return tables


def experiment_table(results, experiment):
    """Ours (each seed of OK at the paper's rank, then their median) beside the authors' spread,
    one column per table step; '-' where a run has not reached the step (a median needs every
    seed there)."""
    steps, fmt, rank = experiment["table_steps"], experiment["fmt"], experiment["rank"]
    head = [f"{experiment['what']} {steps[0] // 1000}k steps"] + [f"{s // 1000}k"
                                                                  for s in steps[1:]]
    lines = ["| run | " + " | ".join(head) + " | log |", "|---" * (len(steps) + 2) + "|"]

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


# --- The figures --------------------------------------------------------------------------------


def draw_runs(ax, results, experiment, drawstyle, marked, minus=None):
    """Ours and the authors' runs up to the figure's last step, in the legend's order: OK at the
    paper's rank (C0, one line style per seed and, where points are marked, one marker), the
    authors' runs (thin, grey, one entry; points where the experiment says so), our baselines
    (each in its colour). With minus ({step: value}), each run is drawn at those steps only, as
    its value minus minus[step]."""
    last, theirs = experiment["max_step"], authors_runs(results, experiment)

    def draw(curve, **style):
        steps = sorted(s for s in curve if s <= last and (minus is None or s in minus))
        ax.plot(steps, [curve[s] - (minus[s] if minus else 0) for s in steps],
                drawstyle=drawstyle, **style)

    ours, seeds_drawn = our_runs(results, experiment), {}

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
                      label=f"{method_label(config)} (ours), {run_name(config, main)}")
    authors = (dict(ls="none", marker="x", ms=7, mew=1.2) if experiment["paper_points"]
               else dict(lw=0.9, marker="o" if marked else None, ms=3))
    for i, curve in enumerate(theirs):
        draw(curve, color=AUTHORS, zorder=1, **authors, label=None if i else
             f"OK rank {experiment['rank']}, authors' code, {len(theirs)} runs")
    for config, curve in ours:
        if not is_main(config, experiment):
            draw_ours(config, curve, color=COLOURS.get(method_label(config), "C8"), lw=1.2,
                      zorder=2, label=f"{method_label(config)}, seed {config['seed']}")


def steps_axis(ax, low, high, every):
    """Steps low to high on the x axis (and 2% more, so a last point is not on the frame), a
    tick every `every` steps, written 0, 10k, 20k, ..."""
    ax.set_xticks(range(-(-low // every) * every, high + 1, every))
    ax.set_xlim(low, high + (high - low) * 0.02)  # after the ticks, which would widen it
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k" if x else "0")


def draw_copy(plt, results, path):
    """Curriculum T against training steps, 0-100k."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    draw_runs(ax, results, COPY, "steps-post", marked=False)
    ax.set(ylim=(0, None), xlabel="training steps",
           ylabel="curriculum length T reached",
           title="Copy task, n 128, batch 16, lr 10^-3.5: curriculum T against steps")
    ax.yaxis.get_major_locator().set_params(integer=True)
    steps_axis(ax, 0, COPY["max_step"], 10_000)
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
            for draw, experiment in ((draw_copy, COPY), (draw_ptb, PTB)):
                draw(plt, args.results,
                     os.path.relpath(os.path.join(args.results, experiment["figure"])))
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
