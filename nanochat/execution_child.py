"""
The program the sandbox's child interpreter runs: nanochat.execution starts `python -I -B -c BOOTSTRAP CONFIG` and
sends this file's bytecode, then the untrusted code, on stdin; nothing imports this file. It locks itself in with
the layers CONFIG names, runs the code, and reports how it ended on a private status pipe (so printing or os._exit
cannot fake a success).

The layers (README, "The code sandbox", says what each one guarantees and what it does not):
- namespaces: fresh user, mount, PID, network, IPC and UTS namespaces. The runner forks a helper that unshares them;
  the runner, still outside, writes the helper's uid/gid maps; the helper forks the sandbox process, PID 1 of the new
  PID namespace, so every process the code starts dies with it. The sandbox remounts every mount read-only, lays an
  empty read-only tmpfs over /run, keeps only null, zero, full, random and urandom in /dev, binds the working
  directory back read-write, mounts a private read-only /proc, checks that nothing else it can reach is writable,
  and gives up its capabilities.
- drop-root (only when the caller is root): the code runs as nobody (uid 65534) and keeps CAP_DAC_READ_SEARCH only,
  so it still reads the Python installation (often under /root) but writes, signals and connects as nobody.
- landlock: the kernel refuses writes outside the working directory and reads of other processes' /proc entries.
- seccomp: no new processes or programs, no sockets, no ptrace, no signals to other processes, no mount, namespace,
  keyring, bpf, io_uring or module system calls.
Always: rlimits (memory, CPU time, file size, process count, core dumps), the scrubbed environment the parent
passes, and the audit hook of the previous design as a second layer (code inside can switch it off; PEP 578 says
audit hooks are no security boundary, which is why the layers above exist).
"""

import builtins
import ctypes
import json
import os
import re
import resource
import signal
import struct
import sys
import traceback

libc = ctypes.CDLL(None, use_errno=True)

SANDBOX_ID_IN_NAMESPACE = 1  # under drop-root the code's uid/gid inside the user namespace (0 stays root)
CAP_DAC_READ_SEARCH = 2
NAMESPACE_FLAGS = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000  # user mnt pid net ipc uts
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 8, 22, 24, 38
DEVICES = ("null", "zero", "full", "random", "urandom")
HIDDEN_DIRS = ("/run", "/var/run")  # daemons' sockets (docker, dbus, ssh-agent) and runtime state


class SetupError(Exception):
    """A layer could not be put in place; the code does not run (the parent's probe then drops that layer)."""

    def __init__(self, layer, message):
        super().__init__(f"{layer}: {message}")
        self.layer = layer


def _check(result, what):
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _prctl(option, arg=0):
    return _check(libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
                  f"prctl({option})")


def _mount(source, target, fstype, flags, data=None):
    source, fstype, data = (None if s is None else os.fsencode(s) for s in (source, fstype, data))
    _check(libc.mount(source, os.fsencode(target), fstype, ctypes.c_ulong(flags), data), f"mount {target}")


def _syscall(number, *args):
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(libc.syscall(ctypes.c_long(number), *converted), f"syscall {number}")


# -----------------------------------------------------------------------------
# namespaces: process layout and id maps

def enter_namespaces(nobody):
    """Returns only in the sandbox process (PID 1 of a new PID namespace); the runner and the helper wait for it
    and exit the way it did. `nobody`: the outer uid/gid the code gets under drop-root (None: no drop-root)."""
    helper_ready_r, helper_ready_w = os.pipe()
    maps_written_r, maps_written_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(helper_ready_r)
        os.close(maps_written_w)
        try:
            _check(libc.unshare(NAMESPACE_FLAGS), "unshare")
        except OSError as e:
            raise SetupError("namespaces", str(e))
        os.write(helper_ready_w, b"u")
        if os.read(maps_written_r, 1) != b"m":
            os._exit(1)  # the runner could not write our maps and has reported why
        os.close(maps_written_r)
        os.close(helper_ready_w)
        sandbox = os.fork()
        if sandbox == 0:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the helper killed (timeout) -> the namespace dies too
            return
        exit_like(sandbox)
    os.close(helper_ready_w)
    os.close(maps_written_r)
    if os.read(helper_ready_r, 1) == b"u":
        write_id_maps(helper, nobody)
        os.write(maps_written_w, b"m")
    exit_like(helper)


def write_id_maps(pid, nobody):
    """Root (who may map any id) keeps root as root and maps the sandbox id to nobody; anyone else maps itself."""
    uid, gid = os.geteuid(), os.getegid()
    if nobody is not None:
        try:
            for kind in ("uid", "gid"):
                with open(f"/proc/{pid}/{kind}_map", "w") as f:
                    f.write(f"0 0 1\n{SANDBOX_ID_IN_NAMESPACE} {nobody} 1\n")
        except OSError as e:
            raise SetupError("drop-root", f"cannot map nobody into the user namespace: {e}")
        return
    try:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")  # required before an unprivileged gid_map
        for kind, outer in (("uid", uid), ("gid", gid)):
            with open(f"/proc/{pid}/{kind}_map", "w") as f:
                f.write(f"0 {outer} 1\n")
    except OSError as e:
        raise SetupError("namespaces", f"cannot write the user namespace's id maps: {e}")


def exit_like(pid):
    """Wait for `pid` and end this process the same way (exit code or signal), so the parent sees how it ended."""
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


# -----------------------------------------------------------------------------
# namespaces: the file system

def _mount_table():
    """(mount point, flags to keep, fstype) for each line of /proc/self/mountinfo."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
            "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    table = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, rest = line.partition(" - ")
            fields = fields.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            options = fields[5].split(",")
            flags = sum(keep[o] for o in options if o in keep)
            if not flags & (MS_NOATIME | MS_RELATIME):
                flags |= MS_STRICTATIME  # the atime mode of a mount a user namespace inherits must be kept as is
            table.append((point, flags, rest.split()[0]))
    return table


def _make_every_mount_read_only():
    for point, flags, fstype in _mount_table():
        if fstype == "autofs" or point == "/proc" or point.startswith("/proc/"):
            continue  # autofs would be triggered; /proc gets a private instance on top
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as e:
            # hidden under another mount (or not reachable for us, so not for the code either): the final
            # check below makes sure nothing reachable stayed writable
            if e.errno not in (2, 13, 20, 22):  # ENOENT EACCES ENOTDIR EINVAL
                raise


def _fresh_tmpfs(path):
    _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")


def _minimal_dev(device_fds):
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in device_fds.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")  # exists, read-only: shm_open fails instead of writing to the host's /dev/shm


def build_file_system(workdir):
    """Everything read-only except `workdir`; /run hidden; private /dev and /proc."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    workdir_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    device_fds = {name: os.open(f"/dev/{name}", os.O_PATH) for name in DEVICES if os.path.exists(f"/dev/{name}")}
    _make_every_mount_read_only()
    hidden = []
    for path in HIDDEN_DIRS:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in hidden and real != "/":
            _fresh_tmpfs(real)
            hidden.append(real)
    _minimal_dev(device_fds)
    os.makedirs(workdir, exist_ok=True)  # a mount point inside the tmpfs over /run if TMPDIR is there
    _mount(f"/proc/self/fd/{workdir_fd}", workdir, None, MS_BIND)
    kept = [flags for point, flags, _ in _mount_table() if point == workdir][-1]  # e.g. a locked noatime
    _mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | kept)  # read-write again
    for path in hidden + ["/dev"]:
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for fd in [workdir_fd, *device_fds.values()]:
        os.close(fd)
    os.chdir(workdir)  # the old cwd is on the read-only mount underneath
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    _check_nothing_else_writable(workdir)


def _check_nothing_else_writable(workdir):
    for point, _, fstype in _mount_table():
        if fstype == "autofs" or point == workdir or point.startswith(workdir + "/"):
            continue
        try:
            writable = not os.statvfs(point).f_flag & os.ST_RDONLY
        except OSError:
            continue  # not reachable from here
        if writable:
            raise SetupError("namespaces", f"{point} is still writable inside the sandbox")


# -----------------------------------------------------------------------------
# capabilities and user

def _capset(keep):
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    low = sum(1 << c for c in keep if c < 32)
    data = struct.pack("6I", low, low, 0, 0, 0, 0)  # effective, permitted, inheritable for caps 0-31, then 32-63
    _check(libc.capset(header, data), "capset")


def drop_privileges(in_namespace, nobody):
    """Give up every capability (drop-root keeps CAP_DAC_READ_SEARCH to read the Python install) and, for root
    callers under drop-root, become nobody. Set no_new_privs so no program can give any of it back."""
    drop_root = nobody is not None
    if in_namespace or os.geteuid() == 0:
        keep = {CAP_DAC_READ_SEARCH} if drop_root else set()
        if drop_root:
            os.setgroups([])
        for cap in range(64):
            if cap not in keep and libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0),
                                              ctypes.c_ulong(0), ctypes.c_ulong(0)) == -1:
                if ctypes.get_errno() == 22:  # EINVAL: past the last capability this kernel knows
                    break
                _check(-1, "dropping the capability bounding set")
        if drop_root:
            target = SANDBOX_ID_IN_NAMESPACE if in_namespace else nobody
            _prctl(PR_SET_KEEPCAPS, 1)
            try:
                os.setresgid(target, target, target)
                os.setresuid(target, target, target)
            except OSError as e:
                raise SetupError("drop-root", f"cannot become nobody: {e}")
            _prctl(PR_SET_KEEPCAPS, 0)
        _capset(keep)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if in_namespace:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # changing ids cleared it


# -----------------------------------------------------------------------------
# landlock

LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | (1 << 14)  # + TRUNCATE (ABI 3)
LL_READ = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR


def _landlock_rule(ruleset, path, rights):
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a dangling link or a vanished /proc entry: nothing to allow
    try:
        if not os.path.isdir(path):
            rights &= LL_FILE_RIGHTS
        _syscall(445, ruleset, 1, struct.pack("=Qi", rights, fd), 0)  # landlock_add_rule(PATH_BENEATH)
    finally:
        os.close(fd)


def apply_landlock(workdir):
    """Writes only beneath `workdir` (and to /dev/null & co), reads everywhere except other processes' /proc."""
    try:
        abi = _syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    except OSError as e:
        raise SetupError("landlock", f"not available in this kernel: {e}")
    handled = (1 << 13) - 1 | (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # fs rights, REFER, TRUNCATE
    fields = [handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0]  # TCP bind+connect; abstract sockets+signals
    size = 8 * (1 + (abi >= 4) + (abi >= 6))
    ruleset = _syscall(444, struct.pack("3Q", *fields)[:size], size, 0)
    try:
        for entry in os.listdir("/"):
            if entry != "proc":
                _landlock_rule(ruleset, f"/{entry}", LL_READ)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():  # "self" and "thread-self" resolve to our own entry
                _landlock_rule(ruleset, f"/proc/{entry}", LL_READ)
        _landlock_rule(ruleset, f"/proc/{os.getpid()}", LL_READ)
        for name in DEVICES:
            _landlock_rule(ruleset, f"/dev/{name}", LL_READ_FILE | LL_WRITE_FILE)
        _landlock_rule(ruleset, workdir, handled)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall(446, ruleset, 0)  # landlock_restrict_self
    finally:
        os.close(ruleset)


# -----------------------------------------------------------------------------
# seccomp

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# name: (x86_64, aarch64) system call numbers (asm/unistd_64.h, asm-generic/unistd.h)
SYSCALLS = {
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281), "socket": (41, 198),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "tkill": (200, 130),
    "pidfd_send_signal": (424, 424), "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "unshare": (272, 97),
    "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "reboot": (169, 142), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "setsid": (112, 157), "setpgid": (109, 154), "open_tree": (428, 428), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89),
    "memfd_create": (319, 279),
}
CLONE, CLONE3, PRCTL = (56, 220), (435, 435), (157, 167)
SELF_ONLY = {"kill": (62, 129), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240)}


def _bpf(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp_program(arch_index, audit_arch, my_pid):
    """A classic BPF filter: refuse (EPERM) the calls above, clone without CLONE_THREAD, signals to anyone but
    ourselves and changing the parent-death signal; clone3 answers ENOSYS so that libc creates threads with clone."""
    load, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    arg0 = 16  # offsetof(struct seccomp_data, args[0]), low 32 bits on little-endian
    prog = [_bpf(load, 4), _bpf(jeq, audit_arch, 1, 0), _bpf(ret, eperm), _bpf(load, 0)]
    if arch_index == 0:
        prog += [_bpf(jge, 0x40000000, 0, 1), _bpf(ret, eperm)]  # the x32 ABI's numbers
    for numbers in SYSCALLS.values():
        if numbers[arch_index] is not None:
            prog += [_bpf(jeq, numbers[arch_index], 0, 1), _bpf(ret, eperm)]
    prog += [_bpf(jeq, CLONE3[arch_index], 0, 1), _bpf(ret, enosys)]
    prog += [_bpf(jeq, CLONE[arch_index], 0, 4), _bpf(load, arg0), _bpf(jset, 0x00010000, 0, 1),
             _bpf(ret, allow), _bpf(ret, eperm)]
    for numbers in SELF_ONLY.values():
        prog += [_bpf(jeq, numbers[arch_index], 0, 4), _bpf(load, arg0), _bpf(jeq, my_pid, 0, 1),
                 _bpf(ret, allow), _bpf(ret, eperm)]
    prog += [_bpf(jeq, PRCTL[arch_index], 0, 4), _bpf(load, arg0), _bpf(jeq, PR_SET_PDEATHSIG, 0, 1),
             _bpf(ret, eperm), _bpf(ret, allow)]
    return prog + [_bpf(ret, allow)]


def apply_seccomp():
    machine = os.uname().machine
    if machine not in AUDIT_ARCH:
        raise SetupError("seccomp", f"no system call table for {machine}")
    prog = seccomp_program(list(AUDIT_ARCH).index(machine), AUDIT_ARCH[machine], os.getpid())
    program = ctypes.create_string_buffer(b"".join(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(program, ctypes.c_void_p))
    try:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")
    except OSError as e:
        raise SetupError("seccomp", str(e))


# -----------------------------------------------------------------------------
# rlimits and the audit hook (second layer)

def _limit(which, value):
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass  # a limit already lower than ours (or unsupported here) is fine


def set_limits(cfg, in_namespace):
    if cfg["mem"]:
        _limit(resource.RLIMIT_AS, cfg["mem"])
        _limit(resource.RLIMIT_DATA, cfg["mem"])
    _limit(resource.RLIMIT_CPU, cfg["cpu"])
    _limit(resource.RLIMIT_FSIZE, cfg["fsize"])
    _limit(resource.RLIMIT_CORE, 0)
    # counted per user namespace: inside one, a small number still allows threads; outside, it counts every
    # process of our user, so only 0 stops new ones (root is exempt from it either way)
    _limit(resource.RLIMIT_NPROC, 16 if in_namespace else 0)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED_EVENTS = {
    "os.system": "running shell commands", "os.exec": "exec", "os.fork": "creating processes",
    "os.forkpty": "creating processes", "os.posix_spawn": "creating processes", "os.spawn": "creating processes",
    "subprocess.Popen": "creating processes", "os.startfile": "starting programs",
    "resource.setrlimit": "changing resource limits", "resource.prlimit": "changing resource limits",
    "os.chroot": "chroot", "os.setuid": "changing user", "pty.spawn": "creating processes",
    "webbrowser.open": "opening a browser",
}
_BLOCKED_IMPORTS = {"cffi", "_cffi_backend", "_posixsubprocess", "resource", "pty", "multiprocessing",
                    "_multiprocessing", "_posixshmem", "socket", "_socket", "ssl", "_ssl", "asyncio"}
# events whose arguments at these positions are paths that get written/removed/renamed
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.symlink": (1,),
                "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
                "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
                "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                "shutil.chown": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}


def _deny(what):
    raise PermissionError(f"sandbox: {what} is not allowed")


def make_audit_hook(workdir, my_pid):
    realpath, isdir, fspath = os.path.realpath, os.path.isdir, os.fspath

    def as_text(path):
        p = realpath(fspath(path))
        return p.decode("utf-8", "replace") if isinstance(p, bytes) else p

    def inside(path):
        try:
            p = as_text(path)
        except (TypeError, ValueError):
            return True  # file descriptors etc.: they were checked when opened
        return p == workdir or p.startswith(workdir + "/") or p == "/dev/null"

    def proc_of_other(path):
        p = as_text(path)
        head = p[6:].split("/", 1)[0] if p.startswith("/proc/") else ""
        return head.isdigit() and int(head) != my_pid

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            if proc_of_other(path):
                _deny(f"reading another process's /proc entry ({path})")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not inside(path):
                _deny(f"writing outside the working directory ({path})")
            if mode is None and not inside(path) and isdir(path):
                _deny(f"opening a directory outside the working directory as a file descriptor ({path})")
        elif event == "import":
            if args[0].split(".")[0] in _BLOCKED_IMPORTS:
                _deny(f"importing {args[0]}")
        elif event.startswith("socket."):
            _deny("network access (" + event + ")")
        elif event.startswith("ctypes."):
            # importing ctypes (numpy does) opens the process's own symbol table: allowed; calling, loading
            # libraries or touching raw memory through it is not
            if not (event == "ctypes.dlopen" and args[0] is None):
                _deny("ctypes (" + event + ")")
        elif event == "sqlite3.connect":
            if args[0] != ":memory:" and not inside(args[0]):
                _deny(f"opening a database outside the working directory ({args[0]})")
        elif event in _BLOCKED_EVENTS:
            _deny(_BLOCKED_EVENTS[event] + f" ({event})")
        elif event in ("os.kill", "os.killpg"):
            if args[0] != my_pid or event == "os.killpg":
                _deny(f"signalling other processes ({event} {args[0]})")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    _deny(f"modifying files outside the working directory ({event} {args[i]})")
            if event in ("os.rename", "os.link") and any(a is not None and a != -1 for a in args[2:4]):
                _deny(f"{event} with dir_fd")
    return guard


# -----------------------------------------------------------------------------
# main

class _NoStdin:
    def _refuse(self, *a, **k):
        raise OSError("stdin is not available in the sandbox")
    read = readline = readlines = __iter__ = __next__ = _refuse

    def readable(self):
        return False

    def isatty(self):
        return False

    def fileno(self):
        return 0

    def close(self):
        pass


def _report(pipe, **kw):
    try:
        pipe.write(json.dumps(kw))
        pipe.flush()
        pipe.close()
    except Exception:
        pass


def lock_down(cfg):
    """Put every layer cfg names in place, in an order where each step still has what it needs."""
    layers, workdir = cfg["layers"], cfg["workdir"]
    in_namespace = "namespaces" in layers
    nobody = cfg["nobody"] if "drop-root" in layers else None
    if in_namespace:
        enter_namespaces(nobody)
        try:
            build_file_system(workdir)
        except OSError as e:
            raise SetupError("namespaces", f"cannot build the read-only file system: {e}")
    drop_privileges(in_namespace, nobody)
    set_limits(cfg, in_namespace)
    if "landlock" in layers:
        try:
            apply_landlock(workdir)
        except OSError as e:
            raise SetupError("landlock", str(e))
    if "seccomp" in layers:
        apply_seccomp()


def run_code(code, status):
    try:
        exec(compile(code, "<sandbox>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError as e:
        _report(status, status="memory", error=f"{type(e).__name__}: {e}"[:2000])
    except BaseException as e:
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # skip this runner's own frame
        except Exception:
            pass
        _report(status, status="error", error=f"{type(e).__name__}: {e}"[:2000])
    else:
        _report(status, status="ok")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass


def main():
    cfg = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read().decode("utf-8", errors="replace")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = _NoStdin()
    status = os.fdopen(cfg["status_fd"], "w")
    _limit(resource.RLIMIT_CORE, 0)  # also for the runner and helper, who re-raise the sandbox's fatal signal
    try:
        lock_down(cfg)
    except SetupError as e:
        _report(status, status="setup", layer=e.layer, error=str(e))
        os._exit(1)
    except OSError as e:
        _report(status, status="setup", layer="rlimits", error=str(e))
        os._exit(1)
    for name in ("resource", "_posixsubprocess"):
        sys.modules.pop(name, None)  # so that importing them raises the audit event the hook refuses
    sys.addaudithook(make_audit_hook(os.path.realpath(cfg["workdir"]), os.getpid()))
    run_code(code, status)


if __name__ == "__main__":
    main()
