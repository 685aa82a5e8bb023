"""Escape attempts against iclvsft.sandbox: every one must fail and leave no effect.

Each attempt is a small program run through ``run_programs`` in one batch; after each attempt an
honest marker program runs, so a forged or misaligned result line would show up there. Side effects
are checked outside the sandbox: no file appears in a world-writable folder, a ``sleep`` process the
test started is still alive with its priority and CPU affinity unchanged, a listening socket got no
connection. A second batch switches the interpreter guard off (test-only knob) to show that the
operating-system layer alone refuses the same actions where this machine has it.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest

from iclvsft import sandbox
from iclvsft.errors import ConfigError
from iclvsft.sandbox import Containment, SandboxResult, containment, run_programs

FORGED = "FORGED"
ESCAPED = "ESCAPED"

# (name, program, expectation): "error" = must stop with an error; "timeout" / "memory" = must stop
# with that error; "own" = may finish, but only its own stdout may change. Tokens @DIR@ (a
# world-writable folder), @PID@ (an unrelated sleep process), @PORT@ (a listening localhost port),
# @NICE@ / @CPUS@ (a priority / affinity different from the sleep's), @FORGE@ (a result line
# claiming the next program's slot) are filled in by the fixture.
ATTEMPTS = [
    # abs.__self__ is the real builtins module: from there __import__ an already-loaded module.
    ("abs_self_import_posix", "abs.__self__.__import__('posix').mknod('@DIR@/abs_self')", "error"),
    # print.__self__ / len.__self__: the same route through other builtins.
    ("print_self", "print.__self__.__import__('posix').mkfifo('@DIR@/print_self')", "error"),
    ("len_self_open", "print(len.__self__.open('/etc/passwd').read())", "error"),
    # Subclass walk to BuiltinImporter: a fresh posix module with no audit event at all.
    ("subclasses_builtin_importer",
     "for c in ().__class__.__base__.__subclasses__():\n"
     "    if c.__name__ == 'BuiltinImporter':\n"
     "        m = c.create_module(c.find_spec('posix'))\n"
     "        c.exec_module(m)\n"
     "        m.mknod('@DIR@/subclasses')\n", "error"),
    # Subclass walk to os._wrap_close and its function's __globals__ (the os module namespace).
    ("subclasses_wrap_close",
     "for c in ().__class__.__mro__[1].__subclasses__():\n"
     "    if c.__name__ == '_wrap_close':\n"
     "        c.__init__.__globals__['system']('touch @DIR@/wrap_close')\n", "error"),
    # type.__subclasses__ reached through a builtin type's metaclass.
    ("type_subclasses", "print(len(int.__class__.__subclasses__(int.__class__)), 'ESCAPED')", "error"),
    # __import__ by name (not in the builtins dict) and the import statement.
    ("dunder_import_posix", "__import__('posix').mknod('@DIR@/dunder_import')", "error"),
    ("import_statement_posix", "import posix\nposix.mknod('@DIR@/import_posix')", "error"),
    # __builtins__ tricks: index the dict for a removed name, or rebind it.
    ("builtins_dict", "__builtins__['__import__']('posix').mknod('@DIR@/builtins_dict')", "error"),
    ("builtins_rebind", "__builtins__ = {}\nprint(abs)", "error"),
    # The print wrapper's globals would hold the real print and the output buffer.
    ("wrapper_globals", "print(print.__globals__['REAL_print'], 'ESCAPED')", "error"),
    ("wrapper_closure", "print(abs.__closure__, abs.__defaults__, 'ESCAPED')", "error"),
    # Frame walking: generator frame -> f_back -> the harness's f_globals (result channel, send()).
    ("gi_frame_walk",
     "def g():\n    yield 1\nx = g()\nnext(x)\nprint(x.gi_frame.f_back.f_globals['result_fd'], 'ESCAPED')", "error"),
    # Frame walking from a traceback.
    ("tb_frame_walk",
     "try:\n    1 // 0\nexcept ZeroDivisionError as e:\n    print(e.__traceback__.tb_frame.f_back.f_globals, 'ESCAPED')",
     "error"),
    # Frame walking without any dunder, through str.format's attribute lookup by name.
    ("format_gi_frame", "def g():\n    yield 1\nx = g()\nnext(x)\nprint('{0.gi_frame.f_back}'.format(x), 'ESCAPED')",
     "error"),
    # str.format reading a wrapper's __globals__ (not an audited attribute in CPython 3.11).
    ("format_globals", "print('{0.__globals__}'.format(print), 'ESCAPED')", "error"),
    ("format_map_globals", "print('{f.__globals__}'.format_map({'f': abs}), 'ESCAPED')", "error"),
    # match class patterns read attributes by name: tuple(__class__=t) would hand out the type.
    ("match_class_dunder", "match ():\n    case tuple(__class__=t):\n        print(t, 'ESCAPED')", "error"),
    # Names the builtins dict does not hold: getattr, eval, exec, compile, globals, vars, type, open.
    ("getattr_eval_exec", "getattr(abs, '__self__')", "error"),
    ("exec_import", "exec('import os')", "error"),
    ("globals_vars", "print(globals(), 'ESCAPED')", "error"),
    ("loader_spec", "print(__loader__, __spec__, 'ESCAPED')", "error"),
    # File system: create a regular file / fifo, write a file, read /etc/passwd, stat /etc/shadow.
    ("mknod", "import os\nos.mknod('@DIR@/mknod')", "error"),
    ("mkfifo", "import os\nos.mkfifo('@DIR@/mkfifo')", "error"),
    ("write_file", "open('@DIR@/write_file', 'w').write('x')", "error"),
    ("read_passwd", "print(open('/etc/passwd').read())", "error"),
    ("stat_shadow", "import os\nprint(os.stat('/etc/shadow'), 'ESCAPED')", "error"),
    # Other processes: pidfd kill of an unrelated process, os.kill, priority, CPU affinity.
    ("pidfd_kill", "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(@PID@), 9)", "error"),
    ("pidfd_kill_via_self",
     "b = len.__self__\nb.__import__('_signal').pidfd_send_signal(b.__import__('posix').pidfd_open(@PID@), 9)", "error"),
    ("os_kill", "import os\nos.kill(@PID@, 9)", "error"),
    ("setpriority", "import os\nos.setpriority(os.PRIO_PROCESS, @PID@, @NICE@)", "error"),
    ("sched_setaffinity", "import os\nos.sched_setaffinity(@PID@, @CPUS@)", "error"),
    # Privileges: chroot, setuid.
    ("chroot", "import os\nos.chroot('/tmp')\nprint('ESCAPED')", "error"),
    ("setuid", "import os\nos.setuid(0)\nprint('ESCAPED')", "error"),
    # Network: connect to a port the test listens on.
    ("socket_connect", "import socket\nsocket.create_connection(('127.0.0.1', @PORT@), timeout=0.2)", "error"),
    # New processes: fork, subprocess, os.system.
    ("fork", "import os\nos.fork()\nprint('ESCAPED')", "error"),
    ("subprocess", "import subprocess\nsubprocess.run(['touch', '@DIR@/subprocess'])", "error"),
    ("os_system", "import os\nos.system('touch @DIR@/os_system')", "error"),
    # ctypes: call libc directly.
    ("ctypes", "import ctypes\nctypes.CDLL(None).kill(@PID@, 9)", "error"),
    # resource limits: raise them back.
    ("setrlimit_raise", "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))", "error"),
    # Forge the next program's result: fd 1, sys.stdout, sys.__stdout__, every low fd (the result pipe).
    ("forge_os_write_fd1", "import os\nos.write(1, @FORGE@.encode())", "error"),
    ("forge_sys_stdout", "import sys\nsys.stdout.write(@FORGE@)\nsys.stdout.flush()", "error"),
    ("forge_sys_dunder_stdout",
     "s = abs.__self__.__import__('sys')\ns.__stdout__.write(@FORGE@)\ns.__stdout__.flush()", "error"),
    ("forge_print_file", "print(@FORGE@, end='', file=None)", "error"),
    ("forge_result_fd", "for fd in range(3, 32):\n    open(fd, 'w').write(@FORGE@)", "error"),
    ("read_result_fd", "for fd in range(3, 32):\n    print(open(fd).read(), 'ESCAPED')", "error"),
    # A forged line printed the ordinary way stays in the program's own stdout.
    ("forge_own_stdout", "print(@FORGE@, end='')", "own"),
    # Exhausting memory (address-space limit).
    ("memory_list", "x = [0] * 10 ** 10", "memory"),
    ("memory_str", "x = ' ' * (4 * 1024 ** 3)", "memory"),
    # Infinite loop: stopped by the per-program timer.
    ("infinite_loop", "while True:\n    pass", "timeout"),
    # Swallowing the timer with a bare except: killed by the parent's watchdog.
    ("swallow_timeout", "while True:\n    try:\n        while True:\n            pass\n    except:\n        pass", "timeout"),
    # Stuck in one C call, where the timer cannot interrupt: killed by the parent's watchdog.
    ("stuck_in_c", "sum(range(10 ** 13))", "timeout"),
]

# The same routes with the interpreter guard switched off (real builtins, no source check, no audit
# hook): what the operating-system layer alone refuses. Run only where containment() reports every
# OS layer. (os.stat is absent on purpose: no OS layer here hides file metadata.)
OS_ATTEMPTS = [
    ("os_mknod", "import os\nos.mknod('@DIR@/os_mknod')", "error"),
    ("os_mkfifo", "import os\nos.mkfifo('@DIR@/os_mkfifo')", "error"),
    ("os_write_file", "open('@DIR@/os_write_file', 'w').write('x')", "error"),
    ("os_read_passwd", "print(open('/etc/passwd').read())", "error"),
    ("os_listdir", "import os\nprint(os.listdir('/'))", "error"),
    ("os_pidfd_kill", "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(@PID@), 9)", "error"),
    ("os_kill", "import os\nos.kill(@PID@, 9)", "error"),
    ("os_ctypes_kill", "import ctypes\nassert ctypes.CDLL(None).kill(@PID@, 9) == 0", "error"),
    ("os_setpriority", "import os\nos.setpriority(os.PRIO_PROCESS, @PID@, @NICE@)", "error"),
    ("os_sched_setaffinity", "import os\nos.sched_setaffinity(@PID@, @CPUS@)", "error"),
    ("os_chroot", "import os\nos.chroot('/tmp')\nprint('ESCAPED')", "error"),
    ("os_setuid", "import os\nos.setuid(0)\nprint('ESCAPED')", "error"),
    ("os_fork", "import os\nos.fork()\nprint('ESCAPED')", "error"),
    ("os_system", "import os\nassert os.system('touch @DIR@/os_system') == 0", "error"),
    ("os_socket", "import socket\nsocket.create_connection(('127.0.0.1', @PORT@), timeout=0.2)", "error"),
    ("os_setrlimit_raise", "import resource\nresource.setrlimit(resource.RLIMIT_NPROC, (-1, -1))", "error"),
    # fd 1 is /dev/null: writing a result line there reaches nobody.
    ("os_forge_fd1", "import os\nos.write(1, @FORGE@.encode())", "own"),
    ("os_forge_dunder_stdout", "import sys\nsys.__stdout__.write(@FORGE@)\nsys.__stdout__.flush()", "own"),
]


@pytest.fixture(scope="module")
def victim():
    """An unrelated process (and its priority and affinity) that the programs try to touch."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def shared_dir():
    """A world-writable folder under /tmp (nobody could create files here at the OS level)."""
    path = tempfile.mkdtemp(prefix="sandbox-escape-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


def _targets(victim):
    nice = os.getpriority(os.PRIO_PROCESS, victim.pid)
    cpus = os.sched_getaffinity(victim.pid)
    return nice, cpus, (5 if nice != 5 else 6), ({min(cpus)} if len(cpus) > 1 else set(range(64)) - cpus or {0})


def _run_attempts(attempts, victim, shared_dir, listener):
    """Run every attempt followed by an honest marker program; return {name: (result, marker_result)}."""
    _, _, nice_target, cpu_target = _targets(victim)
    programs = []
    for index, (name, template, _) in enumerate(attempts):
        next_index = 2 * index + 1
        forge = json.dumps({"i": next_index, "stdout": f"{FORGED}\n", "error": None}) + "\n"
        program = (template.replace("@DIR@", shared_dir).replace("@PID@", str(victim.pid))
                   .replace("@PORT@", str(listener.getsockname()[1])).replace("@NICE@", str(nice_target))
                   .replace("@CPUS@", repr(cpu_target)).replace("@FORGE@", repr(forge)))
        programs += [program, f"print('marker {name}')"]
    results = run_programs(programs, timeout_s=0.3, kill_grace_s=0.5, total_timeout_s=60)
    return {name: (results[2 * i], results[2 * i + 1]) for i, (name, _, _) in enumerate(attempts)}


def _check_blocked(name, expect, result, marker):
    # The next program's result is its own: nothing forged, nothing misaligned.
    assert marker == SandboxResult(f"marker {name}\n", None), (name, result, marker)
    assert ESCAPED not in result.stdout, (name, result)
    if expect == "own":
        assert FORGED not in (marker.stdout + (marker.error or ""))
        return
    assert result.error is not None, (name, result)
    assert FORGED not in result.stdout, (name, result)
    if expect == "timeout":
        assert result.error.startswith("TimeoutError"), (name, result)
    if expect == "memory":
        assert result.error.startswith("MemoryError"), (name, result)


def _check_no_side_effects(victim, shared_dir, listener, before):
    assert victim.poll() is None, "the unrelated process was killed"
    nice, cpus, _, _ = _targets(victim)
    assert (nice, cpus) == before, "the unrelated process's priority or affinity changed"
    assert os.listdir(shared_dir) == [], "a program created a file"
    with pytest.raises(BlockingIOError):
        listener.accept()


@pytest.fixture(scope="module")
def guarded(victim, shared_dir, listener):
    before = _targets(victim)[:2]
    outcome = _run_attempts(ATTEMPTS, victim, shared_dir, listener)
    return outcome, before


def test_there_are_at_least_20_attempts():
    assert len(ATTEMPTS) >= 20 and len({name for name, _, _ in ATTEMPTS}) == len(ATTEMPTS)


@pytest.mark.parametrize("name,expect", [(name, expect) for name, _, expect in ATTEMPTS])
def test_escape_attempt_is_blocked(guarded, name, expect):
    outcome, _ = guarded
    _check_blocked(name, expect, *outcome[name])


def test_escape_attempts_left_no_side_effects(guarded, victim, shared_dir, listener):
    _, before = guarded
    _check_no_side_effects(victim, shared_dir, listener, before)


def test_os_layer_alone_blocks_the_same_routes(victim, shared_dir, listener, monkeypatch):
    state = containment(refresh=True)
    if state.missing:
        pytest.skip(f"this machine lacks OS layers: {state.missing}")
    before = _targets(victim)[:2]
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter"}))
    outcome = _run_attempts(OS_ATTEMPTS, victim, shared_dir, listener)
    for name, _, expect in OS_ATTEMPTS:
        _check_blocked(name, expect, *outcome[name])
    _check_no_side_effects(victim, shared_dir, listener, before)


def test_honest_programs_still_run_and_the_watchdog_restarts_the_child():
    programs = ["print(1)", "sum(range(10 ** 13))", "print(2)",
                "def f(n):\n    return [i * i for i in range(n)]\nprint(sum(f(4)), max(f(3)), sorted({3, 1}), divmod(7, 2))"]
    results = run_programs(programs, timeout_s=0.2, kill_grace_s=0.3)
    assert results[0] == SandboxResult("1\n", None) and results[2] == SandboxResult("2\n", None)
    assert results[1].error.startswith("TimeoutError") and "killed" in results[1].error
    assert results[3] == SandboxResult("14 4 [1, 3] (3, 1)\n", None)


def test_containment_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="iclvsft.sandbox"):
        sandbox._warned.clear()
        state = containment(refresh=True)
    assert isinstance(state, Containment) and state.os_contained == (not state.missing)
    assert any(a.startswith("interpreter guard") for a in state.active)
    assert any(a.startswith(("privilege drop", "unprivileged user")) for a in state.active) or \
        any(m.startswith("privilege drop") for m in state.missing)
    warnings = [r for r in caplog.records if r.name == "iclvsft.sandbox"]
    if state.missing:  # one line, naming every missing layer
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert all(m in warnings[0].getMessage() for m in state.missing)
    else:
        assert warnings == []


def test_missing_os_layer_warns_once_and_the_interpreter_guard_still_blocks(caplog, monkeypatch):
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"landlock", "namespaces"}))
    sandbox._warned.clear()
    with caplog.at_level(logging.WARNING, logger="iclvsft.sandbox"):
        state = containment(refresh=True)
        results = run_programs(["abs.__self__.__import__('posix')", "import os", "print(3)"], degraded_ok=True)
    assert "landlock (switched off)" in state.missing and "namespaces (switched off)" in state.missing
    warnings = [r.getMessage() for r in caplog.records if r.name == "iclvsft.sandbox"]
    assert len(warnings) == 1 and "landlock" in warnings[0] and "namespaces" in warnings[0]
    assert results[0].error and results[1].error.startswith("ImportError") and results[2].stdout == "3\n"


# Module names a program might try: the package, its modules as top-level names (the child script's
# own folder), the tests' folder, and third-party packages of the project's environment.
UNREACHABLE = ("iclvsft", "sandbox", "sandbox_child", "tasks", "conftest", "numpy", "yaml")


def test_child_script_sees_only_the_standard_library(monkeypatch):
    """The child is iclvsft/sandbox_child.py started by path with ``-I -S``: its folder, the project
    and site-packages are not on its sys.path, so neither iclvsft nor a sibling module is importable."""
    imports = [f"import {name}" for name in UNREACHABLE]
    assert all(r == SandboxResult("", "ImportError: __import__ not found") for r in run_programs(imports))
    # Interpreter guard and Landlock off (test-only knobs): the import system really searches sys.path.
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter", "landlock"}))
    probe = ("import sys\nprint(sys.flags.isolated, sys.flags.no_site, sys.flags.safe_path)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(UNREACHABLE) + "))\n"
             "print(*sys.path, sep='\\n')")
    *results, shown = run_programs(imports + [probe], timeout_s=5.0, degraded_ok=True)
    for name, result in zip(UNREACHABLE, results):
        assert result == SandboxResult("", f"ModuleNotFoundError: No module named '{name}'"), (name, result)
    assert shown.ok, shown
    flags, modules, *path = shown.stdout.splitlines()
    assert flags == "1 1 True" and modules == "[]"
    package = os.path.dirname(os.path.realpath(sandbox.__file__))
    outside = [os.path.dirname(package), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
               *site.getsitepackages()]
    for entry in path:
        real = os.path.realpath(entry)
        assert real != package and not any(real == os.path.realpath(p) for p in outside), (entry, path)
        assert "site-packages" not in real and "dist-packages" not in real, (entry, path)


def test_child_script_does_nothing_when_imported():
    """Only ``python sandbox_child.py`` runs the child; importing the module (a documentation tool,
    a linter plugin) neither reads stdin nor touches the importer's fds 0 and 1."""
    r = subprocess.run([sys.executable, "-c", "import iclvsft.sandbox_child as c, sys; print(c.RECURSION_LIMIT)"],
                       input=b"not a job", capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().isdigit(), r
    assert os.path.isfile(sandbox._CHILD) and sandbox._CHILD.endswith(os.path.join("iclvsft", "sandbox_child.py"))


# --- Error text is cut in the child, like the output ------------------------------------------------

def test_a_huge_exception_message_is_cut_before_it_reaches_the_caller():
    results = run_programs(["raise ValueError('x' * 120_000_000)", "raise ValueError('first\\n' + 'y' * 10 ** 6)",
                            "print(1)"], timeout_s=20.0)
    assert results[0].error.startswith("ValueError: xxx") and len(results[0].error) <= 1_000, len(results[0].error)
    assert results[1].error == "ValueError: first" and results[2] == SandboxResult("1\n", None)


def test_an_overlong_result_line_is_cut_by_the_caller(monkeypatch):
    """Should a program get past the interpreter layer (switched off here) and write to the result pipe
    itself, the caller reads no more than an honest line's length and kills the child."""
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter"}))
    flood = ("import os\nfor fd in range(3, 32):\n    try:\n        os.write(fd, b'x' * 10 ** 7)\n"
             "    except OSError:\n        pass")
    results = run_programs([flood, "print(2)"], timeout_s=5.0, max_output_chars=100)
    assert results[0].error.startswith("SandboxError: malformed") and results[1] == SandboxResult("2\n", None)
# --- The child dies with its caller ------------------------------------------------------------------

CALLER = """
from iclvsft import sandbox
from iclvsft.errors import ConfigError
sandbox._LAYERS_OFF = frozenset({"interpreter"})
sandbox.run_programs(["import time\\ntime.sleep(120)"], timeout_s=120.0, total_timeout_s=150.0)
"""


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        try:
            tasks = os.listdir(f"/proc/{stack.pop()}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{tid}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                kids = []
            out += kids
            stack += kids
    return out


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_dies_with_its_caller():
    root = os.path.dirname(os.path.dirname(os.path.realpath(sandbox.__file__)))
    caller = subprocess.Popen([sys.executable, "-c", CALLER], cwd=root, env={**os.environ, "PYTHONPATH": root})
    left: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = _descendants(caller.pid)
            if any("sandbox_child.py" in _cmdline(pid) for pid in left):
                break
            time.sleep(0.05)
        assert any("sandbox_child.py" in _cmdline(pid) for pid in left), "the sandbox child never started"
        time.sleep(1.0)  # the program is sleeping now
        left = _descendants(caller.pid)
        caller.kill()
        caller.wait()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(_running(pid) for pid in left):
            time.sleep(0.05)
        assert not [pid for pid in left if _running(pid)], [(pid, _cmdline(pid)) for pid in left if _running(pid)]
    finally:
        caller.kill()
        caller.wait()
        for pid in left:  # only what this test started, should the check above have failed
            if _running(pid):
                os.kill(pid, 9)

# --- Sockets and io_uring: refused by the OS layer alone (the seccomp filter) ----------------------

# A program that reaches libc through ctypes (loaded in the child before Landlock, so importable with
# the interpreter guard off) and connects to a UNIX socket by path, outside the sandbox: Landlock
# governs neither pathname-socket connect() nor the network namespace (UNIX sockets live in the file
# system), so only the seccomp filter stops it.
UNIX_CONNECT = """import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(1, 1, 0)  # AF_UNIX, SOCK_STREAM
if fd < 0:
    raise OSError(ctypes.get_errno(), 'socket')
path = @PATH@.encode()
addr = ctypes.create_string_buffer(2 + 108)
addr[0:2] = (1).to_bytes(2, 'little')
addr[2:2 + len(path)] = path
if libc.connect(fd, addr, len(addr)) != 0:
    raise OSError(ctypes.get_errno(), 'connect')
print('ESCAPED')
"""
# io_uring_setup(8 entries, &params) (syscall 425 on every architecture but alpha): io_uring reaches
# the file system and the network through its own ring, so it must not be available at all.
IO_URING = """import ctypes
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 8, params)
print(fd, ctypes.get_errno())
"""


def _need_every_os_layer():
    state = containment(refresh=True)
    if state.missing:
        pytest.skip(f"this machine lacks OS layers: {state.missing}")


def test_os_layer_alone_refuses_connect_to_a_unix_socket_outside(monkeypatch):
    _need_every_os_layer()
    folder = tempfile.mkdtemp(prefix="sandbox-unix-", dir="/tmp")
    os.chmod(folder, 0o755)  # reachable by `nobody`: only the sandbox may stop the connect
    path = os.path.join(folder, "listener.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(1)
        server.setblocking(False)
        monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter"}))
        result, marker = run_programs([UNIX_CONNECT.replace("@PATH@", repr(path)), "print('marker')"], timeout_s=5.0)
        assert result.error is not None and result.error.startswith("PermissionError: [Errno 1]"), result
        assert ESCAPED not in result.stdout and marker == SandboxResult("marker\n", None)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_os_layer_alone_refuses_io_uring(monkeypatch):
    _need_every_os_layer()
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter"}))
    result, = run_programs([IO_URING], timeout_s=5.0)
    assert result.ok and result.stdout in ("-1 1\n", "-1 38\n"), result  # EPERM (or ENOSYS)



@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 system call bit is x86_64's")
def test_os_layer_alone_kills_a_system_call_of_another_abi(monkeypatch):
    """The filter's rules are by x86_64 number: the same call through the x32 ABI (nr | 0x40000000)
    must not slip past them, so the filter kills the child, and a fresh one runs the next program."""
    _need_every_os_layer()
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"interpreter"}))
    x32 = IO_URING.replace("syscall(425,", "syscall(0x40000000 | 425,")
    result, marker = run_programs([x32, "print('marker')"], timeout_s=5.0)
    assert result.error is not None and result.error.startswith("SandboxError") and "signal 31" in result.error, result
    assert marker == SandboxResult("marker\n", None)


# --- Fail closed: a missing OS layer refuses the programs unless degraded mode is allowed ----------

def test_a_missing_os_layer_refuses_programs_unless_degraded_mode_is_allowed(monkeypatch):
    simulated = "namespaces (unshare refused: simulated by the test)"
    monkeypatch.setattr(sandbox, "_launcher", lambda: ([], [], [simulated]))  # the namespace probe fails
    with pytest.raises(ConfigError) as refused:
        run_programs(["print(1)"])
    message = str(refused.value)
    assert "\n" not in message and simulated in message and "data.sandbox_degraded_ok" in message
    assert run_programs(["print(1)"], degraded_ok=True) == [SandboxResult("1\n", None)]
    state = containment()
    assert state.missing == (simulated,) and any(a.startswith("seccomp") for a in state.active)

    # A layer the child itself lacks (Landlock, switched off): refused before any program runs. The
    # program (interpreter guard off too) would create a file, which only Landlock forbids `nobody`.
    monkeypatch.undo()
    monkeypatch.setattr(sandbox, "_LAYERS_OFF", frozenset({"landlock", "interpreter"}))
    folder = tempfile.mkdtemp(prefix="sandbox-degraded-", dir="/tmp")
    try:
        os.chmod(folder, 0o1777)
        create = f"open({os.path.join(folder, 'ran')!r}, 'w').close()\nprint('ran')"
        with pytest.raises(ConfigError, match="landlock"):
            run_programs([create])
        assert os.listdir(folder) == []
        with sandbox.session(degraded_ok=True) as ran:  # allowed: it runs, and the session has its layers
            assert run_programs([create]) == [SandboxResult("ran\n", None)]
        assert os.listdir(folder) == ["ran"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    layers = ran.layers()
    assert layers.missing == ("landlock (switched off)",) and any(a.startswith("seccomp") for a in layers.active)
