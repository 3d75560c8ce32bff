"""
The sandbox: the happy path, error capture, and a hostile suite. Every hostile program is bounded even if its
guard failed (a fork "bomb" of 16 processes at most, one socket to a listener of our own, children that sleep
30 s and are killed by the test, ...), so a broken sandbox fails these tests instead of harming the machine.

The second hostile suite first switches off every in-process guard it can reach (the audit hook) and proves it did
so, then attacks; only the operating system stands in the way. It runs once per set of isolation layers: the
strictest this machine allows, namespaces alone, and the fallback without namespaces (what a container that refuses
namespaces gets), each test checking the guarantees that set of layers promises (README, "The code sandbox").
"""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nanochat import execution
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


# -----------------------------------------------------------------------------
# hostile programs that first switch off every in-process guard they can reach

# Finds the audit hook (a function taking (event, args)) through gc, turns what it calls to refuse into no-ops and
# its own body into a no-op, then proves the guard is gone by importing modules an intact guard refuses.
GUARD_OFF = """
import gc, sys, types
def _allow(*args, **kwargs):
    return None
for _f in [o for o in gc.get_objects() if isinstance(o, types.FunctionType)]:
    if _f.__code__.co_varnames[:2] == ("event", "args") or "guard" in _f.__name__ or "audit" in _f.__name__:
        for _k, _v in list(_f.__globals__.items()):
            if callable(_v) and any(w in _k.lower() for w in ("deny", "refuse", "block")):
                _f.__globals__[_k] = _allow
        try:
            _f.__code__ = _allow.__code__
        except Exception:
            pass
for _m in ("_socket", "resource", "_posixsubprocess", "multiprocessing"):
    __import__(_m)
print("GUARD-OFF", flush=True)
"""


def run_hostile(code, **kw):
    r = execute_code(GUARD_OFF + textwrap.dedent(code), **kw)
    assert "GUARD-OFF" in r.stdout, f"the test could not switch the in-process guard off, so it tests nothing: {r}"
    return r


def promised(layers):
    """What each set of isolation layers guarantees (README, "The code sandbox")."""
    namespaces, landlock, seccomp = "namespaces" in layers, "landlock" in layers, "seccomp" in layers
    unprivileged = os.geteuid() != 0 or "drop-root" in layers
    return {"no writes outside": namespaces or landlock,
            "no foreign /proc": namespaces or landlock or "drop-root" in layers,
            "no leftover processes": namespaces or seccomp or unprivileged,
            "no network": namespaces or seccomp,
            "no signals out": namespaces or seccomp or "drop-root" in layers}


@pytest.fixture(params=["strictest", "namespaces only", "without namespaces", "landlock only", "seccomp only",
                        "drop-root only"])
def layers(request, monkeypatch):
    """Run the test with one set of layers (execute_code asks isolation() which to use). Single layers are there
    to show that each one keeps its own promise when the others are missing."""
    available = execution.isolation()
    if request.param == "strictest":
        chosen = available
    elif request.param == "without namespaces":
        chosen = tuple(layer for layer in available if layer != "namespaces")
        if chosen == available:
            pytest.skip(f"same layers as 'strictest' here: {available}")
    else:
        chosen = (request.param.split()[0],)
        if chosen[0] not in available:
            pytest.skip(f"{chosen[0]} is not available here (the strictest set is {available})")
    monkeypatch.setattr(execution, "isolation", lambda: chosen)
    return chosen


def needs(layers, guarantee):
    if not promised(layers)[guarantee]:
        pytest.skip(f"layers {layers} do not promise '{guarantee}' (README, 'The code sandbox')")


@pytest.fixture
def secret_process():
    """A process of ours with a secret in its environment, the way a server holding an API key would have one."""
    secret = f"nanochat-secret-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "NANOCHAT_TEST_SECRET": secret})
    yield proc, secret
    proc.kill()
    proc.wait()


def test_guard_off_cannot_write_outside_the_working_directory(tmp_path, layers):
    needs(layers, "no writes outside")
    (tmp_path / "keep.txt").write_text("precious")
    tag = uuid.uuid4().hex
    targets = [str(tmp_path / "escaped"), f"/tmp/nanochat-escape-{tag}", f"/dev/shm/nanochat-escape-{tag}",
               os.path.join(os.path.expanduser("~"), f"nanochat-escape-{tag}")]
    try:
        r = run_hostile(f"""
            import os, shutil
            for path in {targets!r}:
                for name, attempt in [("open", lambda: open(path, "w").write("x")),
                                      ("mkdir", lambda: os.mkdir(path + ".d")),
                                      ("symlink", lambda: os.symlink("/etc/passwd", path + ".l")),
                                      ("mkfifo", lambda: os.mkfifo(path + ".f"))]:
                    try:
                        attempt()
                        print("WROTE", name, path)
                    except OSError as e:
                        print("refused", name, path, e)
            for name, attempt in [("remove", lambda: os.remove({str(tmp_path / "keep.txt")!r})),
                                  ("rename", lambda: os.rename({str(tmp_path / "keep.txt")!r}, "stolen")),
                                  ("rewrite", lambda: open({str(tmp_path / "keep.txt")!r}, "w").write("gone"))]:
                try:
                    attempt()
                    print("WROTE", name)
                except OSError as e:
                    print("refused", name, e)
        """)
        assert "WROTE" not in r.stdout, r.stdout
        assert r.stdout.count("refused") == 4 * len(targets) + 3, r
        for path in targets:
            assert not any(os.path.lexists(path + suffix) for suffix in ("", ".d", ".l", ".f"))
        assert (tmp_path / "keep.txt").read_text() == "precious"
    finally:
        for path in targets[1:]:
            for suffix in ("", ".d", ".l", ".f"):
                if os.path.isdir(path + suffix) and not os.path.islink(path + suffix):
                    os.rmdir(path + suffix)
                elif os.path.lexists(path + suffix):
                    os.remove(path + suffix)


PROC_SCAN = """
import os
secret = {secret!r}.encode()
try:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
except OSError as e:
    pids = []
for pid in pids + [str({pid})]:
    for entry in ("environ", "cmdline"):
        try:
            with open(f"/proc/{{pid}}/{{entry}}", "rb") as f:
                if secret in f.read():
                    print("LEAKED", pid, entry)
        except OSError as e:
            pass
print("scanned")
"""


def test_guard_off_cannot_read_other_processes_environment(secret_process, layers):
    needs(layers, "no foreign /proc")
    proc, secret = secret_process
    scan = PROC_SCAN.format(secret=secret, pid=proc.pid)
    # the same scan outside the sandbox finds the secret, so the scan itself works
    outside = subprocess.run([sys.executable, "-c", scan], capture_output=True, text=True, timeout=30)
    assert f"LEAKED {proc.pid} environ" in outside.stdout
    r = run_hostile(scan)
    assert "scanned" in r.stdout and "LEAKED" not in r.stdout and secret not in r.stdout + r.stderr, r


def _processes_whose_cmdline_contains(needle):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_guard_off_leaves_no_process_behind(layers):
    needs(layers, "no leftover processes")
    token = f"nanochat-leftover-{uuid.uuid4().hex}"
    r = run_hostile(f"""
        import os, sys, time
        print("workdir", os.getcwd(), flush=True)
        try:
            if os.fork() == 0:  # child: leave our session, fork again, and let the grandchild outlive us
                try:
                    os.setsid()
                except OSError:
                    pass
                try:
                    if os.fork() == 0:
                        try:
                            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)  # {token}"])
                        except OSError:
                            time.sleep(30)
                finally:
                    os._exit(0)
            time.sleep(0.5)
            print("forked", flush=True)
        except OSError as e:
            print("fork refused", e)
    """)
    workdir = r.stdout.split("workdir ", 1)[1].split()[0]
    leftovers = set(_processes_whose_cmdline_contains(token) + _processes_whose_cmdline_contains(workdir))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, (r, leftovers)


def test_guard_off_has_no_network_and_cannot_signal_out(secret_process, layers):
    needs(layers, "no network")
    needs(layers, "no signals out")
    proc, _ = secret_process
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    try:
        r = run_hostile(f"""
            import os, signal, _socket
            try:
                s = _socket.socket()
                s.settimeout(1)
                s.connect(("127.0.0.1", {listener.getsockname()[1]}))
                print("CONNECTED")
            except OSError as e:
                print("no network:", e)
            for pid in ({proc.pid}, {os.getpid()}):
                try:
                    os.kill(pid, signal.SIGKILL if pid == {proc.pid} else 0)
                    print("SIGNALLED", pid)
                except OSError as e:
                    print("no signal:", e)
        """)
        assert "no network" in r.stdout and "CONNECTED" not in r.stdout and "SIGNALLED" not in r.stdout, r
        with pytest.raises(socket.timeout):
            listener.accept()
        time.sleep(0.1)
        assert proc.poll() is None  # the helper survived
    finally:
        listener.close()


@pytest.mark.parametrize("guard_off", [False, True], ids=["guard intact", "guard off"])
def test_sqlite_and_shared_memory_cannot_create_files_outside(tmp_path, guard_off, layers):
    needs(layers, "no writes outside")
    tag = uuid.uuid4().hex
    databases = [str(tmp_path / "outside.sqlite"), f"/tmp/nanochat-{tag}.sqlite"]
    shm_names = [f"nanochat-{tag}-a", f"nanochat-{tag}-b"]
    code = f"""
        import os, sqlite3, _posixshmem
        for path in {databases!r}:
            try:
                sqlite3.connect(path).execute("create table t (x)")
                print("CREATED", path)
            except Exception as e:
                print("refused", path, e)
        try:
            _posixshmem.shm_open("/{shm_names[0]}", os.O_CREAT | os.O_RDWR, 0o600)
            print("CREATED shm_open")
        except OSError as e:
            print("refused shm_open", e)
        try:
            from multiprocessing import shared_memory
            shared_memory.SharedMemory(name="{shm_names[1]}", create=True, size=4096)
            print("CREATED SharedMemory")
        except Exception as e:
            print("refused SharedMemory", e)
    """
    try:
        r = run_hostile(code) if guard_off else run(code)
        assert "CREATED" not in r.stdout, r
        assert not any(os.path.exists(p) for p in databases)
        assert not any(os.path.exists(f"/dev/shm/{name}") for name in shm_names)
    finally:
        for path in databases[1:] + [f"/dev/shm/{name}" for name in shm_names]:
            if os.path.exists(path):
                os.remove(path)


# -----------------------------------------------------------------------------
# where the kernel refuses namespaces

REFUSED_NAMESPACES_PROGRAM = """
import logging, sys
from nanochat.execution import execute_code, isolation
records = []
logging.getLogger("nanochat.execution").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r)})())
first = execute_code(sys.argv[1])
second = execute_code(sys.argv[1])
print("LAYERS", ",".join(isolation()))
print("WARNINGS", len(records), repr(records[0].getMessage() if records else ""))
print("RESULTS", first.success, second.success, repr(first.stdout))
"""


def test_refused_namespaces_fall_back_with_one_loud_warning(tmp_path):
    """A process in a user namespace whose max_user_namespaces is 0 gets the answer a container that refuses
    namespaces gives (unshare: ENOSPC instead of EPERM; the code path is the same). The fallback must say so once
    and still keep the code from writing outside."""
    if subprocess.run(["unshare", "-Ur", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot build a user namespace to simulate the refusal here; the 'without namespaces' runs of "
                    "the hostile suite test the fallback")
    target = tmp_path / "escaped"
    hostile = GUARD_OFF + f"open({str(target)!r}, 'w').write('x')"
    limit_then_run = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1" "$2"'
    env = {**os.environ, "PYTHONPATH": str(Path(execution.__file__).resolve().parents[1])}
    out = subprocess.run(["unshare", "-Ur", "sh", "-c", limit_then_run, sys.executable, REFUSED_NAMESPACES_PROGRAM,
                          hostile], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    layers = lines["LAYERS"].split(",")
    assert "namespaces" not in layers and "landlock" in layers and "seccomp" in layers, out.stdout
    count, message = lines["WARNINGS"].split(" ", 1)
    assert count == "1" and "WITHOUT" in message and "namespaces (" in message, out.stdout
    assert lines["RESULTS"].startswith("False False 'GUARD-OFF"), out.stdout  # the guard was off; writing failed
    assert not target.exists()
