"""
Run untrusted Python (model-written code: HumanEval completions, the python tool) in a separate process.

    result = execute_code("print(1 + 1)")   # ExecutionResult(success=True, stdout='2\n', ...)
    isolation()                             # e.g. ('namespaces', 'drop-root', 'landlock', 'seccomp')

The operating system holds the code in, so nothing it does inside the interpreter matters. The child program
(nanochat/execution_child.py) puts these layers around it, each one where the kernel allows it (probed once per
process; a refused layer is logged once, as a warning):
- namespaces: its own user, mount, PID, network, IPC and UTS namespaces. Every mount is read-only except the
  working directory; /run is empty (no daemon sockets); /dev holds only null/zero/full/random/urandom; /proc is
  private (other processes' environments are not there to read); there is no network; the code is PID 1 of its
  namespace, so every process it starts dies with the call.
- drop-root: when we run as root, the code runs as nobody (it keeps CAP_DAC_READ_SEARCH so reads still work).
- landlock: the kernel refuses writes outside the working directory and reads of other processes' /proc entries.
- seccomp: no fork/exec, no sockets, no ptrace, no signals to other processes, no mount/namespace/bpf/io_uring.
Always, whatever the kernel allows: a fresh interpreter (`-I -B`) in its own session, a wall-clock timeout after
which the whole process group is killed, rlimits (memory, CPU time, file size, process count, no core dumps), a
byte cap on stdout/stderr (more kills the program), a scrubbed environment, stdin at /dev/null, a private working
directory deleted afterwards, and the audit hook of the earlier design as a second layer.

What it is not: a hiding place. The code reads whatever files the calling user can read (the Python installation
must stay readable), and a kernel bug is a way out. README, "The code sandbox", says what each layer guarantees.
"""

import functools
import json
import logging
import marshal
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Optional

DEFAULT_MAX_OUTPUT_BYTES = 1_000_000   # per stream; more than this kills the program
DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE inside the working directory
CHILD_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "execution_child.py")
# The child interpreter runs this; it reads CHILD_PROGRAM's bytecode from stdin (length-prefixed, ahead of the user's
# code), so that no call pays for compiling that program again.
_BOOTSTRAP = ("import marshal, sys; n = int.from_bytes(sys.stdin.buffer.read(8), 'little'); "
              "exec(marshal.loads(sys.stdin.buffer.read(n)), {'__name__': '__main__', '__builtins__': __builtins__})")
NOBODY = 65534  # uid and gid the code runs as under drop-root
LAYERS = ("namespaces", "drop-root", "landlock", "seccomp")
# the probe also reads every sys.path folder, so a layer that hides the Python installation counts as refused
_PROBE_CODE = """
import fractions, os, sys
for folder in sys.path:
    try:
        os.listdir(folder)
    except FileNotFoundError:
        pass
print("ok")
"""

logger = logging.getLogger(__name__)


@dataclass
class ExecutionResult:
    """Result of executing Python code in the sandbox."""
    success: bool
    stdout: str
    stderr: str
    error: Optional[str] = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self):
        parts = [f"ExecutionResult(success={self.success}"]
        if self.timeout:
            parts.append(", timeout=True")
        if self.memory_exceeded:
            parts.append(", memory_exceeded=True")
        if self.error:
            parts.append(f", error={self.error!r}")
        if self.stdout:
            parts.append(f", stdout={self.stdout[:200]!r}")
        if self.stderr:
            parts.append(f", stderr={self.stderr[:200]!r}")
        return "".join(parts) + ")"


# -----------------------------------------------------------------------------
# Which layers this machine allows, probed once per process

_layers = None
_layers_lock = threading.Lock()


def isolation():
    """The operating-system layers execute_code puts around the code here: a tuple drawn from LAYERS, the
    strictest set this machine allows. () means rlimits, the timeout and the audit hook only."""
    global _layers
    with _layers_lock:
        if _layers is None:
            _layers = _probe_layers()
        return _layers


def _probe_layers():
    if not sys.platform.startswith("linux"):
        logger.warning("the code sandbox has no operating-system isolation on %s: only rlimits, the timeout and an "
                       "in-process audit hook hold untrusted code in (README, 'The code sandbox')", sys.platform)
        return ()
    layers = [layer for layer in LAYERS if layer != "drop-root" or os.geteuid() == 0]
    refused = []
    while layers:
        result, status = _execute(_PROBE_CODE, tuple(layers), timeout=60, maximum_memory_bytes=None,
                                  max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES)
        if result.success and result.stdout == "ok\n":
            break
        setup_failed = isinstance(status, dict) and status.get("status") == "setup"
        culprit = status.get("layer") if setup_failed else None
        if culprit not in layers:  # the probe program failed: drop the layer most likely to hide something
            culprit = next(layer for layer in ("drop-root", "landlock", "seccomp", "namespaces") if layer in layers)
        reason = status.get("error") if setup_failed else result.error or result.stderr.strip()[-300:]
        refused.append(f"{culprit} ({reason})")
        layers.remove(culprit)
    if refused:
        logger.warning("the code sandbox runs WITHOUT %s. It has: %s, plus rlimits, the timeout and the audit hook; "
                       "untrusted code is held in less firmly than it could be (README, 'The code sandbox', says "
                       "what each layer guarantees)", "; ".join(refused), ", ".join(layers) or "no OS layer")
    return tuple(layers)


# -----------------------------------------------------------------------------
# Running the child

def _scrubbed_env(workdir):
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_capped(stream, cap, sink, on_overflow):
    """Read a pipe to EOF keeping at most `cap` bytes; call on_overflow() once when more than that arrives."""
    kept = 0
    overflowed = False
    while True:
        chunk = stream.read1(65536)
        if not chunk:
            break
        if kept < cap:
            sink.append(chunk[:cap - kept])
        kept += len(chunk)
        if kept > cap and not overflowed:
            overflowed = True
            on_overflow()
    stream.close()


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, timeout: float = 5.0, maximum_memory_bytes: Optional[int] = 256 * 1024 * 1024,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> ExecutionResult:
    """Run `code` in a fresh sandboxed interpreter and report how it ended.

    timeout: wall-clock seconds before the whole process group is killed.
    maximum_memory_bytes: address-space limit (None: no limit).
    max_output_bytes: cap per stream (stdout, stderr); exceeding it kills the program, output is truncated.
    success is True only if the code ran to its end without raising (SystemExit counts as a failure, as in
    the reference, so `exit()` cannot skip a HumanEval check).
    """
    return _execute(code, isolation(), timeout, maximum_memory_bytes, max_output_bytes)[0]


def _execute(code, layers, timeout, maximum_memory_bytes, max_output_bytes):
    """execute_code with the layers given; also returns the child's status report (the probe reads it)."""
    stdin_bytes = _child_program() + code.encode("utf-8", errors="replace")
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    if "drop-root" in layers:
        try:
            os.chown(workdir, NOBODY, NOBODY)  # the code runs as nobody and writes here
        except OSError as e:  # e.g. root of a user namespace that has no nobody
            shutil.rmtree(workdir, ignore_errors=True)
            status = {"status": "setup", "layer": "drop-root", "error": f"drop-root: cannot give nobody the working "
                      f"directory: {e}"}
            return _interpret({"stdout": "", "stderr": "", "returncode": 1, "timed_out": False, "overflow": []},
                              status, timeout, maximum_memory_bytes, max_output_bytes), status
    status_r, status_w = os.pipe()
    cfg = {"workdir": workdir, "mem": maximum_memory_bytes, "cpu": int(timeout) + 2, "fsize": DEFAULT_MAX_FILE_BYTES,
           "status_fd": status_w, "layers": list(layers), "nobody": NOBODY}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _BOOTSTRAP, json.dumps(cfg)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                                env=_scrubbed_env(workdir), start_new_session=True, pass_fds=(status_w,),
                                close_fds=True)
    except BaseException:
        os.close(status_r)
        os.close(status_w)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    os.close(status_w)  # only the child holds the write end now: EOF on our side means it is gone
    try:
        run = _collect(proc, stdin_bytes, status_r, timeout, max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        status = json.loads(run["status"].decode("utf-8", errors="replace") or "null")
    except ValueError:
        status = None
    return _interpret(run, status, timeout, maximum_memory_bytes, max_output_bytes), status


def _collect(proc, stdin_bytes, status_r, timeout, max_output_bytes):
    """Feed the child program and the code, read the streams with their cap, wait with the timeout; always leaves nothing running."""
    pgid = proc.pid  # start_new_session: the child leads its own group
    overflow, out_chunks, err_chunks, status_chunks = [], [], [], []

    def on_overflow(name):
        overflow.append(name)
        _kill_group(pgid)

    readers = [
        threading.Thread(target=_read_capped, args=(proc.stdout, max_output_bytes, out_chunks,
                                                   lambda: on_overflow("stdout")), daemon=True),
        threading.Thread(target=_read_capped, args=(proc.stderr, max_output_bytes, err_chunks,
                                                   lambda: on_overflow("stderr")), daemon=True),
        threading.Thread(target=_read_status, args=(status_r, status_chunks), daemon=True),
    ]
    timed_out = False
    try:
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin_bytes)
        except (BrokenPipeError, OSError):
            pass  # the child died before reading everything; its exit status says why
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            _wait_without_reaping(proc.pid, timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        # Also on errors/KeyboardInterrupt here. The leader is a zombie (or still running if it timed out), so
        # its group id cannot have been reused: killing the group also takes down anything it left behind.
        _kill_group(pgid)
        returncode = proc.wait()
        for t in readers:
            if t.ident is not None:  # started
                t.join(timeout=5)
        if readers[2].ident is None:
            os.close(status_r)  # normally the status reader closes it
    return {"stdout": b"".join(out_chunks).decode("utf-8", errors="replace"),
            "stderr": b"".join(err_chunks).decode("utf-8", errors="replace"),
            "status": b"".join(status_chunks), "returncode": returncode, "timed_out": timed_out,
            "overflow": overflow}


def _interpret(run, status, timeout, maximum_memory_bytes, max_output_bytes):
    stdout, stderr, returncode = run["stdout"], run["stderr"], run["returncode"]
    kind = status.get("status") if isinstance(status, dict) else None
    if run["timed_out"]:
        return ExecutionResult(False, stdout, stderr, f"Execution timed out after {timeout:g} s (process killed)",
                               timeout=True)
    if run["overflow"]:
        return ExecutionResult(False, stdout, stderr, f"Output limit exceeded: more than {max_output_bytes} bytes "
                               f"written to {run['overflow'][0]} (process killed, output truncated)")
    if kind == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr, None)
    if kind == "memory":
        limit = f" ({maximum_memory_bytes // (1024 * 1024)} MB)" if maximum_memory_bytes else ""
        return ExecutionResult(False, stdout, stderr, f"Memory limit exceeded{limit}: {status.get('error')}",
                               memory_exceeded=True)
    if kind == "error":
        return ExecutionResult(False, stdout, stderr, status.get("error"))
    if kind == "setup":
        return ExecutionResult(False, stdout, stderr, f"Sandbox setup failed, the code did not run: "
                               f"{status.get('error')}")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (CPU time limit)" if name == "SIGXCPU" else " (file size limit)" if name == "SIGXFSZ" else \
            " (possibly out of memory)" if name in ("SIGSEGV", "SIGABRT", "SIGBUS") else ""
        return ExecutionResult(False, stdout, stderr, f"Process killed by {name}{hint}")
    return ExecutionResult(False, stdout, stderr, f"Process exited with code {returncode} without finishing "
                           "the program (os._exit, or the sandbox's status pipe was closed)")


@functools.lru_cache(maxsize=None)
def _child_program():
    """CHILD_PROGRAM compiled once per process, as the bootstrap reads it: 8-byte length, then marshal data."""
    with open(CHILD_PROGRAM, "rb") as f:
        data = marshal.dumps(compile(f.read(), CHILD_PROGRAM, "exec"))
    return len(data).to_bytes(8, "little") + data


def _read_status(fd, sink):
    """Raw reads: a buffered read would wait for 64 KiB or EOF, and EOF waits for every holder of the pipe."""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if sum(len(c) for c in sink) < 65536:
                sink.append(chunk)
    finally:
        os.close(fd)


def _wait_without_reaping(pid, timeout):
    """Block until `pid` exits (leaving it a zombie) or raise TimeoutExpired after `timeout` seconds."""
    done = threading.Event()

    def waiter():
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        done.set()

    threading.Thread(target=waiter, daemon=True).start()
    if not done.wait(timeout):
        raise subprocess.TimeoutExpired(cmd="sandbox", timeout=timeout)
