"""When things go wrong (README): bad flags fail at once with one line and exit 2, before torch loads; a run that
cannot save fails before step 0, and a save that fails on a full disk keeps the last good checkpoint; a diverged
run stops without saving NaN weights; a checkpoint loaded with another tokenizer is refused; damaged files are
named and --resume-from-step last skips them; a killed save keeps the last good checkpoint, leaves nothing that
outlives the next save and never un-publishes a finished step; Ctrl-C while an answer streams keeps the chat.

Read-only and full disks are real ones (a bind mount and a small tmpfs in a user + mount namespace); without
`unshare` those two tests are skipped."""
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.cli import UserError, exit_on_user_error
from nanochat.fileio import temp_path_for
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
from nanochat.training import NonFiniteLossError, checkpoint_meta
from scripts import base_train as bt
from scripts import chat_cli, chat_sft, tok_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--window-pattern", "L",
        "--device-batch-size", "2", "--total-batch-size", "128", "--core-metric-every", "-1", "--sample-every", "-1",
        "--eval-every", "-1", "--warmup-steps", "1", "--compile", "0", "--synthetic-data", "--device-type", "cpu"]


@pytest.fixture(scope="module")
def other_tokenizer(tiny_docs, tiny_words):
    """Retrained on other text with the same vocabulary size: every id now means something else."""
    return RustBPETokenizer.train_from_iterator(iter(tiny_docs(300, 1, tiny_words[::-1] + ["zebra", "quiz"])), 300)


def subprocess_env():
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")


# -----------------------------------------------------------------------------
# 5. flags: one line, exit 2, before torch is imported

# runs `python -m <module> <flags>` and records, when the process exits, whether torch had been imported
FLAG_DRIVER = """
import atexit, runpy, sys
module, marker = sys.argv[1], sys.argv[2]
atexit.register(lambda: open(marker, "w").write("torch" if "torch" in sys.modules else "no torch"))
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

BAD_FLAGS = [
    ("scripts.base_train", ["--depth", "0"], "--depth"),
    ("scripts.base_train", ["--max-seq-len", "0"], "--max-seq-len"),
    ("scripts.base_train", ["--device-batch-size", "0"], "--device-batch-size"),
    ("scripts.base_train", ["--device-batch-size", "-2"], "--device-batch-size"),
    ("scripts.base_train", ["--device-batch-size", "1e8"], "--device-batch-size"),
    ("scripts.base_train", ["--head-dim", "0"], "--head-dim"),
    ("scripts.base_train", ["--head-dim", "33"], "--head-dim"),
    ("scripts.base_train", ["--total-batch-size", "0"], "--total-batch-size"),
    ("scripts.base_train", ["--matrix-lr", "nan"], "--matrix-lr"),
    ("scripts.base_train", ["--warmdown-ratio", "1.5"], "--warmdown-ratio"),
    ("scripts.base_train", ["--window-pattern", "SXL"], "--window-pattern"),
    ("scripts.base_train", ["--eval-every", "-5"], "--eval-every"),
    ("scripts.base_train", ["--resume-from-step", "-3"], "--resume-from-step"),
    ("scripts.base_train", ["--data-dir", "/nonexistent/corpus"], "--data-dir"),
    ("scripts.chat_sft", ["--device-batch-size", "0"], "--device-batch-size"),
    ("scripts.chat_sft", ["--extra-train-jsonl", "{tmp}"], "is a directory"),
    ("scripts.chat_sft", ["--extra-train-jsonl", "{tmp}/data.jsonl:-1"], "REPEAT must be"),
    ("scripts.chat_sft", ["--extra-train-jsonl", "{tmp}/missing.jsonl"], "does not exist"),
    ("scripts.chat_sft", ["--extra-val-jsonl", "{tmp}"], "is a directory"),
    ("scripts.tok_train", ["--max-chars", "0"], "--max-chars"),
    ("scripts.tok_train", ["--doc-cap", "-1"], "--doc-cap"),
]


@pytest.mark.parametrize("module,flags,named", BAD_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_flag_is_one_line_and_exit_2_before_torch_loads(module, flags, named, tmp_path):
    (tmp_path / "data.jsonl").write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]\n')
    marker = tmp_path / "imports"
    flags = [f.format(tmp=tmp_path) for f in flags]
    proc = subprocess.run([sys.executable, "-c", FLAG_DRIVER, module, str(marker), *flags], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and named in lines[0], proc.stderr
    assert marker.read_text() == "no torch"  # refused before the seconds of importing torch


def test_huge_device_batch_size_is_refused_not_hung(base):
    """--device-batch-size 100000000 passes the parser; the batch arithmetic refuses it at once (the hint used to
    try every device batch size up to 4x the one asked for)."""
    proc = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations", "1",
                           "--device-batch-size", "100000000"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: ") and "--device-batch-size 100000000" in last and "Traceback" not in proc.stderr


def test_a_model_that_cannot_fit_is_refused_with_the_number(base):
    """--depth 100 (~50B parameters) is refused from its meta-device shape, before anything is allocated (the
    address-space limit turns an allocation attempt into a failure instead of a swapping machine)."""
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (12 * 2 ** 30, 12 * 2 ** 30)); "
    code = limit + "import runpy, sys; sys.argv = ['base_train'] + sys.argv[1:]; " \
                   "runpy.run_module('scripts.base_train', run_name='__main__', alter_sys=True)"
    proc = subprocess.run([sys.executable, "-c", code, *TINY, "--depth", "100", "--aspect-ratio", "64",
                           "--head-dim", "128", "--num-iterations", "1"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "d100" in last and "GiB" in last and "--depth" in last, last


def test_sft_checks_its_data_before_loading_the_model(base, tmp_path, monkeypatch, build_tiny_gpt):
    model = build_tiny_gpt(32, get_tokenizer().get_vocab_size())
    meta = checkpoint_meta(0, None, dataclasses.asdict(model.config), {}, 2, 32, 64)
    cm.save_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 0, model.state_dict(), None, meta)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "assistant", "content": "I speak first"}]\n')

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(chat_sft, "build_model", no_model)
    with pytest.raises(UserError, match=f"{bad}:1"):
        chat_sft.main(["--device-type", "cpu", "--custom-only", "--extra-train-jsonl", str(bad)])


# -----------------------------------------------------------------------------
# 2. nowhere to save: refused before step 0; a failed save keeps the last good checkpoint

def namespaces_available():
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="needs unshare (user + mount namespaces)")


def run_with_mount(mount_script, argv, timeout=300):
    """argv run in a user + mount namespace after `mount_script` (sh), so the mounts vanish with it."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", f"{mount_script} && exec \"$@\"", "sh", *argv], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@needs_namespaces
def test_read_only_base_dir_fails_before_step_0(base):
    proc = run_with_mount(f"mount --bind {base} {base} && mount -o remount,bind,ro {base} {base}",
                          [sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations", "3"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 00000" not in proc.stdout  # not a single step was trained
    last = proc.stderr.strip().splitlines()[-1]
    assert "read-only file system" in last and os.path.join(base, "base_checkpoints", "d2") in last, last


# Trains with a save every 2 steps on a checkpoint directory of its own (a tmpfs); before the second save a
# file fills that disk. Reports what the directory holds after the run, from inside the namespace.
FULL_DISK_DRIVER = """
import json, os, sys
from nanochat import checkpoint_manager as cm
from nanochat.cli import exit_on_user_error
from scripts import base_train as bt
ckpt_dir, argv = sys.argv[1], sys.argv[2:]
real_save, saves = bt.save_checkpoint, []
def save_then_fill(*args, **kwargs):
    if saves:  # the disk fills up during the run, after the checks at its start
        with open(os.path.join(os.path.dirname(ckpt_dir), "filler"), "wb") as f:
            f.write(bytes(os.statvfs(ckpt_dir).f_bavail * os.statvfs(ckpt_dir).f_frsize - 4096))
    saves.append(1)
    return real_save(*args, **kwargs)
bt.save_checkpoint = save_then_fill
try:
    exit_on_user_error(lambda: bt.main(argv))
finally:
    model, _, meta = cm.load_checkpoint(ckpt_dir, cm.find_last_step(ckpt_dir), "cpu", load_optimizer=True)
    print(json.dumps({"last": cm.find_last_step(ckpt_dir), "files": sorted(os.listdir(ckpt_dir)),
                      "finite": all(bool(t.isfinite().all()) for t in model.values()), "meta_step": meta["step"]}))
"""


@needs_namespaces
def test_full_disk_save_says_so_and_keeps_the_last_good_checkpoint(base):
    checkpoints = os.path.join(base, "base_checkpoints")
    os.makedirs(checkpoints)
    proc = run_with_mount(f"mount -t tmpfs -o size=16m tmpfs {checkpoints}",
                          [sys.executable, "-c", FULL_DISK_DRIVER, os.path.join(checkpoints, "d2"),
                           *TINY, "--num-iterations", "4", "--save-every", "2"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "no space left on device" in last and os.path.join(checkpoints, "d2") in last, last
    assert "step 2, is intact" in last
    after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after == {"last": 2, "files": ["meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"],
                     "finite": True, "meta_step": 2}  # no temp file left behind either


def test_disk_error_during_save_is_one_line_naming_the_path(tmp_path, monkeypatch):
    tmp_path = tmp_path / "ckpt"
    cm.save_checkpoint(str(tmp_path), 1, {"w": torch.ones(2)}, {"s": torch.zeros(2)}, {"step": 1})

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as e:
        cm.save_checkpoint(str(tmp_path), 2, {"w": torch.ones(2)}, {"s": torch.zeros(2)}, {"step": 2})
    message = str(e.value)
    assert "\n" not in message and "no space left on device" in message and str(tmp_path) in message
    assert "step 1, is intact" in message
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]


def test_check_can_save_names_the_numbers(tmp_path, monkeypatch):
    cm.check_can_save(str(tmp_path / "new" / "dir"), 1000)  # creates it
    monkeypatch.setattr(cm.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 * 2 ** 30, 9 * 2 ** 30, 2 ** 30))
    with pytest.raises(UserError, match=r"needs about 2\.00 GiB but 1\.00 GiB is free"):
        cm.check_can_save(str(tmp_path), 2 * 2 ** 30)


def test_checkpoint_estimate_covers_the_real_checkpoint(tmp_path, build_tiny_gpt):
    """Before step 0 (no optimizer state yet) and after a step, the estimate is at least what a save writes;
    after a step it counts the real state (within the 1 MiB allowance for the meta and file system)."""
    model = build_tiny_gpt(32, 300)
    optimizer = model.setup_optimizer()
    before = cm.estimate_checkpoint_bytes(model, optimizer)
    x = torch.randint(0, 300, (2, 32))
    model(x, x).backward()
    optimizer.step()
    after = cm.estimate_checkpoint_bytes(model, optimizer)
    cm.save_checkpoint(str(tmp_path), 1, model.state_dict(), optimizer.state_dict(), {"step": 1})
    written = sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path))
    assert written <= after <= written + 2 ** 21
    assert written <= before


# -----------------------------------------------------------------------------
# 3. a diverged run stops, exits non-zero and never saves NaN weights

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(base, capsys):
    bt.main(TINY + ["--num-iterations", "2"])
    ckpt_dir = os.path.join(base, "base_checkpoints", "d2")
    good = {name: open(os.path.join(ckpt_dir, name), "rb").read() for name in os.listdir(ckpt_dir)}
    capsys.readouterr()
    huge = ["--matrix-lr", "1e20", "--embedding-lr", "1e20", "--unembedding-lr", "1e20", "--scalar-lr", "1e20"]
    with pytest.raises(SystemExit) as e:
        exit_on_user_error(lambda: bt.main(TINY + ["--num-iterations", "6", "--resume-from-step", "2"] + huge))
    assert e.value.code == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ERROR: the training loss is nan at step ") and "Lower the learning rates" in last
    assert {name: open(os.path.join(ckpt_dir, name), "rb").read() for name in os.listdir(ckpt_dir)} == good
    assert cm.find_last_step(ckpt_dir) == 2


def test_nan_loss_from_a_hook_stops_at_that_step(base, monkeypatch):
    real_forward = bt.GPT.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real_forward(self, *args, **kwargs)
        return loss * float("nan") if len(calls) > 6 else loss  # micro-steps 7, 8 = step 3 (2 per step)
    monkeypatch.setattr(bt.GPT, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3:"):
        bt.main(TINY + ["--num-iterations", "8", "--save-every", "2"])
    assert cm.available_steps(os.path.join(base, "base_checkpoints", "d2")) == [2]


def test_non_finite_weights_are_never_saved(tmp_path):
    tmp_path = tmp_path / "ckpt"
    cm.save_checkpoint(str(tmp_path), 1, {"w": torch.ones(3)}, None, {"step": 1})
    with pytest.raises(cm.NonFiniteWeightsError, match=r"step 2 hold NaN/inf \(w\)"):
        cm.save_checkpoint(str(tmp_path), 2, {"w": torch.tensor([1.0, float("inf"), 0.0])}, None, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt"]


# -----------------------------------------------------------------------------
# 4. the tokenizer fingerprint; tok_train does not overwrite a tokenizer by accident

def test_fingerprint_follows_the_merges_not_the_file(tiny_tokenizer, other_tokenizer, tmp_path):
    tiny_tokenizer.save(str(tmp_path))
    assert RustBPETokenizer.from_directory(str(tmp_path)).fingerprint() == tiny_tokenizer.fingerprint()
    other = other_tokenizer
    assert other.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert other.fingerprint() != tiny_tokenizer.fingerprint()


def test_checkpoint_with_another_tokenizer_is_refused(base, build_tiny_gpt, other_tokenizer, caplog):
    tok = get_tokenizer()
    model = build_tiny_gpt(32, tok.get_vocab_size())
    config = dataclasses.asdict(model.config)
    ckpt_dir = os.path.join(base, "chatsft_checkpoints", "d2")
    cm.save_checkpoint(ckpt_dir, 1, model.state_dict(), None, checkpoint_meta(1, None, config, {}, 2, 32, 64))
    assert cm.load_model("sft", "cpu", "eval")[2]["tokenizer_fingerprint"] == tok.fingerprint()
    # the same vocab size, retrained on other text: every id now means something else
    other = other_tokenizer
    assert other.get_vocab_size() == tok.get_vocab_size()
    other.save(os.path.join(base, "tokenizer"))
    with pytest.raises(cm.TokenizerMismatchError) as e:
        cm.load_model("sft", "cpu", "eval")
    assert tok.fingerprint() in str(e.value) and other.fingerprint() in str(e.value) and ckpt_dir in str(e.value)
    # a checkpoint from before fingerprints (or nanochat's) loads, with a note
    cm.save_checkpoint(ckpt_dir, 2, model.state_dict(), None, {"step": 2, "model_config": config})
    caplog.clear()
    caplog.set_level("INFO", logger="nanochat")  # a note, at INFO (chat_cli raises this logger's level)
    cm.load_model("sft", "cpu", "eval", step=2)
    assert "records no tokenizer fingerprint" in caplog.text


def test_resuming_with_another_tokenizer_is_refused(base, other_tokenizer):
    bt.main(TINY + ["--num-iterations", "1"])
    other = other_tokenizer
    other.save(os.path.join(base, "tokenizer"))
    with pytest.raises(cm.TokenizerMismatchError, match="retrained since"):
        bt.main(TINY + ["--num-iterations", "2", "--resume-from-step", "last"])


def test_tok_train_keeps_an_existing_tokenizer_without_force(base, tiny_docs):
    path = os.path.join(base, "tokenizer", "tokenizer.pkl")
    before = open(path, "rb").read()
    batches = [tiny_docs(200, 5)]
    with pytest.raises(UserError, match="Pass --force to replace it"):
        tok_train.main(["--vocab-size", "280"], batches=iter(batches))
    assert open(path, "rb").read() == before
    with pytest.raises(UserError, match="at least 265"):
        tok_train.main(["--vocab-size", "100", "--force"], batches=iter(batches))
    assert open(path, "rb").read() == before
    tok_train.main(["--vocab-size", "280", "--force"], batches=iter(batches))
    assert get_tokenizer().get_vocab_size() == 280


# -----------------------------------------------------------------------------
# 6. damaged files are named; --resume-from-step last falls back to the newest checkpoint that loads

def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def test_truncated_tokenizer_is_named(base):
    path = os.path.join(base, "tokenizer", "tokenizer.pkl")
    truncate(path)
    with pytest.raises(UserError, match=f"{path} cannot be read .*truncated or damaged"):
        get_tokenizer()


@pytest.mark.parametrize("damaged", ["model_000001.pt", "meta_000001.json", "optim_000001_rank0.pt"])
def test_truncated_checkpoint_file_is_named(base, build_tiny_gpt, damaged):
    model = build_tiny_gpt(32, 300)
    ckpt_dir = os.path.join(base, "base_checkpoints", "d2")
    cm.save_checkpoint(ckpt_dir, 1, model.state_dict(), model.setup_optimizer().state_dict(),
                       {"step": 1, "model_config": dataclasses.asdict(model.config)})
    truncate(os.path.join(ckpt_dir, damaged))
    with pytest.raises(cm.CorruptCheckpointError) as e:
        cm.load_checkpoint(ckpt_dir, 1, "cpu", load_optimizer=True)
    assert os.path.join(ckpt_dir, damaged) in str(e.value) and "truncated or damaged" in str(e.value)


def test_resume_last_skips_a_damaged_checkpoint(base, caplog):
    argv = TINY + ["--num-iterations", "4", "--save-every", "2"]
    full = bt.main(argv)
    ckpt_dir = full["checkpoint_dir"]
    good_weights = torch.load(os.path.join(ckpt_dir, "model_000004.pt"))
    truncate(os.path.join(ckpt_dir, "model_000004.pt"))
    caplog.clear()
    resumed = bt.main(argv + ["--resume-from-step", "last"])
    err = caplog.text
    assert "model_000004.pt cannot be read" in err and "using step 4" not in err and "using step 2" in err
    assert sorted(resumed["losses"]) == [2, 3]  # steps 2 and 3 trained again, exactly as the first time
    for step in (2, 3):
        assert resumed["losses"][step] == full["losses"][step]
    redone = torch.load(os.path.join(ckpt_dir, "model_000004.pt"))
    assert all(torch.equal(redone[k], good_weights[k]) for k in good_weights)


# -----------------------------------------------------------------------------
# 7. killed saves: the last good step stays, their temp files go at the next save, a re-save never un-publishes

def save_then_kill_midway(tmp_path, ckpt, saved, killed):
    """In a child process, save each (step, value) of `saved` to ckpt (weights: 3 x value), then save `killed`
    (step, value) with a torch.save that writes a few bytes and hangs: SIGKILL the child there and return it."""
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from nanochat import checkpoint_manager as cm
        d = {str(ckpt)!r}
        for step, value in {saved!r}:
            cm.save_checkpoint(d, step, {{"w": torch.full((3,), value)}}, {{"s": torch.zeros(2)}}, {{"step": step}})
        def slow_save(obj, f, *a, **k):
            f.write(b"partial bytes"); f.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        torch.save = slow_save
        step, value = {killed!r}
        cm.save_checkpoint(d, step, {{"w": torch.full((3,), value)}}, {{"s": torch.zeros(2)}}, {{"step": step}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=subprocess_env())
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, "the saving subprocess died before reaching the slow save"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc


def test_killed_save_keeps_last_good_checkpoint(tmp_path):
    """A process killed (SIGKILL) in the middle of writing step 6 leaves step 3 as the latest checkpoint."""
    save_then_kill_midway(tmp_path, tmp_path, saved=[(3, 1.0)], killed=(6, 2.0))
    assert cm.find_last_step(str(tmp_path)) == 3
    assert not os.path.exists(tmp_path / "model_000006.pt")
    m, o, meta = cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True)
    assert torch.equal(m["w"], torch.ones(3)) and meta == {"step": 3}


def test_killed_re_save_keeps_the_step_and_the_next_save_cleans_up(tmp_path):
    """Re-saving step 5 (what --resume-from-step last does on a finished run), killed while the weights are
    written: step 5 stays the last checkpoint, whole; the killed writer's temp file goes at the next save."""
    ckpt = tmp_path / "ckpt"
    proc = save_then_kill_midway(tmp_path, ckpt, saved=[(3, 1.0), (5, 5.0)], killed=(5, 5.0))
    assert cm.find_last_step(str(ckpt)) == 5
    model, _, meta = cm.load_checkpoint(str(ckpt), 5, "cpu", load_optimizer=True)
    assert torch.equal(model["w"], torch.full((3,), 5.0)) and meta == {"step": 5}
    stale = [name for name in os.listdir(ckpt) if ".tmp" in name]
    assert stale == [f".model_000005.pt.tmp{proc.pid}"]
    cm.save_checkpoint(str(ckpt), 6, {"w": torch.ones(3)}, {"s": torch.zeros(2)}, {"step": 6})
    assert not [name for name in os.listdir(ckpt) if ".tmp" in name]
    assert cm.available_steps(str(ckpt)) == [3, 5, 6]


def test_re_save_writes_the_new_files_before_touching_the_old_meta(tmp_path, monkeypatch):
    tmp_path = tmp_path / "ckpt"
    cm.save_checkpoint(str(tmp_path), 5, {"w": torch.ones(3)}, {"s": torch.zeros(2)}, {"step": 5, "v": 1})
    real_save, seen = torch.save, []

    def watching_save(obj, f, *args, **kwargs):
        seen.append(os.path.exists(cm.meta_path(str(tmp_path), 5)))
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", watching_save)
    cm.save_checkpoint(str(tmp_path), 5, {"w": torch.full((3,), 2.0)}, {"s": torch.ones(2)}, {"step": 5, "v": 2})
    assert seen == [True, True]  # the step stayed published while its model and optimizer files were written
    model, optim, meta = cm.load_checkpoint(str(tmp_path), 5, "cpu", load_optimizer=True)
    assert torch.equal(model["w"], torch.full((3,), 2.0)) and torch.equal(optim["s"], torch.ones(2)) and meta["v"] == 2
    assert not os.path.exists(temp_path_for(cm.model_path(str(tmp_path), 5)))


# -----------------------------------------------------------------------------
# 7. Ctrl-C while an answer streams stops the answer, not the chat

def test_ctrl_c_while_streaming_keeps_the_chat(_isolated_base_dir, tiny_chat_tokenizer, build_tiny_checkpoint,
                                               monkeypatch):
    tok = tiny_chat_tokenizer
    build_tiny_checkpoint(str(_isolated_base_dir), tok, 64, os.path.join("chatsft_checkpoints", "d2"), 5)
    from nanochat.engine import Engine
    real_generate, prompts = Engine.generate, []

    def interrupted_once(self, tokens, *args, **kwargs):
        prompts.append(tok.decode(tokens))
        for i, step in enumerate(real_generate(self, tokens, *args, **kwargs)):
            if len(prompts) == 1 and i == 3:
                raise KeyboardInterrupt  # the user presses Ctrl-C after three streamed tokens
            yield step
    monkeypatch.setattr(Engine, "generate", interrupted_once)
    inputs = iter(["first question", "second question", "quit"])
    out = io.StringIO()
    try:
        chat_cli.main(["--device-type", "cpu", "-t", "0", "-m", "8"], input_fn=lambda prompt: next(inputs), out=out)
    except KeyboardInterrupt:  # caught here: escaping into pytest would stop the whole test session
        pytest.fail("Ctrl-C while an answer streamed ended the chat")
    text = out.getvalue()
    assert "(stopped: this question and its partial answer are left out of the conversation)" in text
    assert text.rstrip().endswith("Goodbye!") and len(prompts) == 2
    assert "second question" in prompts[1] and "first question" not in prompts[1]  # the stopped exchange is gone
