"""Turn the benchmark rows of bench/results/*.jsonl into PNG charts (docs/benchmarks.md shows them).

    python bench/plot.py                      # bench/results/*.jsonl -> bench/results/plots/
    python bench/plot.py --results DIR --out DIR

Charts, one per kind of row, each titled with the machine the rows came from (one chart per
machine when rows of several machines are present):

  model_<machine>.png    model-only clips/s per configuration (bench_model.py), MFU on the bars
  loaders_<machine>.png  data pipeline clips/s per loader (bench_data.py, median with the
                         min-max range) and end-to-end training vs model-only (bench_train.py)
  loss_<machine>.png     contrastive-loss time per batch size, per implementation, pass and D
                         (bench_loss.py), log-log

Where several rows share a configuration, the newest one is drawn.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_rows(results: Path) -> dict[str, list[dict]]:
    """bench name -> rows (every *.jsonl under `results`), bad lines reported and skipped."""
    out = defaultdict(list)
    for f in sorted(results.glob("*.jsonl")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"plot: {f}:{n}: not JSON ({e}); line skipped", file=sys.stderr)
                continue
            out[r.get("bench", f.stem)].append(r)
    return out


def machine_label(r: dict) -> str:
    m = r.get("machine", {})
    if m.get("cuda"):
        return m.get("gpu") or "GPU"
    return f"CPU {m.get('cpu_count', '?')} cores"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


def newest(rows: list[dict], key) -> list[dict]:
    """The newest row of each configuration, in first-seen order of the configurations."""
    last = {}
    for r in sorted(rows, key=lambda r: r.get("date", "")):
        last[key(r)] = r
    order = []
    for r in rows:
        k = key(r)
        if k not in order:
            order.append(k)
    return [last[k] for k in order]


def by_machine(rows: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[machine_label(r)].append(r)
    return groups


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_model(rows, machine, out: Path) -> Path:
    plt = _plt()
    rows = newest(rows, lambda r: (r["model"], r["precision"], r.get("channels_last"),
                                   r.get("compile"), r["batch"], tuple(r.get("input", ()))))
    labels = [f"{r['model']} {r['precision']} b{r['batch']}"
              f"{' CL' if r.get('channels_last') else ''}{' compiled' if r.get('compile') else ''}"
              for r in rows]
    vals = [r["clips_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    bars = ax.barh(range(len(rows)), vals, color="tab:blue")
    for b, r in zip(bars, rows):
        if r.get("mfu") is not None:
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" MFU {100 * r['mfu']:.0f} %",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training clips/s (model only, batch on the device)")
    ax.set_title(f"bench_model.py on {machine}")
    return save(fig, out / f"model_{slug(machine)}.png")


def plot_loaders(data_rows, train_rows, machine, out: Path) -> Path:
    plt = _plt()
    data_rows = newest(data_rows, lambda r: (r["loader"], r.get("device"), r.get("batch_size"),
                                             r.get("workers"), r.get("pairs")))
    train_rows = newest(train_rows, lambda r: (r["loader"], r.get("model"), r.get("batch"),
                                               r.get("workers")))
    n = (1 if data_rows else 0) + (1 if train_rows else 0)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 3.5), squeeze=False)
    col = 0
    if data_rows:
        ax = axes[0][col]
        col += 1
        med = [r["clips_per_s_median"] for r in data_rows]
        lo = [m - r.get("clips_per_s_min", m) for m, r in zip(med, data_rows)]
        hi = [r.get("clips_per_s_max", m) - m for m, r in zip(med, data_rows)]
        ax.bar(range(len(med)), med, yerr=[lo, hi], capsize=4, color="tab:green")
        ax.set_xticks(range(len(med)), [f"{r['loader']} ({r.get('device')})\nbatch "
                                        f"{r.get('batch_size')}, {r.get('workers')} workers"
                                        for r in data_rows], fontsize=8)
        ax.set_ylabel("clips/s (loader alone)")
        ax.set_title("bench_data.py: median, min-max", fontsize=10)
    if train_rows:
        ax = axes[0][col]
        x = range(len(train_rows))
        ax.bar([i - 0.2 for i in x], [r["clips_per_s"] for r in train_rows], 0.4,
               label="end to end", color="tab:orange")
        ax.bar([i + 0.2 for i in x], [r["model_only_clips_per_s"] for r in train_rows], 0.4,
               label="model only", color="tab:gray")
        for i, r in zip(x, train_rows):
            ax.text(i, max(r["clips_per_s"], r["model_only_clips_per_s"]),
                    f"{r['ratio_to_model_only']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [f"{r['loader']}\n{r.get('model', '')}" for r in train_rows],
                      fontsize=8)
        ax.set_ylabel("training clips/s")
        top = max(max(r["clips_per_s"], r["model_only_clips_per_s"]) for r in train_rows)
        ax.set_ylim(0, 1.3 * top)                  # room for the legend above the bars
        ax.legend(fontsize=8, ncol=2, loc="upper center")
        ax.set_title("bench_train.py: end to end / model only", fontsize=10)
    fig.suptitle(f"loaders on {machine}")
    return save(fig, out / f"loaders_{slug(machine)}.png")


def plot_loss(rows, machine, out: Path) -> Path:
    plt = _plt()
    rows = [r for r in rows if "median_ms" in r]
    for r in rows:   # rows from before InfoNCE had a kernel are the margin loss's
        r.setdefault("loss", "contrastive")
    rows = newest(rows, lambda r: (r["loss"], r["impl"], r["pass_"], r["B"], r["M"], r["D"],
                                   r["dtype"]))
    panels = sorted({(r["loss"], r["pass_"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (loss, ps) in zip(axes[0], panels):
        lines = defaultdict(list)
        for r in rows:
            if (r["loss"], r["pass_"]) == (loss, ps):
                lines[(r["impl"], r["D"], r["dtype"])].append((r["B"], r["median_ms"]))
        for (impl, D, dtype), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{impl} D={D} {dtype}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("B (M = 2B)")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{loss} {ps}")
        ax.legend(fontsize=7)
    fig.suptitle(f"in-batch losses (bench_loss.py) on {machine}")
    return save(fig, out / f"loss_{slug(machine)}.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--out", default=str(HERE / "results" / "plots"))
    args = p.parse_args(argv)
    try:
        _plt()
    except ImportError:
        print("plot: matplotlib is not installed: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(Path(args.results))
    made = []
    for machine, rs in by_machine(rows.get("model", [])).items():
        made.append(plot_model(rs, machine, out))
    data, train = by_machine(rows.get("data", [])), by_machine(rows.get("train", []))
    for machine in sorted(set(data) | set(train)):
        made.append(plot_loaders(data.get(machine, []), train.get(machine, []), machine, out))
    for machine, rs in by_machine(rows.get("loss", [])).items():
        if any("median_ms" in r for r in rs):
            made.append(plot_loss(rs, machine, out))
    for m in made:
        print(f"plot: wrote {m}")
    if not made:
        print(f"plot: no benchmark rows in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
