"""The child process of :mod:`iclvsft.sandbox`: contain itself, then run each program of a batch.

Run only as a script, by the parent (``iclvsft.sandbox._run_child``)::

    python -I -S /path/to/iclvsft/sandbox_child.py     # the job as one JSON object on stdin

Isolated mode (``-I``: no script directory, user site-packages or ``PYTHON*`` variables on
``sys.path``) and ``-S`` (no ``site``): only the standard library is importable here, so this file
imports nothing but the standard library, and neither ``iclvsft`` nor any sibling module of this
file is importable from a program. The job is ``{"sources", "timeout_s", "max_output", "max_error",
"cpu_s", "memory_bytes", "result_fd", "off", "active", "missing", "degraded_ok"}`` (see ``_run_child``);
the results go back as JSON lines on ``result_fd``: first ``{"layers": {"active", "missing"}}``, then
one ``{"i", "stdout", "error"}`` per program, in order. A child that lacks an OS layer and may not run
degraded sends ``{"layers": ..., "refused": true}`` instead and runs nothing.

Everything the child needs is imported and set up before the OS layer goes in (after Landlock it
cannot open a file) and before the audit hook (after that only "compile" and "exec" audit events are
allowed). The layers themselves are described in :mod:`iclvsft.sandbox`.
"""
import ast
import builtins
import errno
import io
import json
import os
import signal
import sys

try:
    import resource
except ImportError:  # not on this platform: the other layers and the parent's watchdog remain
    resource = None
try:
    import ctypes
except ImportError:
    ctypes = None

# 200 frames for the child as it was when it ran as one flat `-c` script, plus the two frames
# (main, run) that now lie between this module's frame and a program's: programs keep the same
# recursion depth (196 nested calls).
RECURSION_LIMIT = 202

# Interpreter layer: restricted builtins as Python wrappers (a real builtin function's __self__ is
# the builtins module; a wrapper's __globals__ needs a "_" attribute), a source check and the hook.
FUNCS = ("abs", "all", "any", "divmod", "isinstance", "len", "max", "min", "pow", "repr", "round", "sorted", "sum")
TYPES = (
    "bool", "dict", "enumerate", "filter", "float", "int", "list", "map", "range", "reversed", "set", "str",
    "tuple", "zip",
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError", "OverflowError",
    "RecursionError", "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
)

# Frame, generator, coroutine and traceback attributes: the ways from a value back to a frame and
# its globals; str.format/format_map, which look attributes up by name at run time. Every attribute
# starting with "_" is refused as well.
BAD_ATTRS = frozenset((
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin", "ag_frame",
    "ag_code", "ag_await", "tb_frame", "tb_next", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "f_trace", "format", "format_map",
))

# OS layer 4, a seccomp filter: system calls that no program needs, refused with EPERM. Sockets:
# Landlock covers TCP and abstract UNIX sockets but not connect() to a UNIX socket by path, and such
# sockets live in the file system, outside the network namespace. io_uring: a second route to files
# and sockets. The rest: kernel interfaces that no program needs and an attacker wants (bpf,
# userfaultfd, perf events, keyrings, ptrace, namespaces). A system call of another ABI on the same
# kernel (i386's int 0x80, x32) kills the child: libseccomp checks the architecture first.
SECCOMP_REFUSED = (
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "userfaultfd", "perf_event_open", "ptrace", "process_vm_readv", "process_vm_writev",
    "keyctl", "add_key", "request_key", "unshare", "setns",
)
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ERRNO = 0x00050000  # | the errno returned
SCMP_FLTATR_ACT_BADARCH = 2
SCMP_FLTATR_CTL_NNP = 3


class SandboxTimeout(BaseException):
    """Raised inside a program that runs past its time limit (BaseException: `except Exception` misses it)."""


running = [False]


def on_alarm(signum, frame):
    if running[0]:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # fire again if the program swallows this one
        raise SandboxTimeout()


def silence_stdio():
    """fd 0 and fd 1 lead nowhere from now on: the results travel on result_fd only."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def drop_privileges(off, active, missing):
    """OS layer 1: no privileges. A uid change clears the parent-death signal, so it is set again later."""
    if os.geteuid() != 0:
        active.append(f"unprivileged user (uid {os.geteuid()})")
        return
    if "privilege drop" in off:
        missing.append("privilege drop (switched off; running as root)")
        return
    try:
        import pwd
        entry = pwd.getpwnam("nobody")
        uid, gid = entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        uid = gid = 65534
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError:
        pass
    if 0 in (os.getuid(), os.geteuid(), os.getgid(), os.getegid()):
        missing.append("privilege drop (failed; running as root)")
    else:
        active.append(f"privilege drop (root -> uid {uid})")


def limit(name, value):
    kind = getattr(resource, name, None)
    if kind is None:
        return
    try:
        soft, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass


def set_limits(job, active):
    """OS layer 2: resource limits (set after the drop, where RLIMIT_NPROC binds)."""
    if resource is None:
        return
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_FSIZE", 0)
    limit("RLIMIT_NPROC", 0)
    limit("RLIMIT_CPU", int(job["cpu_s"]) + 1)
    limit("RLIMIT_AS", int(job["memory_bytes"]))
    active.append("rlimits (memory, cpu, fsize 0, nproc 0, core 0)")


def landlock(libc, off):
    """The Landlock ABI now enforced (an int), or why there is none (a str)."""
    if "landlock" in off:
        return "switched off"
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    abi = syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return "not supported by this kernel"
    fs = (1 << 13) - 1                                   # ABI 1: execute .. make_sym
    fs |= (1 << 13) if abi >= 2 else 0                   # refer
    fs |= (1 << 14) if abi >= 3 else 0                   # truncate
    fs |= (1 << 15) if abi >= 5 else 0                   # ioctl_dev
    net = 3 if abi >= 4 else 0                           # bind_tcp, connect_tcp
    scoped = 3 if abi >= 6 else 0                        # abstract unix sockets, signals
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = syscall(ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return f"ruleset refused ({os.strerror(ctypes.get_errno())})"
    try:
        if syscall(ctypes.c_long(446), ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return f"restrict_self refused ({os.strerror(ctypes.get_errno())})"
    finally:
        os.close(fd)
    return abi


def seccomp_filter(off):
    """(libseccomp, a filter context) refusing SECCOMP_REFUSED, built but not loaded; or why there is
    none (a str). Built before Landlock, since loading the library opens a file.

    Why libseccomp through ctypes: it is the maintained library that writes the BPF program (the
    architecture check, the x32 bit, each system call's number by name) and is installed wherever apt
    or systemd is (Debian's libseccomp2). Its Python bindings (``seccomp``, or ``pyseccomp`` on PyPI,
    itself a ctypes wrapper of the same library) live in site-packages, which this isolated child
    does not import from; hand-written BPF would be a new trick to get right."""
    if "seccomp" in off:
        return "switched off"
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return "libseccomp.so.2 not found"
    ptr = ctypes.c_void_p
    lib.seccomp_init.restype = ptr
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_attr_set.argtypes = (ptr, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ptr, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ptr)
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = (ptr,)
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return "seccomp_init failed"
    # A wrong architecture kills the process (libseccomp's default kills the thread: the same here,
    # where the child has one). no_new_privs is the prctl layer's own, set before: not set again here.
    lib.seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS)
    why = "libseccomp refused the no_new_privs attribute" if lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 0) else None
    for name in SECCOMP_REFUSED:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if why is None and number == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp
            why = f"libseccomp does not know {name}"
        elif why is None and lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO | errno.EPERM, number, 0, None) != 0:
            why = f"libseccomp refused the rule for {name}"
    if why is not None:
        lib.seccomp_release(ctx)
        return why
    return lib, ctx


def seccomp_load(built):
    """Load a filter from :func:`seccomp_filter` into this process: None, or why it was refused."""
    lib, ctx = built
    try:
        rc = lib.seccomp_load(ctx)
    finally:
        lib.seccomp_release(ctx)
    return None if rc == 0 else f"load refused ({os.strerror(-rc) if rc < 0 else rc})"


def confine(off, active, missing):
    """OS layers 3 and 4: prctl and Landlock through libc, then the seccomp filter."""
    libc = None
    if ctypes is not None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            libc = None
    if libc is None:
        missing.append("no_new_privs, landlock and seccomp (no ctypes/libc)")
        return
    built = seccomp_filter(off)

    def prctl(option, value):
        u = ctypes.c_ulong
        return libc.prctl(ctypes.c_int(option), u(value), u(0), u(0), u(0))

    # PR_SET_PDEATHSIG: die with the launcher (unshare, or the caller itself). Armed by unshare
    # --kill-child but cleared by the uid change; should the launcher have died in between, the layers
    # line sent next finds no reader (BrokenPipeError) and the child exits before running anything.
    prctl(1, int(signal.SIGKILL))
    prctl(4, 0)                    # PR_SET_DUMPABLE 0: no ptrace or /proc/<pid>/mem by same-uid processes
    if "no_new_privs" not in off and prctl(38, 1) == 0:  # PR_SET_NO_NEW_PRIVS
        active.append("no_new_privs")
    else:
        missing.append("no_new_privs")
    state = landlock(libc, off)
    if isinstance(state, int):
        active.append(f"landlock (ABI {state}: no file access, no tcp"
                      + (", no signals or abstract sockets outside" if state >= 6 else "") + ")")
    else:
        missing.append(f"landlock ({state})")
    why = built if isinstance(built, str) else seccomp_load(built)
    if why is None:
        active.append("seccomp (libseccomp: sockets, io_uring, bpf, userfaultfd, perf events, keyrings, ptrace "
                      "and namespaces refused; other ABIs killed)")
    else:
        missing.append(f"seccomp ({why})")


def restricted_builtins(guard):
    """(the builtins dict every program gets, the one-item list whose item is where ``print`` writes)."""
    out = [None]
    wrappers = {"__builtins__": {}, "OUT": out, "REAL_print": builtins.print}
    wrappers.update({"REAL_" + name: getattr(builtins, name) for name in FUNCS})
    exec(compile("".join(f"def {name}(*args, **kwargs):\n    return REAL_{name}(*args, **kwargs)\n" for name in FUNCS)
                 + "def print(*args, sep=' ', end='\\n', flush=False):\n"
                   "    REAL_print(*args, sep=sep, end=end, file=OUT[0])\n", "<sandbox builtins>", "exec"), wrappers)
    if not guard:  # tests only: the OS layer alone
        return dict(vars(builtins), print=wrappers["print"]), out
    safe = {name: wrappers[name] for name in FUNCS + ("print",)}
    safe.update({name: getattr(builtins, name) for name in TYPES})
    return safe, out


def check(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names, what = (node.attr,), "attribute"
        elif isinstance(node, ast.MatchClass):
            names, what = node.kwd_attrs, "attribute"
        elif isinstance(node, ast.Name):
            names, what = ((node.id,) if node.id.startswith("__") else ()), "name"
        else:
            continue
        for name in names:
            if name.startswith("_") or name in BAD_ATTRS:
                raise RuntimeError(f"sandbox: {what} {name!r} is not allowed")


def send(result_fd, row):
    data = (json.dumps(row) + "\n").encode("utf-8")
    while data:
        data = data[os.write(result_fd, data):]


def hook(event, args):
    if event not in {"compile", "exec"}:
        raise RuntimeError(f"sandbox: {event!r} is not allowed")


def describe(exc, max_error):
    """A program's exception as one line of at most ``max_error`` characters. The message is cut before
    it is split or copied: a program may raise one as long as its memory allows (``'x' * 10 ** 8``), and
    the caller reads every result line whole. A ``__str__`` of the program's own that fails leaves the
    type name alone."""
    try:
        text = str(exc)
    except BaseException:
        text = ""
    message = text[:max_error].splitlines()[0] if text else ""
    error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return error[:max_error]


def run(sources, timeout_s, max_output, max_error, result_fd, safe, out, guard):
    """Run each program and send its result line."""
    for index, source in enumerate(sources):
        buf = io.StringIO()
        error = None
        try:
            tree = ast.parse(source, f"<program {index}>", "exec")
            if guard:
                check(tree)
            code = compile(tree, f"<program {index}>", "exec")
            del tree
            out[0] = buf
            namespace = {"__builtins__": dict(safe), "__name__": "__main__"}
            running[0] = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                exec(code, namespace)
            finally:
                running[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
            del namespace
        except SandboxTimeout:
            error = f"TimeoutError: program ran longer than {timeout_s:g} s"
        except BaseException as exc:  # the program's own error, reported as one line
            error = describe(exc, max_error)
        finally:
            running[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            out[0] = None
        text = buf.getvalue()
        if len(text) > max_output:
            text = text[:max_output]
            error = error or f"OutputError: program printed more than {max_output} characters"
        send(result_fd, {"i": index, "stdout": text, "error": error})


def main():
    job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    sources, timeout_s, max_output = job["sources"], job["timeout_s"], job["max_output"]
    result_fd, off = job["result_fd"], set(job["off"])
    active, missing = list(job["active"]), list(job["missing"])
    silence_stdio()
    drop_privileges(off, active, missing)
    set_limits(job, active)
    confine(off, active, missing)
    signal.signal(signal.SIGALRM, on_alarm)
    guard = "interpreter" not in off
    safe, out = restricted_builtins(guard)
    if guard:
        active.append("interpreter guard (source check, restricted builtins, audit hook)")
        sys.addaudithook(hook)
    # (with the guard off, tests only: the OS layer alone; not a missing OS layer, so not in `missing`)
    sys.setrecursionlimit(RECURSION_LIMIT)
    if missing and not job["degraded_ok"]:  # fail closed: report the layers, run nothing
        send(result_fd, {"layers": {"active": active, "missing": missing}, "refused": True})
        return
    send(result_fd, {"layers": {"active": active, "missing": missing}})
    run(sources, timeout_s, max_output, job["max_error"], result_fd, safe, out, guard)


if __name__ == "__main__":
    main()
