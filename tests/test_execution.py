"""
The sandbox: the happy path, error capture, and a hostile suite. Every hostile program is bounded even if its
guard failed (a fork "bomb" of 16 processes at most, one socket to a listener of our own, ...), so a broken
sandbox fails these tests instead of harming the machine.
"""

import os
import socket
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from nanochat.execution import ExecutionResult, execute_code


def run(code, **kw):
    return execute_code(textwrap.dedent(code), **kw)


def test_happy_path():
    r = run("""
        import math
        print("hello", math.factorial(5))
    """)
    assert r == ExecutionResult(success=True, stdout="hello 120\n", stderr="", error=None)


def test_exception_is_captured():
    r = run("""
        def f():
            raise ValueError("boom")
        print("before")
        f()
    """)
    assert not r.success and r.error == "ValueError: boom"
    assert r.stdout == "before\n" and "Traceback" in r.stderr and "line 3" in r.stderr
    assert not r.timeout and not r.memory_exceeded


def test_syntax_error_is_captured():
    r = run("def f(:\n  pass")
    assert not r.success and r.error.startswith("SyntaxError")


def test_fresh_globals_and_main_name():
    r = run("print(__name__, sorted(k for k in globals() if not k.startswith('__')))")
    assert r.success and r.stdout == "__main__ []\n"


def test_sys_exit_and_os_exit_are_not_successes():
    r = run("import sys; sys.exit(0)")
    assert not r.success and r.error == "SystemExit: 0"
    r = run("import os; print('x', flush=True); os._exit(0)")
    assert not r.success and "without finishing" in r.error and r.stdout == "x\n"


def test_stdin_is_closed():
    r = run("input()")
    assert not r.success and "stdin" in r.error
    r = run("import os; print(repr(os.read(0, 10)))")  # fd 0 is /dev/null
    assert r.success and r.stdout == "b''\n"


HUMANEVAL_PROMPT = '''
from typing import List

def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Check if any two numbers are closer to each other than the threshold."""
'''
HUMANEVAL_TEST = '''
def check(candidate):
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
'''


@pytest.mark.parametrize("body, passes", [
    ("    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n", True),
    ("    return False\n", False),
    ("    import sys; sys.exit(0)\n", False),
])
def test_humaneval_style_check(body, passes):
    program = HUMANEVAL_PROMPT + body + "\n" + HUMANEVAL_TEST + "\ncheck(has_close_elements)\n"
    r = execute_code(program)
    assert r.success is passes
    if not passes and "exit" not in body:
        assert r.error.startswith("AssertionError")


# -----------------------------------------------------------------------------
# hostile programs

def test_infinite_loop_times_out():
    r = run("while True:\n    pass", timeout=1.0)
    assert not r.success and r.timeout and "timed out" in r.error


def test_timeout_keeps_partial_output():
    r = run("import time\nprint('started', flush=True)\nwhile True: time.sleep(0.01)", timeout=1.0)
    assert r.timeout and r.stdout == "started\n"


@pytest.mark.parametrize("code", [
    "import os\nfor _ in range(4):\n    os.fork()",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.system('true')",
    "import os\nos.execv('/bin/true', ['true'])",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import pty\npty.fork()",
])
def test_no_new_processes(code):
    r = run(code)
    assert not r.success and "not allowed" in r.error, r


def test_memory_limit():
    r = run("x = bytearray(10 * 1024 ** 3)")
    assert not r.success and r.memory_exceeded and "Memory limit exceeded" in r.error
    r = run("x = [0] * (10 ** 9)", maximum_memory_bytes=128 * 1024 * 1024)
    assert r.memory_exceeded


def test_no_writes_outside_the_working_directory(tmp_path):
    home_target = os.path.join(os.path.expanduser("~"), f"nanochat_sandbox_test_{uuid.uuid4().hex}")
    outside = tmp_path / "outside.txt"
    (tmp_path / "keep.txt").write_text("precious")
    attempts = [
        f"open({home_target!r}, 'w').write('x')",
        f"open({str(outside)!r}, 'a').write('x')",
        f"import os; os.open({str(outside)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import pathlib; pathlib.Path({str(outside)!r}).write_text('x')",
        f"import os; os.remove({str(tmp_path / 'keep.txt')!r})",
        f"import os; os.rename({str(tmp_path / 'keep.txt')!r}, 'stolen.txt')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; os.symlink({str(tmp_path)!r}, 'link'); open('link/outside.txt', 'w').write('x')",
        f"import os; os.chdir({str(tmp_path)!r}); open('outside.txt', 'w').write('x')",
        f"import os; fd = os.open({str(tmp_path)!r}, os.O_RDONLY); os.open('outside.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
    ]
    for code in attempts:
        r = run(code)
        assert not r.success and "PermissionError" in r.error, (code, r)
    assert not os.path.exists(home_target) and not outside.exists()
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_writes_inside_the_working_directory_are_fine_and_cleaned_up():
    r = run("""
        import os
        open('notes.txt', 'w').write('hi')
        os.makedirs('sub', exist_ok=True)
        os.rename('notes.txt', 'sub/n.txt')
        print(open('sub/n.txt').read(), os.getcwd())
    """)
    assert r.success, r
    text, workdir = r.stdout.split()
    assert text == "hi" and not os.path.exists(workdir)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_FAKE_SECRET", "hunter2-secret-value")
    r = run("import os; print(dict(os.environ))")
    assert r.success and "hunter2" not in r.stdout and "NANOCHAT_FAKE_SECRET" not in r.stdout
    r = run("import os; print(open(f'/proc/{os.getppid()}/environ', 'rb').read())")
    assert not r.success and "hunter2" not in r.stdout and "PermissionError" in r.error


def test_no_network():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        for code in (f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     "import _socket; _socket.socket()",
                     f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"):
            r = run(code)
            assert not r.success and "not allowed" in r.error, (code, r)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_cannot_kill_the_parent():
    parent = os.getpid()
    for code in ("import os; os.kill(os.getppid(), 9)", "import os; os.killpg(os.getpgid(os.getppid()), 9)",
                 "import signal, os; os.kill(os.getppid(), signal.SIGTERM)"):
        r = run(code)
        assert not r.success and "signalling other processes" in r.error, (code, r)
    assert os.getpid() == parent  # still here


def test_no_ctypes_escape():
    for code in ("import ctypes; ctypes.CDLL(None).kill(1, 0)", "import ctypes; ctypes.CDLL('libc.so.6')",
                 "import ctypes; ctypes.string_at(id(1), 8)", "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))"):
        r = run(code)
        assert not r.success and "not allowed" in r.error, (code, r)


def test_huge_output_is_truncated_not_buffered():
    r = run("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1024 * 1024))", max_output_bytes=100_000)
    assert not r.success and "Output limit exceeded" in r.error
    assert len(r.stdout) == 100_000
    r = run("import sys\nsys.stderr.write('e' * 300_000)", max_output_bytes=100_000)
    assert "stderr" in r.error and len(r.stderr) == 100_000


def test_numpy_still_works():
    pytest.importorskip("numpy")
    r = run("import numpy as np; print(int(np.arange(10).sum()))")
    assert r.success and r.stdout == "45\n", r


def test_concurrent_executions():
    codes = [f"print({i} * {i})" for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(execute_code, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]
