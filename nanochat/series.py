"""
Results of a sweep of base models (runs/miniseries.sh, runs/scaling_laws.sh): one CSV row per trained
checkpoint, read from its meta (never from log text), and the plots.

    python -m nanochat.series append results.csv --model-tag d12 [--label flops_budget=1e18]
    python -m nanochat.series has results.csv flops_budget=1e18 depth=12      # exit 0 if such a row exists
    python -m nanochat.series plot results.csv --x total_flops --y val_bpb --y core_score --out plot.png
    python -m nanochat.series plot results.csv --x params_total --y val_bpb --group flops_budget --out isoflops.png

A row: the labels given, then the model's shape and parameter counts (per group, as base_train prints them), its
FLOPs per token, the horizon actually trained (steps x the total batch it used), FLOPs, val bpb, CORE (empty when
not evaluated) and training time.
"""

import argparse
import csv
import math
import os
import sys


def checkpoint_row(model_tag, step=None):
    """The CSV fields of base_checkpoints/<model_tag> at `step` (default: its last)."""
    # torch takes seconds to import: `has` and `plot`, run by the recipes between trainings, do without it
    from nanochat.checkpoint_manager import checkpoints_root, find_last_step, patch_model_config
    from nanochat.gpt import GPTConfig
    from nanochat.scaling import build_meta_model
    from nanochat.training import read_checkpoint_meta
    directory = os.path.join(checkpoints_root("base"), model_tag)
    step = find_last_step(directory) if step is None else step
    meta = read_checkpoint_meta(directory, step)
    model = build_meta_model(GPTConfig(**patch_model_config(meta["model_config"])))
    counts = model.num_params_by_group()
    tokens = step * meta["total_batch_size"]  # what this run trained on (the batch size it used, not a constant)
    flops_per_token = model.estimate_flops()
    core = meta.get("core_metric")
    return {
        "depth": model.config.n_layer, "model_dim": model.config.n_embd, "params_wte": counts["wte"],
        "params_value_embeds": counts["value_embeds"], "params_lm_head": counts["lm_head"],
        "params_transformer": counts["transformer_matrices"], "params_scalars": counts["scalars"],
        "params_total": counts["total"], "num_scaling_params": model.num_scaling_params(),
        "flops_per_token": f"{flops_per_token:.6e}", "num_iterations": step,
        "total_batch_size": meta["total_batch_size"], "tokens_trained": tokens,
        "param_data_ratio": round(tokens / model.num_scaling_params(), 4),
        "total_flops": f"{flops_per_token * tokens:.6e}",
        "val_bpb": "" if meta.get("val_bpb") is None else round(meta["val_bpb"], 6),
        "core_score": "" if core is None else round(core, 6),
        "train_time_sec": round((meta.get("loop_state") or {}).get("total_training_time", 0.0), 1),
    }


def append_row(csv_path, row):
    """Append a row, writing the header first when the file is new; the columns must match an existing file's."""
    new = not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0
    if not new:
        with open(csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
        if header != list(row):
            raise ValueError(f"{csv_path} has the columns {header}, this row has {list(row)}: use a new file")
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_rows(csv_path):
    if not os.path.exists(csv_path):
        return []
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def has_row(csv_path, labels):
    """Whether a row has all these column values (compared as numbers when both parse as numbers)."""
    def same(a, b):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except ValueError:
            return a == b
    return any(all(same(row.get(k, ""), v) for k, v in labels.items()) for row in read_rows(csv_path))


def plot(csv_path, x, ys, out, group=None):
    """One panel per column in `ys` against x (log x), one line per value of `group` (else the points are labelled
    with their depth); a column without values (e.g. CORE not evaluated) gets a panel that says so. Returns out."""
    import matplotlib  # seconds to import; only plotting needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows to plot")
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5), squeeze=False)
    for ax, y in zip(axes[0], ys):
        plot_panel(ax, [r for r in rows if r.get(y) not in (None, "")], x, y, group)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(csv_path))))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_panel(ax, rows, x, y, group):
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if not rows:
        ax.text(0.5, 0.5, f"no {y} values in the CSV", ha="center", va="center", transform=ax.transAxes)
        return
    lines = {}
    for r in rows:
        lines.setdefault(r[group] if group else "", []).append((float(r[x]), float(r[y]), r["depth"]))
    for name, points in sorted(lines.items(), key=lambda kv: float(kv[0]) if group else 0):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{group} {name}" if group else None)
        for px, py, depth in points:
            ax.annotate(f"d{depth}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if group:
        ax.legend(fontsize=8)


def parse_labels(items):
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"labels are NAME=VALUE, got {item!r}")
        labels[key] = value
    return labels


def main(argv=None):
    parser = argparse.ArgumentParser(description="CSV rows and plots of a sweep of base models")
    commands = parser.add_subparsers(dest="command", required=True)
    append = commands.add_parser("append", help="append the row of a trained base checkpoint")
    append.add_argument("csv", help="the results CSV (created with a header when new)")
    append.add_argument("--model-tag", required=True, help="base_checkpoints/<tag> under $NANOCHAT_BASE_DIR")
    append.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    append.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                        help="extra leading columns, e.g. flops_budget=1e18 (repeatable)")
    has = commands.add_parser("has", help="exit 0 if the CSV has a row with these values, else 1")
    has.add_argument("csv")
    has.add_argument("labels", nargs="+", metavar="NAME=VALUE")
    draw = commands.add_parser("plot", help="plot one column against another (log x) into a PNG")
    draw.add_argument("csv")
    draw.add_argument("--x", default="total_flops", help="column on the x axis (log scale)")
    draw.add_argument("--y", action="append", default=None, help="column on the y axis, one panel each (repeatable; "
                                                                 "default val_bpb)")
    draw.add_argument("--group", default=None, help="one line per value of this column (e.g. flops_budget)")
    draw.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "append":
            row = {**parse_labels(args.label), **checkpoint_row(args.model_tag, args.step)}
            append_row(args.csv, row)
            print(", ".join(f"{k}={v}" for k, v in row.items()))
        elif args.command == "has":
            return 0 if has_row(args.csv, parse_labels(args.labels)) else 1
        else:
            print(f"Wrote {plot(args.csv, args.x, args.y or ['val_bpb'], args.out, args.group)}")
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
