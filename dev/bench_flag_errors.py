"""
How long a bad flag takes to be refused, against the time `import torch` alone takes (what checking flags after
the imports would cost at least). Runs alternate, so both see the same machine load; prints one JSON line.

    python dev/bench_flag_errors.py
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [
    ["-m", "scripts.base_train", "--depth", "0"],
    ["-m", "scripts.chat_sft", "--extra-train-jsonl", "missing.jsonl:-1"],
    ["-m", "scripts.tok_train", "--max-chars", "0"],
]


def seconds(argv):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True)
    return time.perf_counter() - t0, proc.returncode


def main(repeats=3):
    results = {}
    for case in CASES:
        flag_error, torch_import = [], []
        for _ in range(repeats):
            flag_error.append(seconds(case))
            torch_import.append(seconds(["-c", "import torch"]))
        best, torch_best = min(t for t, _ in flag_error), min(t for t, _ in torch_import)
        results[" ".join(case[1:])] = {"exit_code": flag_error[0][1], "seconds": round(best, 3),
                                       "import_torch_seconds": round(torch_best, 3),
                                       "ratio": round(best / torch_best, 3)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
