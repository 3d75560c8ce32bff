"""
Per-call latency of the code sandbox: this tree's execute_code with the strictest layers this machine allows, and
with no OS layer, against a baseline execution.py (e.g. an older commit's), calls alternating so that the noise
of a shared machine hits all of them alike.

    git show f6b40b0:nanochat/execution.py > /tmp/execution_baseline.py
    python -m dev.bench_sandbox --baseline /tmp/execution_baseline.py --rounds 30

Prints one JSON line: median milliseconds per call of each variant for each program, and ratios to the baseline.
"""

import argparse
import importlib.util
import json
import os
import statistics
import time

from nanochat import execution

PROGRAMS = {
    "print": "print(1 + 1)",
    "humaneval": (
        "from typing import List\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n\n"
        "def check(candidate):\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
        "    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n\n"
        "check(has_close_elements)\n"),
}


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("execution_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path of the baseline execution.py (see the docstring)")
    parser.add_argument("--rounds", type=int, default=30, help="calls per variant and program (default 30)")
    args = parser.parse_args()
    if not os.path.isfile(args.baseline):
        parser.error(f"--baseline {args.baseline}: no such file (make one with the git show line in --help)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    baseline = load_baseline(args.baseline)
    layers = execution.isolation()  # probe once, outside the timing
    variants = {
        "baseline": baseline.execute_code,
        "strictest": execution.execute_code,
        # the same child program with no OS layer: what the layers themselves cost
        "no_os_layer": lambda code: execution._execute(code, (), 5.0, 256 * 1024 * 1024,
                                                      execution.DEFAULT_MAX_OUTPUT_BYTES)[0],
    }
    times = {(v, p): [] for v in variants for p in PROGRAMS}
    for _ in range(args.rounds):
        for program, code in PROGRAMS.items():
            for variant, run in variants.items():
                start = time.perf_counter()
                result = run(code)
                times[(variant, program)].append(time.perf_counter() - start)
                assert result.success, (variant, program, result)
    medians = {f"{v}_{p}_ms": round(1000 * statistics.median(t), 2) for (v, p), t in times.items()}
    ratios = {f"ratio_{v}_{p}": round(medians[f"{v}_{p}_ms"] / medians[f"baseline_{p}_ms"], 2)
              for v in variants if v != "baseline" for p in PROGRAMS}
    print(json.dumps({"layers": list(layers), "rounds": args.rounds, **medians, **ratios}))


if __name__ == "__main__":
    main()
