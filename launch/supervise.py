"""Runs vLLM so that stopping the launcher stops every process vLLM started, and killing it leaves none.

What is guaranteed, on Linux:

Stopping. vLLM forks API servers, engine cores and workers. The launcher starts it in a session of its own
and makes itself the subreaper of everything below it (PR_SET_CHILD_SUBREAPER, prctl(2)): a process that
leaves vLLM's process group (setsid(), setpgid()) or loses its parent is re-parented to the launcher, not to
init, so it stays findable. vLLM's tree is its descendants (walked every second while it runs, so a process
seen once is remembered by pid and start time) plus every process below the launcher whose environment
carries the tree's mark (``EP_LAUNCH_TREE``, inherited by whatever vLLM starts). SIGTERM / SIGINT / SIGHUP
become one SIGTERM to vLLM's process group and to the tree's processes outside it; after ``stop_timeout``
seconds what is left is SIGKILLed, saying so. A second Ctrl-C SIGKILLs at once; a repeated SIGTERM
(schedulers repeat themselves) changes nothing. When vLLM has exited, by itself or stopped, whatever is left
of its tree, in its group or not, gets SIGTERM, then SIGKILL at the same bound, and the launcher names each
process it had to stop ("stopped 2 processes left by vLLM: 4242 python (own session), ...").

Stopping from within. ``stop_when`` (the launchers' watch, launch/peers.py) stops vLLM exactly as a SIGTERM
would, naming its reason instead of the signal's.

Exit code. vLLM's own; 128 + N when it died of signal N, as shells report it. Signal handlers only record
the request; the main loop acts on it, so a signal never ends the launcher with a traceback, also when its
stderr is gone (every message the launcher writes may fail silently).

SIGKILL of the launcher (the one signal it cannot handle). vLLM's main process gets SIGKILL from the
kernel (PR_SET_PDEATHSIG, set between fork and exec; it fires when the thread that forked ends, here the
main thread, which lives as long as the launcher; the kernel clears it when a set-user-ID program is
executed, which vLLM is not). vLLM's own children get nothing from the kernel: a small watcher process,
started before vLLM in a session of its own, holds a pipe from the launcher; when the pipe closes without
the launcher's last word, it SIGKILLs every process whose environment carries the mark, until none is
left (up to 5 s), and names them on the launcher's stderr. Not covered: a process that cleared its
environment (env -i, execve with a fresh environment) and whose parent was killed too; a process of
another user when the launcher is not root (its environment cannot be read); a process that outforks the
kill loop for 5 s; processes started outside this process tree (container runtimes, other nodes). A kill
of the launcher and the watcher together (a kill of the whole cgroup, as Slurm and Kubernetes do at the
end of a job) ends vLLM's tree with them.

Logs. With ``log_file``, vLLM's output goes through a pipe that a thread copies in chunks of at most
64 KiB to the launcher's stdout and to the file: output without newlines never grows the launcher's
memory. A sink that fails (a full disk, a closed stdout) is reported once and dropped; the pipe is always
drained, so vLLM never blocks on it. A log file that cannot be opened is reported and vLLM runs without it.
(A reader of the launcher's stdout that stops reading without closing still blocks the copy, as with tee.)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
MARK = "EP_LAUNCH_TREE"
"""Environment variable that marks every process of the supervised tree (value: launcher pid and a nonce)."""
CHUNK = 64 * 1024
"""Most bytes of output held at once by the copy."""
SCAN_EVERY = 1.0
"""Seconds between walks of vLLM's tree while it runs."""
WATCHER_BOUND = 5.0
"""Seconds the watcher keeps killing marked processes after the launcher was killed."""

# linux/prctl.h
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _prctl(option: int, value: int) -> bool:
    return _libc is not None and _libc.prctl(option, value, 0, 0, 0) == 0


def _quiet(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` that never raises: a closed stderr (the pipe of a killed tee) must not end the supervision."""

    def said(message: str) -> None:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            say(message)

    return said


def _dies_with(parent: int) -> Callable[[], None]:
    """Runs in the child between fork and exec: SIGKILL it when the launcher ends, also by SIGKILL."""

    def preexec() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before the line above took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _marked(proc: psutil.Process, mark: str) -> bool:
    try:
        return proc.environ().get(MARK) == mark
    except psutil.Error:  # gone, a zombie, or another user's process
        return False


def _label(proc: psutil.Process, pgid: int) -> str:
    try:
        name = proc.name()
        outside = os.getpgid(proc.pid) != pgid
        sid = os.getsid(proc.pid)
    except (psutil.Error, OSError):
        return str(proc.pid)
    where = " (own session)" if sid != pgid else (" (own process group)" if outside else "")
    return f"{proc.pid} {name}{where}"


def _names(labels: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(labels[:most])
    return shown + (f" and {len(labels) - most} more" if len(labels) > most else "")


class _Tree:
    """vLLM's processes, each held as a psutil.Process (pid and start time: a reused pid is never signalled)."""

    def __init__(self, root: psutil.Process, mark: str):
        self.root = root
        self.mark = mark
        self.members: dict[int, psutil.Process] = {root.pid: root}
        self.strangers: set[tuple[int, float]] = set()  # below the launcher, not vLLM's (the watcher, a Ray head)
        self.strays: dict[int, str] = {}  # signalled one by one: outside vLLM's group, or left after it exited

    def stray(self, procs: Sequence[psutil.Process], pgid: int, sig: int) -> None:
        """Signals ``procs`` and remembers them by name for the report."""
        for proc in procs:
            self.strays.setdefault(proc.pid, _label(proc, pgid))
        _send(procs, sig)

    def scan(self) -> list[psutil.Process]:
        """Adds what belongs to the tree now; returns the members alive."""
        below_root: set[int] = set()
        if _alive(self.root):
            with contextlib.suppress(psutil.Error):
                below_root = {p.pid for p in self.root.children(recursive=True)}
        try:
            below_us = psutil.Process().children(recursive=True)
        except psutil.Error:
            below_us = []
        for proc in below_us:
            known = self.members.get(proc.pid)
            if known is not None and known == proc:
                continue
            try:
                key = (proc.pid, proc.create_time())
            except psutil.Error:
                continue
            if key in self.strangers:
                continue
            if proc.pid in below_root or _marked(proc, self.mark):
                self.members[proc.pid] = proc
            else:
                self.strangers.add(key)
        return [p for p in self.members.values() if _alive(p)]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(procs: Sequence[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # psutil checks first that the pid still names this process
            proc.send_signal(sig)


def _reap_orphans(ours: set[int]) -> None:
    """Waits for the launcher's dead children that nobody else waits for: vLLM's orphans re-parented to it.
    Children in ``ours`` (vLLM itself, the watcher, what the caller started before) have their own Popen."""
    try:
        children = psutil.Process().children()
    except psutil.Error:
        return
    for proc in children:
        if proc.pid in ours:
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy(source: int, sinks: list[tuple[str, int]], say, what: str) -> None:
    """Copies ``source`` to every sink in chunks until EOF. A sink that fails is dropped with one line; the
    source is always read to its end, so the writer never blocks on a full pipe."""
    live = list(sinks)
    while True:
        try:
            chunk = os.read(source, CHUNK)
        except OSError:
            return
        if not chunk:
            return
        for sink in list(live):
            name, fd = sink
            try:
                _write_all(fd, chunk)
            except OSError as exc:
                live.remove(sink)
                say(
                    f"{name}: write failed ({exc.strerror or exc}); {what}'s output is no longer copied there, "
                    f"{what} goes on"
                )


def _stdout_fd() -> int:
    try:
        sys.stdout.flush()
        return sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return 1


def _open_log(log_file: str, say, what: str) -> int | None:
    try:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link planted where the log goes is not written through (launch/files.py's rule)
        return os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename and exc.filename != log_file else ""
        say(f"log file {log_file}: cannot open ({exc.strerror or exc}{where}); {what} runs without it")
        return None


def _report_health(child: subprocess.Popen, url: str, timeout: float, say) -> None:
    from launch import wait

    def gone() -> str | None:
        return None if child.poll() is None else f"vLLM exited with code {child.returncode}"

    try:
        took = wait.until(
            lambda: wait.healthy(url), f"vLLM's API at {url}", timeout, say=say, every=30, interval=1, stop=gone
        )
        say(f"vLLM is healthy at {url}, {took:.1f} s after start")
    except wait.WaitTimeout as exc:
        say(str(exc))


def _start_watcher(mark: str, say) -> subprocess.Popen | None:
    """The process that kills vLLM's tree if the launcher is SIGKILLed (see the module's docstring)."""
    env = {k: v for k, v in os.environ.items() if k != MARK}
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "launch.supervise", "--watch", mark],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        say(
            f"cannot start the watcher ({exc.strerror or exc}): a SIGKILL of the launcher would leave vLLM's workers running"
        )
        return None


def _release_watcher(watcher: subprocess.Popen | None) -> None:
    if watcher is None:
        return
    try:
        watcher.stdin.write(b"done")
        watcher.stdin.close()
        watcher.wait(timeout=5)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        watcher.kill()


@dataclass
class _Stop:
    """What the signal handler recorded; the main loop acts on it (a handler does no I/O)."""

    signal_name: str | None = None
    deadline: float | None = None
    now: bool = False  # a second Ctrl-C
    announced: bool = False
    killed: bool = False


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    log_file: str | None = None,
    stop_timeout: float = 30.0,
    health_url: str | None = None,
    health_timeout: float = 1800.0,
    say=lambda msg: print(f"[launch] {msg}", file=sys.stderr, flush=True),
    what: str = "vLLM",
    stop_when: Callable[[], str | None] | None = None,
) -> int:
    """Starts ``argv`` and supervises it until it and everything it started have ended. With
    ``health_url``, says when vLLM's API first answers there (or that it did not, within the bound).
    ``stop_when`` is asked about every 0.2 s while vLLM runs; a reason it gives stops vLLM as SIGTERM does
    (launch/peers.py: a node of the group is gone)."""
    say = _quiet(say)
    stop = _Stop()

    def on_signal(signum: int, _frame) -> None:
        if stop.deadline is None:
            stop.signal_name = signal.Signals(signum).name
            stop.deadline = time.monotonic() + stop_timeout
        elif signum == signal.SIGINT:
            stop.now = True  # a second Ctrl-C means "now"; a second SIGTERM is a scheduler repeating itself

    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    before = {p.pid for p in psutil.Process().children()}
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    watcher = _start_watcher(mark, say)
    log = _open_log(log_file, say, what) if log_file else None
    child = None
    copier = None
    try:
        child = subprocess.Popen(
            list(argv),
            env={**env, MARK: mark},
            start_new_session=True,
            stdout=subprocess.PIPE if log is not None else None,
            stderr=subprocess.STDOUT if log is not None else None,
            preexec_fn=_dies_with(os.getpid()),  # noqa: PLW1509 - only prctl and getppid run there
        )
        pgid = child.pid
        ours = before | {child.pid} | ({watcher.pid} if watcher else set())
        tree = _Tree(psutil.Process(child.pid), mark)
        reporter = None
        if health_url:
            reporter = threading.Thread(
                target=_report_health, args=(child, health_url, health_timeout, say), daemon=True
            )
            reporter.start()
        if log is not None:
            sinks = [("stdout", _stdout_fd()), (f"log file {log_file}", log)]
            copier = threading.Thread(target=_copy, args=(child.stdout.fileno(), sinks, say, what), daemon=True)
            copier.start()

        def act_on_stop() -> None:
            if stop.deadline is not None and not stop.announced:
                stop.announced = True
                say(f"{stop.signal_name}: stopping {what} (process group {pgid}), up to {stop_timeout:g} s")
                _signal_group(pgid, signal.SIGTERM)
                tree.stray([p for p in tree.scan() if _outside(p, pgid)], pgid, signal.SIGTERM)
            if stop.now and not stop.killed:
                say(f"SIGINT again: sending SIGKILL to {what}'s process group {pgid} and its other processes")
            elif stop.deadline is not None and not stop.killed and time.monotonic() >= stop.deadline:
                say(f"{what} did not stop within {stop_timeout:g} s: sending SIGKILL to process group {pgid}")
            else:
                return
            stop.killed = True
            _signal_group(pgid, signal.SIGKILL)
            _send(tree.scan(), signal.SIGKILL)

        next_scan = time.monotonic() + SCAN_EVERY
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop.deadline is None and stop_when is not None and (reason := stop_when()):
                    stop.signal_name, stop.deadline = reason, time.monotonic() + stop_timeout
                act_on_stop()
                if time.monotonic() >= next_scan:
                    tree.scan()
                    _reap_orphans(ours)
                    next_scan = time.monotonic() + SCAN_EVERY
        act_on_stop()  # a signal that came as vLLM exited is still said
        # vLLM is gone; its helpers may not be. Stop them within the same bound.
        deadline = stop.deadline if stop.deadline is not None else time.monotonic() + stop_timeout
        _stop_rest(tree, pgid, deadline, ours, say, what, now=stop.killed)
        if tree.strays:
            plural = "es" if len(tree.strays) > 1 else ""
            say(f"stopped {len(tree.strays)} stray process{plural} of {what}: {_names(list(tree.strays.values()))}")
        if reporter:  # it says why the wait for /health ended; its probe is bounded
            reporter.join(timeout=5)
        if copier:
            copier.join(timeout=5)
        return 128 - code if code < 0 else code
    finally:
        if child is not None and child.poll() is None:  # only on an unexpected error above
            _signal_group(child.pid, signal.SIGKILL)
            child.kill()
        _release_watcher(watcher)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        if log is not None and not (copier and copier.is_alive()):  # a copy still running keeps its file
            os.close(log)


def _outside(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) != pgid
    except OSError:
        return False


def _stop_rest(tree: _Tree, pgid: int, deadline: float, ours: set[int], say, what: str, now: bool) -> None:
    """SIGTERM (SIGKILL with ``now``) to what is left of vLLM's tree, SIGKILL at ``deadline``."""
    _reap_orphans(ours)
    left = tree.scan()
    if not left and not _group_alive(pgid):
        return
    sig = signal.SIGKILL if now else signal.SIGTERM
    if now:
        deadline = time.monotonic() + 5
    _signal_group(pgid, sig)
    tree.stray(left, pgid, sig)
    signalled = {p.pid for p in left}
    while True:
        time.sleep(0.1)
        _reap_orphans(ours)
        left = tree.scan()
        tree.stray([p for p in left if p.pid not in signalled], pgid, sig)
        signalled |= {p.pid for p in left}
        if not left and not _group_alive(pgid):
            break
        if sig == signal.SIGTERM and time.monotonic() >= deadline:
            say(
                f"processes left by {what} still running at the stop timeout: sending SIGKILL to "
                f"{_names([tree.strays[p.pid] for p in left])}"
            )
            sig = signal.SIGKILL
            _signal_group(pgid, sig)
            tree.stray(left, pgid, sig)
            deadline = time.monotonic() + 5
        elif sig == signal.SIGKILL and time.monotonic() >= deadline:
            say(
                f"processes left by {what} survive SIGKILL (uninterruptible sleep?): {_names([tree.strays[p.pid] for p in left])}"
            )
            break


def _watch(mark: str) -> int:
    """The watcher's life: wait for the launcher's last word; without it, kill what carries the mark."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done":
        return 0
    killed: dict[int, str] = {}
    end = time.monotonic() + WATCHER_BOUND
    while time.monotonic() < end:
        found = [p for p in psutil.process_iter() if p.pid != os.getpid() and _marked(p, mark)]
        if not found:
            break
        for proc in found:
            try:
                name = proc.name()
                proc.kill()
                killed[proc.pid] = f"{proc.pid} {name}"
            except psutil.Error:
                pass
        time.sleep(0.05)
    if killed:
        _quiet(lambda m: print(m, file=sys.stderr, flush=True))(
            f"[launch] the launcher was killed: sent SIGKILL to {len(killed)} processes of the tree it supervised: "
            f"{_names(list(killed.values()))}"
        )
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--watch"]:
    sys.exit(_watch(sys.argv[2]))
