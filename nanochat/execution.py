"""
Run untrusted Python (model-written code: HumanEval completions, the python tool) in a separate process.

    result = execute_code("print(1 + 1)")   # ExecutionResult(success=True, stdout='2\n', ...)

What contains the code (each layer is cheap; together they stop what a simple or careless program would do):
- a fresh interpreter (`sys.executable -I -B`: no user site, no PYTHON* variables, no .pyc writes) in its own
  session and process group, so it cannot signal our group, and the whole group is SIGKILLed on timeout;
- a wall-clock timeout measured by the parent, plus RLIMIT_CPU in the child as a backstop;
- RLIMIT_AS/RLIMIT_DATA (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC=0 (no new processes for
  non-root users; root is exempt from it, so the audit hook below is what stops forks there), RLIMIT_CORE=0;
- stdout/stderr read through pipes with a byte cap: a program printing 100 MB is killed and truncated,
  never buffered whole;
- a scrubbed environment (no inherited secrets), stdin at /dev/null (and `sys.stdin` refuses reads),
  a private temporary working directory that is deleted afterwards;
- a `sys.addaudithook` guard installed before the user code runs (audit hooks cannot be removed from
  Python code) that refuses: sockets, creating processes (fork/exec/spawn/system/Popen), signalling other
  processes, writing/deleting/renaming anything outside the working directory, reading other processes'
  /proc entries, ctypes/cffi, changing resource limits;
- when the kernel allows it (`unshare --net` works), a private network namespace with no interfaces.

What it is not: a kernel-enforced jail. Code that reads files the parent can read still reads them, and a
determined attacker with deep knowledge of CPython internals may find a way around the audit hook. Run
evaluations of untrusted models inside a container/VM as well.
"""

import json
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
# The program the child interpreter runs (passed with -c). It reads the user code from stdin, locks itself
# down, runs the code, and reports how it ended on a private status pipe (so that printing to stdout or
# calling os._exit cannot fake a success).

_RUNNER = r'''
import sys, os, json, builtins, resource, traceback
cfg = json.loads(sys.argv[1])
code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
_devnull = os.open(os.devnull, os.O_RDONLY); os.dup2(_devnull, 0); os.close(_devnull)

class _NoStdin:
    def _refuse(self, *a, **k):
        raise OSError("stdin is not available in the sandbox")
    read = readline = readlines = __iter__ = __next__ = _refuse
    def readable(self): return False
    def isatty(self): return False
    def fileno(self): return 0
    def close(self): pass
sys.stdin = _NoStdin()

status = os.fdopen(cfg["status_fd"], "w")
workdir = os.path.realpath(cfg["workdir"])
mypid = os.getpid()

def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # a limit already lower than ours (or unsupported here) is fine
if cfg["mem"]:
    _limit(resource.RLIMIT_AS, cfg["mem"]); _limit(resource.RLIMIT_DATA, cfg["mem"])
_limit(resource.RLIMIT_CPU, cfg["cpu"])
_limit(resource.RLIMIT_FSIZE, cfg["fsize"])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, 0)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED_EVENTS = {
    "os.system": "running shell commands", "os.exec": "exec", "os.fork": "creating processes",
    "os.forkpty": "creating processes", "os.posix_spawn": "creating processes", "os.spawn": "creating processes",
    "subprocess.Popen": "creating processes", "os.startfile": "starting programs",
    "resource.setrlimit": "changing resource limits", "resource.prlimit": "changing resource limits",
"os.chroot": "chroot", "os.setuid": "changing user",
    "pty.spawn": "creating processes", "webbrowser.open": "opening a browser", "os.putenv": None,
}
_BLOCKED_IMPORTS = {"cffi", "_cffi_backend", "_posixsubprocess", "resource", "pty",
                    "multiprocessing", "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "asyncio"}
# events whose arguments at these positions are paths that get written/removed/renamed
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.symlink": (1,),
                "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                "shutil.chown": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
_realpath, _isdir, _fspath = os.path.realpath, os.path.isdir, os.fspath

def _deny(what):
    raise PermissionError(f"sandbox: {what} is not allowed")

def _inside(path):
    try:
        p = _realpath(_fspath(path))
    except (TypeError, ValueError):
        return True  # file descriptors etc.: they were checked when opened
    if isinstance(p, bytes):
        p = p.decode("utf-8", "replace")
    return p == workdir or p.startswith(workdir + "/") or p == "/dev/null"

def _proc_of_other(path):
    p = _fspath(path)
    if isinstance(p, bytes):
        p = p.decode("utf-8", "replace")
    p = _realpath(p)
    if p.startswith("/proc/"):
        head = p[6:].split("/", 1)[0]
        return head.isdigit() and int(head) != mypid
    return False

def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if _proc_of_other(path):
            _deny(f"reading another process's /proc entry ({path})")
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not _inside(path):
            _deny(f"writing outside the working directory ({path})")
        if mode is None and not _inside(path) and _isdir(path):
            _deny(f"opening a directory outside the working directory as a file descriptor ({path})")
        return
    if event == "import":
        name = args[0]
        if name.split(".")[0] in _BLOCKED_IMPORTS:
            _deny(f"importing {name}")
        return
    if event.startswith("socket."):
        _deny("network access (" + event + ")")
    if event.startswith("ctypes."):
        # importing ctypes (numpy does) opens the process's own symbol table: allowed; calling, loading
        # libraries or touching raw memory through it is not
        if event == "ctypes.dlopen" and args[0] is None:
            return
        _deny("ctypes (" + event + ")")
    if event in _BLOCKED_EVENTS:
        if _BLOCKED_EVENTS[event] is None:
            return
        _deny(_BLOCKED_EVENTS[event] + f" ({event})")
    if event in ("os.kill", "os.killpg"):
        if args[0] not in (mypid, 0) or event == "os.killpg":
            _deny(f"signalling other processes ({event} {args[0]})")
        return
    if event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and args[i] is not None and not _inside(args[i]):
                _deny(f"modifying files outside the working directory ({event} {args[i]})")
        if event in ("os.rename", "os.link") and any(a is not None and a != -1 for a in args[2:4]):
            _deny(f"{event} with dir_fd")
        return

for _name in ("socket", "_socket", "resource", "_posixsubprocess"):
    sys.modules.pop(_name, None)
sys.addaudithook(_guard)
del _name

def _report(**kw):
    try:
        status.write(json.dumps(kw)); status.flush(); status.close()
    except Exception:
        pass

try:
    exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError as e:
    _report(status="memory", error=f"{type(e).__name__}: {e}"[:2000])
except BaseException as e:
    try:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this runner's own frame
    except Exception:
        pass
    _report(status="error", error=f"{type(e).__name__}: {e}"[:2000])
else:
    _report(status="ok")
try:
    sys.stdout.flush(); sys.stderr.flush()
except Exception:
    pass
'''


# -----------------------------------------------------------------------------
# Optional kernel-level network isolation, probed once per process.

_isolation_prefix = None
_isolation_lock = threading.Lock()


def _network_isolation_prefix():
    """["unshare", "--net", ...] when this machine lets us create a network namespace, else []."""
    global _isolation_prefix
    with _isolation_lock:
        if _isolation_prefix is None:
            _isolation_prefix = []
            unshare = shutil.which("unshare")
            if unshare and sys.platform.startswith("linux"):
                prefix = [unshare, "--net"] + (["--map-root-user"] if os.geteuid() != 0 else []) + ["--"]
                try:
                    probe = subprocess.run(prefix + [sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
                    if probe.returncode == 0:
                        _isolation_prefix = prefix
                except (OSError, subprocess.SubprocessError):
                    pass
        return _isolation_prefix


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
    workdir = tempfile.mkdtemp(prefix="nanochat-sandbox-")
    status_r, status_w = os.pipe()
    cfg = {"workdir": workdir, "mem": maximum_memory_bytes, "cpu": int(timeout) + 2, "fsize": DEFAULT_MAX_FILE_BYTES,
           "status_fd": status_w}
    cmd = _network_isolation_prefix() + [sys.executable, "-I", "-B", "-c", _RUNNER, json.dumps(cfg)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=workdir, env=_scrubbed_env(workdir), start_new_session=True,
                                pass_fds=(status_w,), close_fds=True)
    except BaseException:
        os.close(status_r)
        os.close(status_w)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    os.close(status_w)  # only the child holds the write end now: EOF on our side means it is gone
    pgid = proc.pid  # start_new_session: the child leads its own group
    overflow = []

    def on_overflow(name):
        overflow.append(name)
        _kill_group(pgid)

    out_chunks, err_chunks, status_chunks = [], [], []
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
            proc.stdin.write(code.encode("utf-8", errors="replace"))
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
        shutil.rmtree(workdir, ignore_errors=True)

    stdout = b"".join(out_chunks).decode("utf-8", errors="replace")
    stderr = b"".join(err_chunks).decode("utf-8", errors="replace")
    try:
        status = json.loads(b"".join(status_chunks).decode("utf-8", errors="replace") or "null")
    except ValueError:
        status = None

    if timed_out:
        return ExecutionResult(False, stdout, stderr, f"Execution timed out after {timeout:g} s (process killed)",
                               timeout=True)
    if overflow:
        return ExecutionResult(False, stdout, stderr, f"Output limit exceeded: more than {max_output_bytes} bytes "
                               f"written to {overflow[0]} (process killed, output truncated)")
    if isinstance(status, dict) and status.get("status") == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr, None)
    if isinstance(status, dict) and status.get("status") == "memory":
        limit = f" ({maximum_memory_bytes // (1024 * 1024)} MB)" if maximum_memory_bytes else ""
        return ExecutionResult(False, stdout, stderr, f"Memory limit exceeded{limit}: {status.get('error')}",
                               memory_exceeded=True)
    if isinstance(status, dict) and status.get("status") == "error":
        return ExecutionResult(False, stdout, stderr, status.get("error"))
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        hint = " (CPU time limit)" if name == "SIGXCPU" else " (file size limit)" if name == "SIGXFSZ" else \
            " (possibly out of memory)" if name in ("SIGSEGV", "SIGABRT", "SIGBUS") else ""
        return ExecutionResult(False, stdout, stderr, f"Process killed by {name}{hint}")
    return ExecutionResult(False, stdout, stderr, f"Process exited with code {returncode} without finishing "
                           "the program (os._exit, or the sandbox's status pipe was closed)")


def _read_status(fd, sink):
    with os.fdopen(fd, "rb") as f:
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            if sum(len(c) for c in sink) < 65536:
                sink.append(chunk)


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
