"""Report card: reset → stages log sections and curves → generate assembles report.md with table and PNGs."""
import os
import re
import datetime
import subprocess
import sys

from nanochat import report as report_mod
from nanochat.report import Report, DummyReport, get_report, slugify


def _fake_timestamps(report_dir, start, minutes_by_slug):
    """Rewrite header/section timestamps so the wall-clock total is known."""
    header = os.path.join(report_dir, "header.md")
    text = open(header).read()
    open(header, "w").write(re.sub(r"Run started: .*", f"Run started: {start}", text))
    t0 = datetime.datetime.strptime(start, report_mod.TIME_FORMAT)
    for slug, minutes in minutes_by_slug.items():
        stamp = (t0 + datetime.timedelta(minutes=minutes)).strftime(report_mod.TIME_FORMAT)
        path = os.path.join(report_dir, f"{slug}.md")
        text = open(path).read()
        open(path, "w").write(re.sub(r"timestamp: .*", f"timestamp: {stamp}", text))


def test_reset_log_generate(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report_dir = tmp_path / "report"
    rep = Report(str(report_dir))
    (report_dir / "stale-section.md").write_text("## old\n")
    rep.reset()
    assert not (report_dir / "stale-section.md").exists()
    header = (report_dir / "header.md").read_text()
    assert "PyTorch:" in header and "Run started:" in header and "CPUs:" in header

    # stages log out of pipeline order; generate puts them back in order
    rep.log("Chat evaluation sft", [{"SpellingBee": 0.62, "Arithmetic": 0.5}, "free text line"])
    rep.log("Base model training", [{"depth": 4}, {"Minimum validation bpb": 1.2345}])
    rep.log("Base model evaluation", [{"CORE metric": 0.01, "val bpb": 1.20}])
    rep.log("Chat evaluation base", [{"SpellingBee": 0.0, "Arithmetic": 0.1}])
    rep.log("Chat SFT", [{"Minimum validation bpb": 0.9}])
    rep.log("My custom stage", [{"rows": 12345}])
    rep.log_series("train loss", range(0, 50, 10), [5.0, 4.0, 3.5, 3.2, 3.0], section="Base model training")
    rep.log_point("val bpb", 40, 1.2, section="Base model training")
    rep.log_series("train loss", [0, 1, 2], [2.0, 1.5, 1.2], section="Chat SFT")
    _fake_timestamps(str(report_dir), "2025-01-01 10:00:00",
                     {"base-model-training": 10, "base-model-evaluation": 20, "chat-evaluation-base": 21,
                      "chat-sft": 60, "chat-evaluation-sft": 75, "my-custom-stage": 30})

    path = rep.generate()
    text = open(path).read()
    # pipeline order, custom section kept (after the known ones)
    idx = [text.index(f"## {s}") for s in ["Base model training", "Base model evaluation", "Chat evaluation base",
                                           "Chat SFT", "Chat evaluation sft", "My custom stage", "Summary"]]
    assert idx == sorted(idx)
    assert "free text line" in text
    assert "- rows: 12,345" in text
    # summary table: stages as columns, CORE not confused with ChatCORE, evaluation overrides training bpb
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| Metric")}
    header_line = next(line for line in text.splitlines() if line.startswith("| Metric"))
    assert [c.strip() for c in header_line.split("|")[2:-1]] == ["BASE", "SFT"]
    assert rows["CORE"] == ["0.0100", "-"]
    assert rows["val bpb"] == ["1.2000", "-"]  # SFT's bpb is on chat data: not put beside the base's
    assert rows["SpellingBee"] == ["0.0000", "0.6200"]
    assert rows["Arithmetic"] == ["0.1000", "0.5000"]
    assert "ChatCORE" not in rows
    assert "Total wall clock time: 1h15m00s" in text
    # plots exist as real PNGs and are linked from the report
    for png in ["base-model-training-curves.png", "chat-sft-curves.png", "summary-bars.png"]:
        data = (report_dir / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{png})" in text
    # the copy in the working directory links to the same images from where it sits
    copy = (tmp_path / "report.md").read_text()
    assert "(report/plots/summary-bars.png)" in copy
    assert copy.replace("report/plots/", "plots/") == text


def test_series_survive_truncated_line_and_resume(tmp_path):
    rep = Report(str(tmp_path))
    rep.log_series("loss", [1, 2, 3], [3.0, 2.0, 1.0], section="Chat SFT")
    with open(tmp_path / report_mod.SERIES_FILE, "a") as f:
        f.write('{"section": "Chat SFT", "name": "lo')  # a crash mid-write
    with open(tmp_path / report_mod.SERIES_FILE, "a") as f:
        f.write("\n")
    rep.log_series("loss", [3, 4], [0.5, 0.4], section="Chat SFT")  # resumed run re-logs step 3
    series = rep._read_series()
    assert series["Chat SFT"]["loss"] == {1: 3.0, 2: 2.0, 3: 0.5, 4: 0.4}


def test_generate_without_reset_and_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rep = Report(str(tmp_path / "r"))
    text = open(rep.generate()).read()
    assert "Total wall clock time: unknown" in text
    assert "(no metrics logged yet)" in text


def test_slugify_and_rank_gating(monkeypatch):
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert slugify("Base model: d4 / run #2") == "base-model-d4-run-2"
    assert isinstance(get_report(), Report)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rep = get_report()
    assert isinstance(rep, DummyReport)
    rep.log("x", [{"a": 1}])
    rep.log_series("x", [1], [1.0])
    rep.reset()
    rep.generate()


def test_cli_reset_generate(tmp_path, _isolated_base_dir):
    env = dict(os.environ)
    for cmd in ["reset", "generate"]:
        out = subprocess.run([sys.executable, "-m", "nanochat.report", cmd], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert (_isolated_base_dir / "report" / "header.md").exists()
    assert (tmp_path / "report.md").exists()
