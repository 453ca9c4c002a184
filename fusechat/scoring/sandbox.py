"""Run untrusted Python (model-written code and its asserts) in a contained child process.

Layout: the scorer starts `workers` server processes (this file run as a script, standard library
only, with a minimal environment); each server forks one throwaway child per check. Forking from a
warm server costs a few milliseconds where a fresh interpreter per check (the human-eval pattern)
costs tens, and the scorer's own process (threads, torch) is never forked.

Per check, as root (here and in CI):
- new network namespace (no interface is up: nothing, loopback included, is reachable),
- new PID namespace whose init is the check: when it ends, every process it left is killed,
- new mount namespace with fresh tmpfs over /tmp, /var/tmp and /dev/shm (writes there vanish),
- its own unprivileged uid per server (files outside its folder, other processes and their
  /proc/*/environ are out of reach, and RLIMIT_NPROC is enforced; root ignores it),
- resource limits (CPU time, address space, file size, processes, no core files),
- a private working folder, an empty environment plus PATH/HOME/TMPDIR/LANG,
- stdin from /dev/null, stdout/stderr captured up to a cap (the rest drained and dropped),
- a wall-clock timeout after which the whole process group (and namespace) is killed.
Without root (a user on a shared cluster) the checks run as that user, inside a user namespace
of their own where the kernel allows unprivileged ones (most Linux distributions do):
- the same network, PID and mount namespaces and tmpfs mounts as above, and a fresh /proc that
  shows only the check's own processes (the scorer and its environment are out of sight and reach),
- every mount read-only except the check's folder and the tmpfs mounts: nothing the user owns can
  be changed,
- the user's home folder covered by an empty tmpfs (tokens and keys stay unread; the interpreter's
  folders under it are bound back read-only),
- no capabilities and no_new_privs, under a uid that is not root inside the namespace, so the mounts
  cannot be undone; RLIMIT_NPROC counts the namespace's own processes,
- the same limits, environment, output cap and timeout.
Files outside home that the user can read stay readable. Where user namespaces are refused too,
checks run with the resource limits, the private folder, the environment and the timeout only;
the server reports which of the three modes holds.

What it does not defend against: code that deliberately forges its own verdict (the tests run in
the same process as the code, as in human-eval), and CPU/memory use below the limits.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

try:  # the scorer's side; a server runs this file alone, with the standard library only
    from fusechat.errors import FusechatError as _UserError
except ImportError:
    _UserError = RuntimeError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x20, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 24, 38, 36
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux 5.12+)
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 0x1
USERNS_UID = 1000  # the checks' uid inside their user namespace: not root there, so no way back to caps
# Server i of scorer process P runs its checks as uid sandbox_uid(P, i): one uid per server so that
# one check's fork bomb (RLIMIT_NPROC counts per uid) cannot starve a check running beside it, in
# this scorer or in another one on the same machine.
UID_BASE = 61000
MAX_PROCS = 32
FILE_SIZE_BYTES = 16 * 1024 * 1024
OUTPUT_CAP = 8 * 1024
ERROR_CAP = 500
PRIVATE_TMPFS = ("/tmp", "/var/tmp", "/dev/shm")
# the checked child's exit code, and the start of its stderr line, when the harness itself broke
# (isolation or limits could not be set up): the only case where a check that ran no test is `error`
HARNESS_FAILED = 70
HARNESS_MARK = "sandbox child failed: "


class IsolationUnavailable(_UserError):
    """The isolation mode a caller insisted on is refused on this machine."""


@dataclass
class Check:
    code: str
    tests: list[str]
    setup: str = ""  # runs after the code, before the tests (it may adapt the code's names)
    prelude: str = ""  # runs before the code (e.g. the imports a judge provides)


@dataclass
class CheckResult:
    status: str  # pass | fail | timeout | error
    detail: str
    tests: list[dict] = field(default_factory=list)  # {test, status: pass|fail|not_run, error}
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0


# ----------------------------------------------------------------------------------------------
# server side (runs inside `python -I sandbox.py`)


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _interpreter_dirs() -> set[str]:
    """The folders a check's interpreter reads: its prefixes and its import path."""
    return {sys.base_prefix, sys.prefix, *(p for p in sys.path if p and os.path.isdir(p))}


def _hidden_interpreter_dirs() -> dict[str, list[str]]:
    """Interpreter folders behind a folder other users cannot enter (e.g. a Python under /root).

    Returns {blocked ancestor: [folders under it the checks must read]}; `_isolate` covers each
    blocked ancestor with an empty tmpfs and binds only those folders back, so that the checks'
    unprivileged uid can import the standard library without seeing anything else there.
    """
    plan: dict[str, list[str]] = {}
    for d in sorted(os.path.abspath(p) for p in _interpreter_dirs()):
        parts = d.split(os.sep)
        for i in range(2, len(parts)):
            anc = os.sep.join(parts[:i])
            if not os.stat(anc).st_mode & 0o001:
                if not any(d.startswith(k + os.sep) for k in plan.get(anc, [])):
                    plan.setdefault(anc, []).append(d)
                break
    return plan


def _check(rc: int, what: str) -> None:
    import ctypes

    if rc != 0:
        raise OSError(ctypes.get_errno(), what)


def _isolate(libc, hidden: dict[str, list[str]], mode: str, work: str) -> None:
    """New network, PID and mount namespaces (and user namespace in "userns" mode), with private
    tmpfs mounts; leaves the process in `work`; raises OSError."""
    import ctypes

    if mode == "userns":
        uid, gid = os.geteuid(), os.getegid()
        _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS), "unshare")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{USERNS_UID} {uid} 1"),
                           ("gid_map", f"{USERNS_UID} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS), "unshare")
    # without this a mount below could propagate back to the host's mount namespace
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    if mode == "userns":
        # the checks run as the user: every mount read-only, then the check's folder writable again
        # (mount_setattr: the one call that makes a whole tree read-only; Python has no binding)
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)
        rc = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, attr, ctypes.sizeof(attr))
        _check(rc, "mount_setattr / ro")
        _check(libc.mount(work.encode(), work.encode(), None, MS_BIND, None), f"bind {work}")
        _check(libc.mount(None, work.encode(), None, MS_BIND | MS_REMOUNT, None), f"remount {work} rw")
    os.chdir(work)  # before the tmpfs mounts: the folder stays reachable through the cwd
    for d in PRIVATE_TMPFS:
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=16m,mode=1777"), f"mount tmpfs {d}")
    for blocked, keep in hidden.items():
        fds = [os.open(k, os.O_PATH) for k in keep]
        _check(libc.mount(b"tmpfs", blocked.encode(), b"tmpfs", 0, b"size=1m,mode=755"), f"mount tmpfs {blocked}")
        for k, fd in zip(keep, fds):
            os.makedirs(k, exist_ok=True)
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), k.encode(), None, MS_BIND | MS_REC, None), f"bind {k}")
            os.close(fd)


def _enter_userns_check(libc) -> None:
    """In the check's PID namespace (as its init), before the check runs: a /proc of that namespace
    only, then no capabilities and no way to gain any (the mounts cannot be undone)."""
    import ctypes

    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) != 0:
        # a container that masks parts of its /proc refuses a new one: hide /proc instead
        _check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", flags, b"size=16k,mode=555"), "mount tmpfs /proc")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    for cap in range(64):  # EINVAL past the kernel's last capability
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset: drop all")


def _home_dirs() -> dict[str, list[str]]:
    """{the user's home: [interpreter folders under it]}: what "userns" mode covers and binds back."""
    import pwd

    home = os.path.realpath(pwd.getpwuid(os.geteuid()).pw_dir)
    if home in ("/", "") or not os.path.isdir(home):
        return {}
    keep = sorted({os.path.realpath(p) for p in _interpreter_dirs() if os.path.realpath(p).startswith(home + os.sep)})
    keep = [k for k in keep if not any(k.startswith(o + os.sep) for o in keep)]
    return {home: keep}


REASONS = {
    "uid": "network, PID and mount namespaces; unprivileged uid",
    "userns": "user, network, PID and mount namespaces; read-only mounts except its folder; home hidden; "
              "no capabilities",
}


def _probe_isolation(requested: str, uid: int) -> tuple[str, dict, dict]:
    """(mode, hidden folders, report): fork throwaway children that try the isolation."""
    if requested == "none" or not sys.platform.startswith("linux"):
        why = "isolation off" if requested == "none" else f"not Linux ({sys.platform})"
        return "none", {}, {"isolated": False, "mode": "none", "reason": f"{why}: limits, folder, env, timeout only"}
    failures = []
    for mode in [requested] if requested != "auto" else ["uid", "userns"]:
        hidden = _hidden_interpreter_dirs() if mode == "uid" else _home_dirs()
        msg = _try_isolation(mode, hidden, uid)
        if msg == "ok":
            return mode, hidden, {"isolated": True, "mode": mode, "reason": REASONS[mode]}
        failures.append(f"{mode}: {msg}")
    return "none", {}, {"isolated": False, "mode": "none",
                        "reason": f"namespaces unavailable ({'; '.join(failures)}): limits, folder, env, timeout only"}


def _try_isolation(mode: str, hidden: dict, uid: int) -> str:
    if mode == "uid" and os.geteuid() != 0:
        return "not root"
    work = tempfile.mkdtemp(prefix="fusechat-probe-")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _isolate(_libc(), hidden, mode, work)
            if mode == "userns":
                if os.fork() == 0:  # the namespace's init, as a check would be
                    try:
                        _enter_userns_check(_libc())
                        open("probe", "w").close()  # its folder is writable
                        os.write(w, b"ok")
                    except OSError as e:
                        os.write(w, str(e).encode()[:400])
                    os._exit(0)
                os.wait()
            else:
                # root inside a user namespace (a rootless container) may lack the checks' uid
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.write(w, b"ok")
        except OSError as e:
            os.write(w, str(e).encode()[:400])
        os._exit(0)
    os.close(w)
    msg = os.read(r, 512).decode()
    os.close(r)
    os.waitpid(pid, 0)
    shutil.rmtree(work, ignore_errors=True)
    return msg or "probe ended without a word"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:ERROR_CAP]


def _run_tests(req: dict, results_fd: int) -> None:
    me = os.getpid()

    def report(**kw) -> None:
        # forked copies of this process (a fork bomb) must not add verdicts
        if os.getpid() == me:
            os.write(results_fd, (json.dumps(kw) + "\n").encode())

    # not "__main__": demo code under `if __name__ == "__main__":` (input(), prints) stays idle
    g: dict = {"__name__": "__sandbox__", "__builtins__": __builtins__}
    for phase in ("prelude", "code", "setup"):
        if req.get(phase):
            try:
                exec(compile(req[phase], f"<{phase}>", "exec"), g)
            except BaseException as e:  # SystemExit and KeyboardInterrupt included
                report(phase=phase, error=_describe(e))
                return
    for i, test in enumerate(req["tests"]):
        try:
            exec(compile(test, f"<test {i}>", "exec"), g)
            report(test=i, ok=True)
        except BaseException as e:
            report(test=i, ok=False, error=_describe(e) if str(e) else type(e).__name__)


def _checked_child(req: dict, uid: int, mode: str, hidden: dict, work: str, fds: tuple[int, int, int]) -> None:
    """Runs in the forked child; never returns."""
    out_fd, err_fd, res_fd = fds
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.dup2(res_fd, 3)
        os.closerange(4, 65536)
        if mode == "none":
            os.chdir(work)
        else:
            _isolate(_libc(), hidden, mode, work)
        pid = os.fork()  # the first child in the new PID namespace becomes its init
        if pid:
            os.close(3)
            _, status = os.waitpid(pid, 0)
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        cpu = int(req["timeout_s"]) + 1
        mem = int(req["memory_mb"]) * 1024 * 1024
        for lim, val in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (mem, mem)),
            (resource.RLIMIT_FSIZE, (FILE_SIZE_BYTES, FILE_SIZE_BYTES)),
            (resource.RLIMIT_NPROC, (MAX_PROCS, MAX_PROCS)),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(lim, val)
        if mode == "uid":
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        elif mode == "userns":
            _enter_userns_check(_libc())
        if mode != "none":
            # set after setuid (a credential change clears it): the check dies with its parent
            _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.environ.clear()
        os.environ.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME=".", TMPDIR="/tmp", LANG="C.UTF-8",
                          # one thread each: BLAS pools sized to the machine would reserve address
                          # space (counted by RLIMIT_AS) and compete with the checks beside them
                          OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        _run_tests(req, 3)
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:
        try:
            os.write(2, f"{HARNESS_MARK}{_describe(e)}\n".encode())
        except OSError:
            pass
        os._exit(HARNESS_FAILED)
    os._exit(0)


def _collect(pid: int, fds: list[int], deadline: float) -> tuple[list[bytes], bool]:
    """Drain stdout, stderr and results until the child closes them or the deadline passes."""
    sel = selectors.DefaultSelector()
    bufs = [bytearray() for _ in fds]
    caps = [OUTPUT_CAP, OUTPUT_CAP, 1 << 20]
    for i, fd in enumerate(fds):
        sel.register(fd, selectors.EVENT_READ, i)
    timed_out = False
    open_fds = len(fds)
    while open_fds:
        wait = deadline - time.monotonic()
        if wait <= 0 and not timed_out:
            timed_out = True
            _kill_group(pid)
            deadline = time.monotonic() + 2.0  # only drain what is still in the pipes
            continue
        if wait <= 0:
            break
        for key, _ in sel.select(timeout=wait):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
                open_fds -= 1
            elif len(bufs[key.data]) < caps[key.data]:
                bufs[key.data] += chunk[: caps[key.data] - len(bufs[key.data])]
    sel.close()
    return [bytes(b) for b in bufs], timed_out


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap_orphans(wait_s: float = 2.0) -> None:
    """Reap what the check left (a killed check's namespace init is re-parented to the server)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                time.sleep(0.005)
        except ChildProcessError:
            return


def _run_one(req: dict, uid: int, mode: str, hidden: dict, base: str) -> dict:
    t0 = time.monotonic()
    work = tempfile.mkdtemp(prefix="check-", dir=base)
    if mode == "uid":
        os.chown(work, uid, uid)
    pipes = [os.pipe() for _ in range(3)]
    pid = os.fork()
    if pid == 0:
        for r, _ in pipes:
            os.close(r)
        _checked_child(req, uid, mode, hidden, work, tuple(w for _, w in pipes))
    for _, w in pipes:
        os.close(w)
    (out, err, res), timed_out = _collect(pid, [r for r, _ in pipes], t0 + float(req["timeout_s"]))
    for r, _ in pipes:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    _kill_group(pid)  # without namespaces, leftovers of the check share its process group
    _reap_orphans()
    shutil.rmtree(work, ignore_errors=True)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    return {
        "exit": code,
        "timed_out": timed_out,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "results": res.decode("utf-8", "replace"),
        "wall_s": round(time.monotonic() - t0, 4),
    }


def serve(uid: int, requested: str) -> None:
    """Server loop: one JSON request per stdin line, one JSON reply per stdout line."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        # orphans of a check come back to this server to be reaped, not to the machine's init
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    mode, hidden, iso = _probe_isolation(requested, uid)
    base = tempfile.mkdtemp(prefix="fusechat-sandbox-")
    os.chmod(base, 0o711)  # the checks' uid must reach its own folder inside
    reply = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints must not corrupt the reply channel
    os.close(devnull)
    print(json.dumps({"ready": True, "isolation": iso, "uid": uid if mode == "uid" else os.geteuid()}),
          file=reply, flush=True)
    try:
        for line in sys.stdin:
            req = json.loads(line)
            print(json.dumps(_run_one(req, uid, mode, hidden, base)), file=reply, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# scorer side


def sandbox_uid(pid: int, index: int) -> int:
    return UID_BASE + (pid % 1000) * 64 + index % 64


def _verdict(check: Check, raw: dict, timeout_s: float) -> CheckResult:
    tests = [{"test": t, "status": "not_run", "error": ""} for t in check.tests]
    phase_error = ""
    for line in raw["results"].splitlines():
        try:
            msg = json.loads(line)
            if "phase" in msg:
                phase_error = f"{msg['phase']} raised {msg['error']}"
            else:
                tests[int(msg["test"])].update(status="pass" if msg["ok"] else "fail", error=msg.get("error", ""))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # the child's results channel is not trusted for structure
    n_pass = sum(t["status"] == "pass" for t in tests)
    n_fail = sum(t["status"] == "fail" for t in tests)
    exit_code = raw["exit"]
    signum = exit_code - 128 if exit_code > 128 else 0
    common = dict(tests=tests, stdout=raw["stdout"], stderr=raw["stderr"], wall_s=raw["wall_s"])
    if raw["timed_out"]:
        return CheckResult("timeout", f"wall-clock limit {timeout_s:g}s exceeded ({n_pass} passed)", **common)
    if signum == signal.SIGXCPU:
        return CheckResult("timeout", f"CPU-time limit exceeded ({n_pass} passed)", **common)
    if phase_error:
        return CheckResult("fail", phase_error, **common)
    if n_pass + n_fail < len(tests):
        broken = [line for line in raw["stderr"].splitlines() if line.startswith(HARNESS_MARK)]
        if exit_code == HARNESS_FAILED and broken:
            return CheckResult("error", f"the sandbox could not run the check: {broken[-1][len(HARNESS_MARK):]}", **common)
        if signum:  # a kill from outside (the OOM killer, an operator) looks the same: not the program's verdict
            return CheckResult("error", f"check ended before all tests ran: killed by signal {signum}; "
                               f"{n_pass} passed, {n_fail} failed", **common)
        # the program exited by itself (os._exit) before its tests ran: tests not run are not passed
        return CheckResult("fail", f"the tests did not run: the program exited with code {exit_code} before "
                           f"{len(tests) - n_pass - n_fail} of {len(tests)} tests ran; {n_pass} passed, {n_fail} failed",
                           **common)
    if n_fail:
        first = next(t for t in tests if t["status"] == "fail")
        return CheckResult("fail", f"{n_fail}/{len(tests)} tests failed; first: {first['test'][:200]} -> {first['error']}", **common)
    return CheckResult("pass", f"{n_pass}/{len(tests)} tests passed", **common)


class _Server:
    def __init__(self, index: int, isolation: str):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}  # no secrets
        self.proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), "--serve", str(sandbox_uid(os.getpid(), index)),
             isolation],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
            start_new_session=True,
        )
        hello = self.proc.stdout.readline()
        if not hello:
            raise RuntimeError(f"sandbox server {index} failed to start (exit {self.proc.wait()})")
        self.info = json.loads(hello)

    def run(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sandbox server exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Sandbox:
    """A pool of `workers` sandbox servers; `run` and `run_many` are safe to call from threads.

    isolation: "auto" (as root: "uid", else "userns", else none, which is reported), or one of
    "uid", "userns" and "none" to insist on it: a mode the machine refuses raises
    IsolationUnavailable with the reason.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024, isolation: str = "auto"):
        if isolation not in ("auto", "uid", "userns", "none"):
            raise ValueError(f"isolation must be auto, uid, userns or none, got {isolation!r}")
        self.timeout_s, self.memory_mb, self._mode = timeout_s, memory_mb, isolation
        self._servers = [_Server(i, isolation) for i in range(workers)]
        self._idle: queue.Queue[int] = queue.Queue()
        for i in range(workers):
            self._idle.put(i)
        self._lock = threading.Lock()
        self.isolation = self._servers[0].info["isolation"]
        if isolation not in ("auto", self.isolation["mode"]):
            self.close()
            raise IsolationUnavailable(f"sandbox isolation {isolation!r} is refused here: {self.isolation['reason']}")

    def run(self, check: Check) -> CheckResult:
        req = {"code": check.code, "tests": list(check.tests), "setup": check.setup, "prelude": check.prelude,
               "timeout_s": self.timeout_s, "memory_mb": self.memory_mb}
        i = self._idle.get()
        try:
            raw = self._servers[i].run(req)
        except (RuntimeError, OSError, ValueError) as e:
            # the server itself broke: replace it, report this check as an infrastructure error
            with self._lock:
                self._servers[i].close()
                self._servers[i] = _Server(i, self._mode)
            return CheckResult("error", f"sandbox server failed: {e}",
                               tests=[{"test": t, "status": "not_run", "error": ""} for t in check.tests])
        finally:
            self._idle.put(i)
        return _verdict(check, raw, self.timeout_s)

    def run_many(self, checks: list[Check], progress=None) -> list[CheckResult]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(self._servers)) as ex:
            futures = [ex.submit(self.run, c) for c in checks]
            out = []
            for f in futures:
                out.append(f.result())
                if progress:
                    progress()
            return out

    def close(self) -> None:
        for s in self._servers:
            s.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--serve":
    serve(int(sys.argv[2]), sys.argv[3])
