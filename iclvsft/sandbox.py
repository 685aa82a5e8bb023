"""Run many small Python programs in one locked-down, time-limited child process.

The code task (``iclvsft.tasks.code``) computes every gold answer from the drawn program structure;
this module is the second, independent route: it actually runs the program texts and returns what
each one printed, so the data layer can refuse to write an item whose answer disagrees.

One child process serves a whole batch (one process per program would cost ~20 ms each, and the
data layer checks thousands of programs per run). The child is ``python -I -S`` (isolated mode, no
site, no user paths) and, before it runs any program:

* reads the whole batch from stdin (so nothing is read from disk later);
* sets ``resource`` limits: address space (``memory_mb``), CPU seconds for the whole batch, no core
  dumps, no file writes (``RLIMIT_FSIZE = 0``) and no new processes (``RLIMIT_NPROC = 0``);
* installs an audit hook (``sys.addaudithook``, which cannot be removed) that allows only the two
  events the harness itself needs, ``compile`` and ``exec``, and raises for every other audited
  action: ``open``, ``import`` of a module not already loaded, ``socket.*``, ``subprocess.Popen``,
  ``os.system``, ``os.*``, ``ctypes.*``, ``resource.setrlimit``, access to restricted attributes
  such as ``__globals__`` or ``tb_frame`` (``object.__getattr__``), ...

Each program then runs in a fresh namespace whose ``__builtins__`` is a small dict of pure
functions and exception types (no ``open``, ``__import__``, ``eval``, ``exec``, ``compile``,
``getattr``, ``globals``, ``input``, ...); ``print`` writes to a per-program buffer. A per-program
wall-clock limit (``signal.setitimer``) raises inside the program; a program that is stuck in one
C call or swallows the timeout is caught by the parent's watchdog, which kills the child, records
the error for that program and starts a fresh child for the rest of the batch. The whole call is
bounded by ``total_timeout_s``.

What this guards against: a generator bug that emits a program which loops, allocates without
bound, or touches the file system, network or other processes. Restricted builtins alone are not a
security boundary in CPython (every builtin function leads back to the ``builtins`` module); the
audit hook, the resource limits and the process boundary are. A deliberately hostile program could
still forge its own result line; the programs run here are the project's own generated ones.

Usage::

    results = run_programs(["print(1 + 2)", "while True: pass"], timeout_s=0.5)
    results[0].stdout == "3\\n" and results[0].error is None
    results[1].error.startswith("TimeoutError")
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

# Grace (seconds) the parent's watchdog adds to the per-program limit before it kills the child;
# the first program also covers the child's start-up.
_WATCHDOG_GRACE_S = 2.0
_STARTUP_GRACE_S = 10.0


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


# The child's program. Everything it needs is imported and set up before the audit hook goes in;
# after that only "compile" and "exec" audit events are allowed.
_CHILD = r'''
import builtins, functools, io, json, signal, sys
try:
    import resource
except ImportError:  # not on this platform: the audit hook and the parent's watchdog remain
    resource = None

job = json.loads(sys.stdin.buffer.read().decode("utf-8"))
sources, timeout_s, max_output = job["sources"], job["timeout_s"], job["max_output"]
out = sys.stdout

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


class SandboxTimeout(BaseException):
    """Raised inside a program that runs past its time limit (BaseException: `except Exception` misses it)."""


running = [False]


def on_alarm(signum, frame):
    if running[0]:
        signal.setitimer(signal.ITIMER_REAL, 0.05)  # fire again if the program swallows this one
        raise SandboxTimeout()


signal.signal(signal.SIGALRM, on_alarm)

SAFE = {name: getattr(builtins, name) for name in (
    "abs", "all", "any", "bool", "dict", "divmod", "enumerate", "filter", "float", "int", "isinstance",
    "len", "list", "map", "max", "min", "pow", "range", "repr", "reversed", "round", "set", "sorted",
    "str", "sum", "tuple", "zip",
    "ArithmeticError", "AssertionError", "Exception", "IndexError", "KeyError", "OverflowError",
    "RecursionError", "StopIteration", "TypeError", "ValueError", "ZeroDivisionError",
)}


def hook(event, args):
    if event not in {"compile", "exec"}:
        raise RuntimeError(f"sandbox: {event!r} is not allowed")


sys.addaudithook(hook)
del hook
sys.setrecursionlimit(200)

for index, source in enumerate(sources):
    buf = io.StringIO()
    error = None
    try:
        code = compile(source, f"<program {index}>", "exec")
        names = dict(SAFE)
        names["print"] = functools.partial(builtins.print, file=buf)
        namespace = {"__builtins__": names, "__name__": "__main__"}
        running[0] = True
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            exec(code, namespace)
        finally:
            running[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        del namespace, names
    except SandboxTimeout:
        error = f"TimeoutError: program ran longer than {timeout_s:g} s"
    except BaseException as exc:  # the program's own error, reported as one line
        message = str(exc).splitlines()[0] if str(exc) else ""
        error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    finally:
        running[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
    text = buf.getvalue()
    if len(text) > max_output:
        text = text[:max_output]
        error = error or f"OutputError: program printed more than {max_output} characters"
    out.write(json.dumps({"i": index, "stdout": text, "error": error}) + "\n")
    out.flush()
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
    job = {"sources": sources, "timeout_s": float(timeout_s), "max_output": int(max_output),
           "cpu_s": max(1.0, deadline - time.monotonic()) + 1.0, "memory_bytes": int(memory_mb) * 2**20}
    payload = json.dumps(job).encode("utf-8")
    done: list[SandboxResult] = []
    with tempfile.TemporaryFile() as errfile:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _CHILD], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errfile, env={}, cwd=tempfile.gettempdir(),
                                close_fds=True)
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        failure: tuple[str, str] | None = None
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
                if line is None:  # end of output: the child died
                    rc = proc.wait()
                    errfile.seek(0)
                    tail = errfile.read().decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
                    why = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                    failure = ("", f"SandboxError: sandbox process died ({why}) while running this program"
                                   + (f": {tail[0][:300]}" if tail[0] else ""))
                    break
                try:
                    row = json.loads(line)
                    ok = row["i"] == len(done) and isinstance(row["stdout"], str)
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    failure = ("", "SandboxError: malformed result line from the sandbox process")
                    break
                done.append(SandboxResult(row["stdout"], row["error"]))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            reader.join(timeout=5)
            proc.stdout.close()
    return done, failure


__all__ = ["SandboxResult", "run_programs"]


if __name__ == "__main__":  # quick manual check: python -m iclvsft.sandbox
    demo = ["print(6 * 7)", "open('/etc/passwd')", "import socket", "while True: pass", "print(1 // 0)"]
    for src, res in zip(demo, run_programs(demo, timeout_s=0.5)):
        print(f"{src!r:28} -> stdout={res.stdout!r} error={res.error!r}")
