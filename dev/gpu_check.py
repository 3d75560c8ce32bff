"""
Everything only a GPU can show, in one run that fits in 8 minutes on one H100/H200 with no network
(`bash runs/gpu_check.sh`, which runs this):

  cuda_tests          the tests marked `cuda` (compiled optimizer kernels vs CPU, pinned-memory loader)
  bench_train_d12     training step tok/s and MFU: d12 bf16 compiled
  bench_train_d20     ... d20 bf16 compiled
  bench_train_d20_fp8 ... d20 fp8 (tensorwise) compiled
  bench_engine        decode tok/s and MBU at batch 1, 8 and 32 (a random d20)
  train_d12           offline corpus -> tokenizer -> a 200-step d12 run whose loss must fall (with tok/s and MFU)
  serve               chat_web on that model + bench_serve with 32 concurrent streaming clients

Each step is a subprocess with a time limit (the whole run has --budget seconds; a step that no longer fits is
skipped); each writes one JSON line to --results with its status (ok / fail / skip), seconds, the exact
command and its numbers; full logs go to the work dir. Exit status 1 if any step failed.

--dry-run: every step at toy size on the CPU (about a minute; the test suite runs it), so the commands, the
parsing and the checks are exercised where no GPU is.
"""

import argparse
import json
import os
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shapes: the real check, and the toy size of --dry-run (CPU, seconds per step)
BENCH_TRAIN = ["--max-seq-len", "2048", "--device-batch-size", "32", "--total-batch-size", "65536",
               "--window-pattern", "SSSL", "--vocab-size", "32768", "--compile", "1", "--steps", "10",
               "--warmup-steps", "3"]
BENCH_TRAIN_TOY = ["--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "2",
                   "--total-batch-size", "128", "--vocab-size", "512", "--compile", "0", "--steps", "2",
                   "--warmup-steps", "1", "--device-type", "cpu"]
BENCH_ENGINE = ["--depth", "20", "--max-seq-len", "2048", "--window-pattern", "SSSL", "--vocab-size", "32768",
                "--prompt-len", "512", "--num-tokens", "256", "--batch-sizes", "1,8,32", "--repeats", "3"]
BENCH_ENGINE_TOY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
                    "--vocab-size", "512", "--prompt-len", "8", "--num-tokens", "8", "--batch-sizes", "1,8,32",
                    "--repeats", "1", "--device-type", "cpu"]
# the same shapes as bench_train_d12 (vocab included), so its compiled graphs come out of inductor's cache
TRAIN = ["--depth", "12", "--max-seq-len", "2048", "--device-batch-size", "32", "--total-batch-size", "65536",
         "--window-pattern", "SSSL", "--num-iterations", "200", "--eval-every", "100", "--eval-tokens", "1048576"]
# a 256-token batch scales the LRs down by sqrt(256 / 524288): 4x them, as runs/runcpu.sh does, to learn in 40 steps
TRAIN_TOY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--window-pattern", "L", "--max-seq-len",
             "64", "--device-batch-size", "4", "--total-batch-size", "256", "--num-iterations", "40",
             "--warmup-steps", "5", "--matrix-lr", "0.08", "--embedding-lr", "1.2", "--unembedding-lr", "0.032",
             "--eval-every", "20", "--eval-tokens", "1024", "--compile", "0", "--device-type", "cpu"]
SERVE_CLIENTS, SERVE_CLIENTS_TOY = ["--clients", "1,32", "--requests-per-client", "2", "--max-tokens", "128"], \
    ["--clients", "2", "--requests-per-client", "1", "--max-tokens", "8"]
LOSS_MUST_FALL_TO = 0.8  # the mean loss of the last tenth of the steps, as a fraction of the first five steps'


class Runner:
    """Runs the steps' commands with time limits, keeps their logs, and writes the results file."""

    def __init__(self, results, work_dir, dry_run, budget):
        self.results, self.work_dir, self.dry_run = results, work_dir, dry_run
        self.deadline = time.time() + budget
        self.failed = False
        shutil.rmtree(work_dir, ignore_errors=True)
        os.makedirs(work_dir)
        open(results, "w").close()
        self.env = dict(os.environ, NANOCHAT_BASE_DIR=os.path.join(work_dir, "base"), PYTHONPATH=REPO,
                        HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
        if dry_run:
            self.env["OMP_NUM_THREADS"] = "1"

    def seconds_left(self):
        return self.deadline - time.time()

    def out_of_time(self, step):
        """Record a skip when the budget is spent (the later steps still get their line)."""
        if self.seconds_left() > 10:
            return False
        self.record(step, "skip", reason="out of time (--budget)")
        return True

    def run(self, name, argv, limit):
        """Run a command (python -m ... from the repo root); returns (return code, output). The output is kept
        in <work dir>/<name>.log; a command past its limit (or the budget) is killed (return code None)."""
        command = [sys.executable, *argv]
        limit = max(1, min(limit, self.seconds_left()))
        print(f"[gpu_check] {name}: {' '.join(argv)}  (limit {limit:.0f}s)", flush=True)
        try:
            proc = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=limit)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code, output = None, f"{e.stdout or ''}{e.stderr or ''}\n[gpu_check] killed after {limit:.0f}s"
            output = output if isinstance(output, str) else output.decode(errors="replace")
        with open(os.path.join(self.work_dir, f"{name}.log"), "a", encoding="utf-8") as f:
            f.write(f"$ python {' '.join(argv)}\n{output}\n")
        if code != 0:
            print(output[-3000:], flush=True)
        return code, output

    def record(self, step, status, **fields):
        """One JSON line in the results file (and on stdout)."""
        line = json.dumps({"step": step, "status": status, **fields})
        with open(self.results, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(f"[gpu_check] {line}", flush=True)
        self.failed |= status == "fail"


def last_json_line(output):
    for line in reversed(output.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def timed_step(runner, step, argv, limit, check=None):
    """Run a benchmark-style step (its last stdout line is JSON) and record it; check(result) -> problem or None."""
    if runner.out_of_time(step):
        return None
    t0 = time.time()
    code, output = runner.run(step, argv, limit)
    result = last_json_line(output) if code == 0 else None
    problem = ("timed out" if code is None else f"exit status {code}" if code else
               "no JSON line in the output" if result is None else check(result) if check else None)
    runner.record(step, "fail" if problem else "ok", seconds=round(time.time() - t0, 1),
                  command="python " + " ".join(argv), **({"problem": problem} if problem else {}),
                  **({"result": result} if result else {}))
    return result if not problem else None


# -----------------------------------------------------------------------------
# The steps

def cuda_tests(runner):
    tests = os.path.join(REPO, "tests")
    files = sorted(os.path.join("tests", f) for f in os.listdir(tests)
                   if f.endswith(".py") and "mark.cuda" in open(os.path.join(tests, f), encoding="utf-8").read())
    if runner.out_of_time("cuda_tests"):
        return
    t0 = time.time()
    code, output = runner.run("cuda_tests", ["-m", "pytest", "-o", "addopts=", "-q", "-m", "cuda", "-p",
                                             "no:cacheprovider", *files], 180)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    # on a GPU every test must run; in the dry run on a CPU they skip, and their collection is what is checked
    problem = ("timed out" if code is None else f"pytest exit status {code}" if code not in (0, 5) else
               "skipped on a GPU" if not runner.dry_run and counts.get("skipped") else None)
    runner.record("cuda_tests", "fail" if problem else "ok", seconds=round(time.time() - t0, 1), files=files,
                  command=f"python -m pytest -q -m cuda {' '.join(files)}", **counts,
                  **({"problem": problem} if problem else {}))


def bench_train(runner, depth, fp8):
    step = f"bench_train_d{depth}{'_fp8' if fp8 else ''}"
    shape = BENCH_TRAIN_TOY + ["--depth", str(2 if depth <= 12 else 3)] if runner.dry_run else \
        BENCH_TRAIN + ["--depth", str(depth)]

    def check(result):
        if fp8 and not runner.dry_run and not result.get("fp8"):
            return "fp8 was not enabled (no Float8 layers)"
        if not runner.dry_run and not result.get("mfu"):
            return "MFU is 0: the GPU is not in nanochat.common's peak-FLOP/s table"
        return None
    timed_step(runner, step, ["-m", "dev.bench_train", *shape, *(["--fp8"] if fp8 else [])], 180, check)


def bench_engine(runner):
    def check(result):
        if not runner.dry_run and not result.get("mbu_b1"):
            return "MBU is 0: the GPU is not in nanochat.common's peak-bandwidth table"
        return None
    shape = BENCH_ENGINE_TOY if runner.dry_run else BENCH_ENGINE
    timed_step(runner, "bench_engine", ["-m", "dev.bench_engine", *shape], 120, check)


def toy_corpus(folder):
    """A few hundred KB of simple generated English (the dry run has no time for the offline corpus)."""
    rng = random.Random(0)
    words = ("the cat dog bird sees finds likes a red blue small big ball book tree house and then runs "
             "jumps sleeps under over near far home sky sun").split()
    os.makedirs(folder, exist_ok=True)
    for i in range(3):
        with open(os.path.join(folder, f"part_{i}.jsonl"), "w", encoding="utf-8") as f:
            for _ in range(400):
                f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))}) + "\n")
    return folder


def train_losses(runner):
    """The per-step train losses base_train logged to the report, {step: loss}."""
    path = os.path.join(runner.env["NANOCHAT_BASE_DIR"], "report", "series.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        points = [json.loads(line) for line in f]
    return {p["step"]: p["value"] for p in points if p["name"] == "train loss"}


def start_data_prep(runner):
    """The text and tokenizer of train_d12, started in the background (niced, a few threads) so they are ready when
    the benchmarks are done; the dry run's toy corpus takes no time. Returns (process, commands)."""
    if runner.dry_run:
        corpus = toy_corpus(os.path.join(runner.work_dir, "corpus"))
        commands = [["-m", "scripts.tok_train", "--vocab-size", "512", "--data-dir", corpus]]
    else:
        commands = [["-m", "nanochat.dataset", "--offline"], ["-m", "scripts.tok_train", "--max-chars", "20000000"]]
    script = " && ".join(" ".join([shlex.quote(sys.executable), *map(shlex.quote, argv)]) for argv in commands)
    log = open(os.path.join(runner.work_dir, "data_prep.log"), "w", encoding="utf-8")
    env = dict(runner.env, RAYON_NUM_THREADS="4", OMP_NUM_THREADS="1")
    process = subprocess.Popen(["nice", "-n", "10", "bash", "-c", script], cwd=REPO, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    return process, commands


def train_d12(runner, data_prep):
    """The short run on the prepared text; ok when the loss fell. Returns the model tag or None."""
    process, commands = data_prep
    if runner.out_of_time("train_d12"):
        process.kill()
        return None
    t0 = time.time()
    try:
        code = process.wait(timeout=max(1, runner.seconds_left() - 60))
    except subprocess.TimeoutExpired:
        process.kill()
        code = None
    if code != 0:
        runner.record("train_d12", "fail", seconds=round(time.time() - t0, 1),
                      command=" && ".join("python " + " ".join(argv) for argv in commands),
                      problem=f"data/tokenizer preparation failed (see {runner.work_dir}/data_prep.log)")
        return None
    train = ["-m", "scripts.base_train", *(TRAIN_TOY if runner.dry_run else TRAIN), "--core-metric-every", "-1",
             "--sample-every", "-1", "--model-tag", "gpucheck"]
    if runner.dry_run:
        train += ["--data-dir", os.path.join(runner.work_dir, "corpus")]
    code, output = runner.run("train_d12", train, 240)
    losses = train_losses(runner)
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:5]) / max(1, len(steps[:5]))
    tail = steps[-max(1, len(steps) // 10):]
    last = sum(losses[s] for s in tail) / max(1, len(tail))
    # steady state: the median over the second half of the steps (the first ones compile and warm up)
    step_lines = re.findall(r"tok/sec: ([\d,]+) \|.*?mfu: ([\d.]+)", output)[len(steps) // 2:]
    bpb = re.findall(r"Validation bpb: ([\d.]+)", output)
    problem = ("timed out" if code is None else f"exit status {code}" if code else
               "no train losses logged" if not steps else
               f"loss did not fall: {first:.3f} -> {last:.3f}" if last > LOSS_MUST_FALL_TO * first else None)
    runner.record("train_d12", "fail" if problem else "ok", seconds=round(time.time() - t0, 1),
                  command="python " + " ".join(train), steps=len(steps), loss_first5=round(first, 4),
                  loss_last_tenth=round(last, 4), val_bpb=[float(b) for b in bpb],
                  tok_per_sec=statistics.median(int(t.replace(",", "")) for t, _ in step_lines) if step_lines else None,
                  mfu=statistics.median(float(m) for _, m in step_lines) if step_lines else None,
                  **({"problem": problem} if problem else {}))
    return None if problem else "gpucheck"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url, server, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and server.poll() is None:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def serve(runner, model_tag):
    missing = [p for p in ("scripts/chat_web.py", "dev/bench_serve.py") if not os.path.exists(os.path.join(REPO, p))]
    if missing:
        return runner.record("serve", "skip", reason=f"{' and '.join(missing)} not in this checkout yet (they come "
                                                      f"with the serving branch): nothing to serve")
    if model_tag is None:
        return runner.record("serve", "skip", reason="needs the model of train_d12, which failed or was skipped")
    if runner.out_of_time("serve"):
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_argv = ["-m", "scripts.chat_web", "-i", "base", "-g", model_tag, "--host", "127.0.0.1", "--port", str(port),
                   "--tools", "none", "--max-batch", "32", *(["--device-type", "cpu"] if runner.dry_run else [])]
    log = open(os.path.join(runner.work_dir, "serve_server.log"), "w", encoding="utf-8")
    server = subprocess.Popen([sys.executable, *server_argv], cwd=REPO, env=runner.env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        if not wait_until_healthy(url, server, min(120, runner.seconds_left())):
            return runner.record("serve", "fail", command="python " + " ".join(server_argv),
                                 problem=f"the server did not answer /health (log: {log.name})")
        clients = SERVE_CLIENTS_TOY if runner.dry_run else SERVE_CLIENTS
        timed_step(runner, "serve", ["-m", "dev.bench_serve", "--url", url, *clients,
                                     "--server-pid", str(server.pid)], 180,
                   lambda result: "requests failed" if any(level["errors"] for level in result["levels"]) else None)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def environment(runner):
    """The first line of the results: what ran where."""
    import torch  # noqa: E402  (here only: the steps are subprocesses, and this keeps --help instant)
    cuda = torch.cuda.is_available()
    runner.record("environment", "ok", dry_run=runner.dry_run, torch=torch.__version__,
                  device=torch.cuda.get_device_name(0) if cuda else "cpu", cuda=torch.version.cuda,
                  started=time.strftime("%Y-%m-%d %H:%M:%S"))
    return cuda


def main(argv=None):
    parser = argparse.ArgumentParser(description="Everything only a GPU can show, in <= 8 minutes (JSON lines)",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU (no GPU needed)")
    parser.add_argument("--results", default="gpu_check_results.jsonl", help="the JSON-lines results file")
    parser.add_argument("--work-dir", default=None,
                        help="logs, data and checkpoints of the run (default: $NANOCHAT_BASE_DIR/gpu_check, "
                             "emptied first)")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check")
    args = parser.parse_args(argv)
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    runner = Runner(os.path.abspath(args.results), args.work_dir or os.path.join(base, "gpu_check"), args.dry_run,
                    args.budget)
    if not environment(runner) and not args.dry_run:
        print("gpu_check: error: no CUDA GPU here; run with --dry-run to check the steps on the CPU", file=sys.stderr)
        return 2
    data_prep = start_data_prep(runner)
    cuda_tests(runner)
    bench_train(runner, 12, fp8=False)
    bench_train(runner, 20, fp8=False)
    bench_train(runner, 20, fp8=True)
    bench_engine(runner)
    serve(runner, train_d12(runner, data_prep))
    print(f"[gpu_check] results: {runner.results} | logs: {runner.work_dir}")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
