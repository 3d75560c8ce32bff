"""
The run's report card: every stage logs a markdown section under $NANOCHAT_BASE_DIR/report/, training scripts
record curves, and `generate` assembles report.md (header, sections in pipeline order, PNG plots, a summary
table of the key metrics, total wall-clock time) and copies it into the current directory.

    python -m nanochat.report reset      # at the start of a run: wipe the report dir, write the header
    python -m nanochat.report generate   # at the end: assemble report.md

From code (rank 0 writes, other ranks get a no-op stand-in):

    from nanochat.report import get_report
    report = get_report()
    report.log(section="Base model training", data=[user_config, {"Minimum validation bpb": 0.91}])
    report.log_series("val bpb", steps, values, section="Base model training")   # a whole curve at once
    report.log_point("train loss", step, loss, section="Base model training")   # or one point at a time
"""

import argparse
import os
import re
import json
import shutil
import socket
import platform
import datetime
import subprocess

import psutil
import torch

from nanochat.common import get_base_dir, get_dist_info

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SERIES_FILE = "series.jsonl"
PLOTS_DIR = "plots"

# Sections in pipeline order (slugs of the section titles the stages log). Anything else that was logged
# (a user's own stage, probes, exports ...) is appended after these, oldest first, never silently dropped.
SECTION_ORDER = [
    "tokenizer-training",
    "tokenizer-evaluation",
    "base-model-training",
    "base-model-loss",
    "base-model-evaluation",
    "chat-evaluation-base",
    "midtraining",
    "chat-evaluation-mid",
    "chat-sft",
    "chat-evaluation-sft",
    "chat-rl",
    "chat-evaluation-rl",
    "sft-data-filter",
    "dpo-pairs",
    "chat-dpo",
    "chat-evaluation-dpo",
]

# Summary table: rows are metrics, columns are stages. A stage's value comes from the sections that belong to
# it (later sections win, so an evaluation overrides the training-time number). Keys are matched exactly after
# normalization (lowercase, alphanumerics only), so "CORE" never picks up "ChatCORE". A row may be limited to
# some stages: bpb on pretraining text (BASE) and on chat data (SFT) are different numbers, not a comparison.
SUMMARY_STAGES = ["BASE", "MID", "SFT", "RL", "DPO"]
SUMMARY_METRICS = [
    # (row label, accepted keys, stages or None for all)
    ("CORE", ["CORE", "CORE metric", "core_metric"], None),
    ("val bpb", ["val bpb", "val_bpb", "Validation bpb", "Minimum validation bpb", "min val bpb"], ["BASE"]),
    ("ARC-Easy", ["ARC-Easy"], None),
    ("ARC-Challenge", ["ARC-Challenge"], None),
    ("MMLU", ["MMLU"], None),
    ("GSM8K", ["GSM8K"], None),
    ("HumanEval", ["HumanEval"], None),
    ("SpellingBee", ["SpellingBee", "letter counting"], None),
    ("SimpleSpelling", ["SimpleSpelling", "spelling"], None),
    ("Arithmetic", ["Arithmetic"], None),
    ("ChatCORE", ["ChatCORE", "ChatCORE metric", "chatcore_metric"], None),
]


def slugify(text):
    """'Chat evaluation sft' -> 'chat-evaluation-sft' (also safe as a file name)."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "section"


def _normalize_key(key):
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def stage_of(slug):
    """Which summary column a section feeds (None = none)."""
    if slug.startswith("base-model") or slug == "chat-evaluation-base":
        return "BASE"
    if slug in ("midtraining", "chat-evaluation-mid"):
        return "MID"
    for stage in ("sft", "rl", "dpo"):
        if slug in (f"chat-{stage}", f"chat-evaluation-{stage}"):
            return stage.upper()
    return None


def format_value(v):
    """Floats with 4 decimals, big ints with thousands separators, everything else as str."""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def format_duration(seconds):
    seconds = max(0, int(round(seconds)))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


def _now():
    return datetime.datetime.now().strftime(TIME_FORMAT)


def _parse_time(text):
    try:
        return datetime.datetime.strptime(text.strip(), TIME_FORMAT)
    except ValueError:
        return None


# -----------------------------------------------------------------------------
# Header: where and on what this run happened

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(cmd, cwd=REPO_ROOT):
    """stdout of a command, or None if it fails (no git, not a repo, ...)."""
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def get_git_info():
    status = run_command(["git", "status", "--porcelain", "--untracked-files=no"])
    message = run_command(["git", "log", "-1", "--pretty=%s"]) or ""
    return {
        "branch": run_command(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
        "commit": run_command(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
        "dirty": bool(status),
        "message": message[:80],
    }


def get_gpu_info():
    if not torch.cuda.is_available():
        return {"available": False}
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "available": True,
        "count": len(props),
        "names": [p.name for p in props],
        "memory_gb": sum(p.total_memory for p in props) / 1024**3,
        "cuda_version": torch.version.cuda or "unknown",
    }


def get_system_info():
    return {
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu_count": psutil.cpu_count(logical=False),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "memory_gb": psutil.virtual_memory().total / 1024**3,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
    }


def estimate_hourly_rate(gpu_info):
    """Rough on-demand cloud price of this node (USD/hour), None without GPUs."""
    if not gpu_info.get("available"):
        return None
    rates = {"H100": 3.00, "H200": 3.50, "A100": 1.79, "V100": 0.55}
    name = gpu_info["names"][0]
    per_gpu = next((rate for key, rate in rates.items() if key in name), 2.00)
    return per_gpu * gpu_info["count"]


def get_bloat_info():
    """Size of the code base (git-tracked source files), a gentle pressure to keep it small."""
    files = run_command(["git", "ls-files"])
    if files is None:
        return None
    exts = (".py", ".md", ".rs", ".html", ".toml", ".sh")
    num_chars = num_lines = num_files = 0
    for rel in files.splitlines():
        if not rel.endswith(exts):
            continue
        try:
            with open(os.path.join(REPO_ROOT, rel), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        num_files += 1
        num_chars += len(text)
        num_lines += text.count("\n")
    return {"Characters": num_chars, "Lines": num_lines, "Files": num_files, "Tokens (approx)": num_chars // 4}


def generate_header():
    git = get_git_info()
    gpu = get_gpu_info()
    sysinfo = get_system_info()
    lines = [
        "# nanochat training report",
        "",
        f"Generated: {_now()}",
        "",
        "## Environment",
        "",
        "### Git Information",
        f"- Branch: {git['branch']}",
        f"- Commit: {git['commit']} {'(dirty)' if git['dirty'] else '(clean)'}",
        f"- Message: {git['message']}",
        "",
        "### Hardware",
        f"- Platform: {sysinfo['platform']}",
        f"- Hostname: {sysinfo['hostname']}",
        f"- CPUs: {sysinfo['cpu_count']} cores ({sysinfo['cpu_count_logical']} logical)",
        f"- Memory: {sysinfo['memory_gb']:.1f} GB",
    ]
    if gpu["available"]:
        lines += [
            f"- GPUs: {gpu['count']}x {', '.join(sorted(set(gpu['names'])))}",
            f"- GPU Memory: {gpu['memory_gb']:.1f} GB total",
            f"- CUDA Version: {gpu['cuda_version']}",
            f"- Hourly Rate (estimate): ${estimate_hourly_rate(gpu):.2f}/hour",
        ]
    else:
        lines.append("- GPUs: None available")
    lines += [
        "",
        "### Software",
        f"- Python: {sysinfo['python_version']}",
        f"- PyTorch: {sysinfo['torch_version']}",
        "",
    ]
    bloat = get_bloat_info()
    if bloat:
        lines += ["### Bloat"] + [f"- {k}: {v:,}" for k, v in bloat.items()] + [""]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Plots (matplotlib, Agg backend: works headless)

def _plot_curves(section, series, path):
    import matplotlib  # here, not at the top: a second of import time that only plotting needs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(series)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = sorted(series[name].items())
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(section)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_bars(table, path):
    """Grouped bars: one group per metric, one bar per stage that has a numeric value."""
    import matplotlib  # here, not at the top: a second of import time that only plotting needs
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = list(table)
    stages = [s for s in SUMMARY_STAGES if any(s in table[m] for m in metrics)]
    width = 0.8 / max(1, len(stages))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(metrics) + 1), 3.5))
    for i, stage in enumerate(stages):
        xs = [j + i * width for j, m in enumerate(metrics) if stage in table[m]]
        ys = [table[m][stage] for m in metrics if stage in table[m]]
        bars = ax.bar(xs, ys, width, label=stage)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([j + width * (len(stages) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=20, ha="right")
    ax.legend()
    ax.set_title("Evaluation by stage")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _section_order(sections):
    """Pipeline order, then anything else in the order it was logged."""
    known = [s for s in SECTION_ORDER if s in sections]
    others = sorted((s for s in sections if s not in SECTION_ORDER),
                    key=lambda s: (sections[s][1] or datetime.datetime.max, s))
    return known + others


# -----------------------------------------------------------------------------

class Report:
    """Section files + a curve log in one directory; `generate` assembles them into report.md."""

    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    # --- writing, called by the stages ---

    def log(self, section, data):
        """Write section `section` (replacing an earlier one of the same name). `data` is a list of dicts
        (rendered as `- key: value`, also kept as JSON for the summary table) and strings (written as is)."""
        slug = slugify(section)
        path = os.path.join(self.report_dir, f"{slug}.md")
        metrics = {}
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"## {section}\n")
            f.write(f"timestamp: {_now()}\n\n")
            for item in data:
                if not item:
                    continue
                if isinstance(item, str):
                    f.write(item if item.endswith("\n") else item + "\n")
                    continue
                for k, v in item.items():
                    f.write(f"- {k}: {format_value(v)}\n")
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        metrics[str(k)] = v
            f.write("\n")
        with open(os.path.join(self.report_dir, f"{slug}.json"), "w", encoding="utf-8") as f:
            json.dump({"section": section, "metrics": metrics}, f)
        return path

    def log_point(self, name, step, value, section="Training"):
        """Append one point of the curve `name` (e.g. "train loss") of `section`."""
        self.log_series(name, [step], [value], section=section)

    def log_series(self, name, steps, values, section="Training"):
        """Append points of the curve `name` of `section`; generate() plots every curve of a section in one PNG."""
        with open(os.path.join(self.report_dir, SERIES_FILE), "a", encoding="utf-8") as f:
            for step, value in zip(steps, values):
                f.write(json.dumps({"section": section, "name": name, "step": int(step), "value": float(value)}) + "\n")

    def reset(self):
        """Start a new run: remove every section, curve, plot and report, write header.md with the start time."""
        for entry in os.listdir(self.report_dir):
            path = os.path.join(self.report_dir, entry)
            if entry == PLOTS_DIR and os.path.isdir(path):
                shutil.rmtree(path)
            elif entry.endswith((".md", ".json", ".jsonl")) and os.path.isfile(path):
                os.remove(path)
        header_file = os.path.join(self.report_dir, "header.md")
        with open(header_file, "w", encoding="utf-8") as f:
            f.write(generate_header())
            f.write(f"Run started: {_now()}\n\n---\n\n")
        print(f"Reset report and wrote header to {header_file}")
        return header_file

    # --- reading, used by generate ---

    def _read_sections(self):
        """{slug: (text, timestamp, metrics)} for every logged section file."""
        sections = {}
        for entry in os.listdir(self.report_dir):
            if not entry.endswith(".md") or entry in ("header.md", "report.md"):
                continue
            slug = entry[:-3]
            with open(os.path.join(self.report_dir, entry), encoding="utf-8") as f:
                text = f.read()
            match = re.search(r"^timestamp: (.+)$", text, re.MULTILINE)
            timestamp = _parse_time(match.group(1)) if match else None
            metrics = {}
            json_path = os.path.join(self.report_dir, f"{slug}.json")
            if os.path.exists(json_path):
                with open(json_path, encoding="utf-8") as f:
                    metrics = json.load(f).get("metrics", {})
            sections[slug] = (text, timestamp, metrics)
        return sections

    def _read_series(self):
        """{section: {name: {step: value}}} (a later point at the same step wins, e.g. after a resume)."""
        path = os.path.join(self.report_dir, SERIES_FILE)
        series = {}
        if not os.path.exists(path):
            return series
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash: skip it, keep the rest
                series.setdefault(rec["section"], {}).setdefault(rec["name"], {})[rec["step"]] = rec["value"]
        return series

    def summary_table(self, sections, order):
        """{metric: {stage: value}} from the sections' logged numbers."""
        aliases = {_normalize_key(a): (metric, stages) for metric, names, stages in SUMMARY_METRICS for a in names}
        table = {}
        for slug in order:
            stage = stage_of(slug)
            if stage is None:
                continue
            for key, value in sections[slug][2].items():
                metric, stages = aliases.get(_normalize_key(key), (None, None))
                if metric is not None and (stages is None or stage in stages):
                    table.setdefault(metric, {})[stage] = value
        ordered = [m for m, _, _ in SUMMARY_METRICS if m in table]
        return {m: table[m] for m in ordered}

    def stage_metrics(self, stage):
        """{metric: value} of one column of the summary table (BASE, MID, SFT, RL, DPO), e.g. for a model card."""
        sections = self._read_sections()
        table = self.summary_table(sections, _section_order(sections))
        return {metric: row[stage] for metric, row in table.items() if stage in row}

    def generate(self, copy_to_cwd=True):
        """Assemble report.md in the report dir (and copy it to the current directory). Returns its path."""
        report_file = os.path.join(self.report_dir, "report.md")
        print(f"Generating report to {report_file}")
        sections = self._read_sections()
        order = _section_order(sections)
        plots_dir = os.path.join(self.report_dir, PLOTS_DIR)
        os.makedirs(plots_dir, exist_ok=True)

        # curves: one PNG per section, placed right after that section (or under "Plots" if it has no section)
        series = self._read_series()
        plot_links = {}
        for section, curves in series.items():
            fname = f"{slugify(section)}-curves.png"
            _plot_curves(section, curves, os.path.join(plots_dir, fname))
            plot_links[slugify(section)] = f"![{section} curves]({PLOTS_DIR}/{fname})\n"

        header_file = os.path.join(self.report_dir, "header.md")
        start_time = None
        parts = []
        if os.path.exists(header_file):
            with open(header_file, encoding="utf-8") as f:
                header = f.read()
            parts.append(header)
            match = re.search(r"^Run started: (.+)$", header, re.MULTILINE)
            start_time = _parse_time(match.group(1)) if match else None
        else:
            print(f"Warning: {header_file} does not exist (run `python -m nanochat.report reset` at the start)")
            parts.append("# nanochat training report\n\n")

        for slug in order:
            parts.append(sections[slug][0].rstrip("\n") + "\n\n")
            if slug in plot_links:
                parts.append(plot_links.pop(slug) + "\n")
        if plot_links:
            parts.append("## Plots\n\n" + "\n".join(plot_links.values()) + "\n")

        # summary: key metrics by stage, as a table and as bars
        parts.append("## Summary\n\n")
        table = self.summary_table(sections, order)
        if table:
            stages = [s for s in SUMMARY_STAGES if any(s in row for row in table.values())]
            parts.append("| Metric | " + " | ".join(stages) + " |\n")
            parts.append("|---|" + "---|" * len(stages) + "\n")
            for metric, row in table.items():
                cells = [format_value(row[s]) if s in row else "-" for s in stages]
                parts.append(f"| {metric} | " + " | ".join(cells) + " |\n")
            parts.append("\n")
            bar_metrics = {m: row for m, row in table.items() if m not in ("val bpb",)}
            if bar_metrics:
                _plot_bars(bar_metrics, os.path.join(plots_dir, "summary-bars.png"))
                parts.append(f"![Evaluation by stage]({PLOTS_DIR}/summary-bars.png)\n\n")
        else:
            parts.append("(no metrics logged yet)\n\n")

        timestamps = [ts for _, ts, _ in sections.values() if ts is not None]
        if start_time and timestamps:
            total = (max(timestamps) - start_time).total_seconds()
            parts.append(f"Total wall clock time: {format_duration(total)} (from reset to the last logged section)\n")
        else:
            parts.append("Total wall clock time: unknown\n")

        text = "".join(parts)
        with open(report_file, "w", encoding="utf-8") as f:
            f.write(text)
        if copy_to_cwd:
            # same report, image links rewritten to point into the report dir from the current directory
            rel = os.path.relpath(plots_dir, os.getcwd()) if os.path.splitdrive(plots_dir)[0] == \
                os.path.splitdrive(os.getcwd())[0] else plots_dir
            with open("report.md", "w", encoding="utf-8") as f:
                f.write(text.replace(f"]({PLOTS_DIR}/", f"]({rel}/"))
            print("Copied report.md to the current directory")
        return report_file


class DummyReport:
    """What non-zero ranks get: every call does nothing."""
    def log(self, *args, **kwargs):
        pass

    def log_point(self, *args, **kwargs):
        pass

    def log_series(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    """The report of $NANOCHAT_BASE_DIR/report on rank 0, a no-op stand-in on other ranks."""
    _, rank, _, _ = get_dist_info()
    if rank != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reset or generate the nanochat run report ($NANOCHAT_BASE_DIR/report).")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"],
                        help="reset: start a new report (wipes sections, writes the header); "
                             "generate: assemble report.md and copy it here (default)")
    args = parser.parse_args()
    if args.command == "reset":
        get_report().reset()
    else:
        get_report().generate()
