#!/usr/bin/env python3
"""Draws a pyralog-bench --timeline file as a PNG: throughput (messages/s and MB/s) above,
latency (p50, p99, max in ms, log scale) below, both against the seconds of the run, with the
seconds that counted errors marked. A stall shows as the seconds it lasted, not as an average.

Usage: scripts/plot-bench.py FILE [-o OUT.png] [--title TEXT]
The PNG goes to OUT.png, by default FILE with its extension replaced by .png.
Needs matplotlib (pip install matplotlib); installs nothing itself.
"""

import argparse
import csv
import math
import os
import sys

COLUMNS = ["elapsed_s", "messages_per_s", "mb_per_s", "p50_ms", "p99_ms", "max_ms", "errors"]


def read_timeline(path):
    """The file's columns as lists of floats; an empty latency field (a second with no
    record) is NaN, which matplotlib leaves as a gap in the line."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"plot-bench: {path} is not a pyralog-bench --timeline file: no column {', '.join(missing)}")
        columns = {column: [] for column in COLUMNS}
        for row in reader:
            for column in COLUMNS:
                text = row[column].strip()
                columns[column].append(float(text) if text else math.nan)
    if not columns["elapsed_s"]:
        sys.exit(f"plot-bench: {path} has no rows: the run lasted less than a second or wrote nothing")
    return columns


def plot(columns, out, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        sys.exit("plot-bench: matplotlib is missing; install it with: pip install matplotlib")

    seconds = columns["elapsed_s"]
    figure, (throughput, latency) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    # A row covers the time since the previous one (the first, since 0): drawn as a step
    # ending at its time.
    steps = [0.0] + seconds
    rate = columns["messages_per_s"][:1] + columns["messages_per_s"]
    throughput.plot(steps, rate, color="tab:blue", label="messages/s", drawstyle="steps-pre")
    throughput.set_ylabel("messages/s")
    throughput.set_ylim(0, max(rate) * 1.15 or 1)
    throughput.grid(True, alpha=0.3)
    megabytes = throughput.twinx()
    mb_rate = columns["mb_per_s"][:1] + columns["mb_per_s"]
    megabytes.plot(steps, mb_rate, color="tab:green", linestyle="--", label="MB/s", drawstyle="steps-pre")
    megabytes.set_ylabel("MB/s")
    megabytes.set_ylim(0, max(mb_rate) * 1.15 or 1)
    lines = throughput.get_lines() + megabytes.get_lines()
    throughput.legend(lines, [line.get_label() for line in lines], loc="lower right")

    for column, color in (("p50_ms", "tab:blue"), ("p99_ms", "tab:orange"), ("max_ms", "tab:red")):
        latency.plot(seconds, columns[column], color=color, marker=".", label=column.replace("_ms", ""))
    if any(value > 0 for value in columns["p50_ms"] + columns["max_ms"] if not math.isnan(value)):
        latency.set_yscale("log")
        # Plain numbers at 1, 2 and 5 of each decade (0.5, 20, 100) rather than powers of ten.
        latency.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        latency.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        latency.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    latency.set_xlim(left=0)
    latency.set_ylabel("latency, ms")
    latency.set_xlabel("seconds since the start of the run")
    latency.grid(True, which="both", alpha=0.3)
    errored = [second for second, errors in zip(seconds, columns["errors"]) if errors and errors > 0]
    for second in errored:
        for axes in (throughput, latency):
            axes.axvline(second, color="red", alpha=0.25, linewidth=4)
    label = "errors (red bands)" if errored else "no errors"
    latency.legend(loc="upper right", title=label)

    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description="Draw a pyralog-bench --timeline file as a PNG.")
    parser.add_argument("file", help="the CSV written by pyralog-bench --timeline FILE")
    parser.add_argument("-o", "--output", help="the PNG to write (default: FILE with .png)")
    parser.add_argument("--title", help="the figure's title (default: the file's name)")
    args = parser.parse_args()
    out = args.output or os.path.splitext(args.file)[0] + ".png"
    plot(read_timeline(args.file), out, args.title or os.path.basename(args.file))
    print(f"plot-bench: wrote {out}")


if __name__ == "__main__":
    main()
