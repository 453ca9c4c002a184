"""Hostile code in the sandbox: each attack is contained, the scorer keeps going, the machine is
unharmed. Every case runs in both isolated modes: "auto" (as root, as in CI: namespaces and an
unprivileged uid) and "userns" (what a user without root gets: a user namespace, read-only
mounts, the checks under the user's own uid)."""

from __future__ import annotations

import os
import pwd
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fusechat.scoring.sandbox import OUTPUT_CAP, Check, Sandbox, sandbox_uid

WORKERS = 2
TIMEOUT_S = 2.0
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


@pytest.fixture(scope="module", params=["auto", "userns"])
def sandbox(request):
    os.environ["FUSECHAT_TEST_SECRET"] = SECRET  # a secret of the scorer's environment
    sb = Sandbox(workers=WORKERS, timeout_s=TIMEOUT_S, memory_mb=256, isolation=request.param)
    try:
        yield sb
    finally:
        sb.close()
        os.environ.pop("FUSECHAT_TEST_SECRET", None)


def sandbox_processes() -> list[int]:
    """Processes running as one of the checks' uids (none may outlive a check)."""
    uids = {sandbox_uid(os.getpid(), i) for i in range(WORKERS)}
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if p.stat().st_uid in uids:
                    pids.append(int(p.name))
            except FileNotFoundError:
                pass
    return pids


def leftovers(sb: Sandbox) -> list[int]:
    """Processes below the sandbox servers (none may outlive a check, whatever its uid)."""
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    servers = {s.proc.pid for s in sb._servers}
    found = []
    for pid in parent:
        up, seen = parent.get(pid), set()
        while up and up not in seen:
            if up in servers:
                found.append(pid)
                break
            seen.add(up)
            up = parent.get(up)
    return found


def still_works(sb: Sandbox) -> None:
    r = sb.run(Check("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3"]))
    assert r.status == "pass", r
    time.sleep(0.05)
    assert leftovers(sb) == []
    if os.geteuid() == 0:
        assert sandbox_processes() == []


def isolated(sb: Sandbox) -> None:
    if not sb.isolation["isolated"]:
        pytest.skip(f"this machine refuses the namespaces: {sb.isolation['reason']}")


def test_isolation_reported(sandbox, request):
    mode = request.node.callspec.params["sandbox"]
    expected = mode if mode != "auto" else ("uid" if os.geteuid() == 0 else "userns")
    if os.geteuid() == 0:  # root can always create the namespaces (CI runs as root)
        assert sandbox.isolation["isolated"] and sandbox.isolation["mode"] == expected, sandbox.isolation
    elif sandbox.isolation["isolated"]:
        assert sandbox.isolation["mode"] == expected, sandbox.isolation
    else:
        assert "namespaces unavailable" in sandbox.isolation["reason"], sandbox.isolation


def test_root_in_a_user_namespace_falls_back_to_userns(tmp_path):
    """Root inside a user namespace (a rootless container) cannot switch to the checks' uid: that
    mode is refused with its reason, and "auto" takes the user namespace instead."""
    script = tmp_path / "inside.py"
    script.write_text(textwrap.dedent(f"""
        import ctypes, os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        uid, gid = os.geteuid(), os.getegid()
        assert ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0, "no user namespace here"
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")):
            with open(f"/proc/self/{{name}}", "w") as f:
                f.write(text)
        from fusechat.scoring.sandbox import Check, IsolationUnavailable, Sandbox
        try:
            Sandbox(workers=1, isolation="uid")
            print("uid accepted")
        except IsolationUnavailable as e:
            print("uid refused:", e)
        with Sandbox(workers=1, timeout_s=5) as sb:
            r = sb.run(Check("def f():\\n    return 1\\n", ["assert f() == 1"]))
            print("auto", sb.isolation["mode"], r.status)
    """))
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "uid refused: sandbox isolation 'uid' is refused here" in out.stdout, out.stdout
    assert "auto userns pass" in out.stdout, out.stdout


def test_userns_checks_see_only_themselves():
    """The mode a user without root gets: own PID namespace and /proc, not root inside, its folder
    the only writable place, home hidden."""
    with Sandbox(workers=1, timeout_s=TIMEOUT_S, memory_mb=256, isolation="userns") as sb:
        isolated(sb)
        home = os.path.realpath(pwd.getpwuid(os.geteuid()).pw_dir)  # the account's home, as the sandbox reads it
        code = textwrap.dedent(f"""
            import os
            print("ids", os.getpid(), os.getuid(), sorted(p for p in os.listdir("/proc") if p.isdigit()))
            print("home", sorted(os.listdir({home!r})) if os.path.isdir({home!r}) else [])
        """)
        r = sb.run(Check(code, ["assert True"]))
        assert r.status == "pass", r
        assert "ids 1 1000 ['1']" in r.stdout, r.stdout
        shown = eval(r.stdout.split("home ", 1)[1])
        assert set(shown) <= {p.split(os.sep)[len(home.split(os.sep))] for p in (sys.prefix, sys.base_prefix)
                              if os.path.realpath(p).startswith(home + os.sep)}, shown


def test_pass_fail_and_per_test_detail(sandbox):
    code = "def sq(x):\n    print('called', x)\n    return x * x\n"
    r = sandbox.run(Check(code, ["assert sq(3) == 9", "assert sq(2) == 5, 'wrong'", "assert sq(z) == 1"]))
    assert r.status == "fail"
    assert [t["status"] for t in r.tests] == ["pass", "fail", "fail"]
    assert "AssertionError: wrong" in r.tests[1]["error"]
    assert "NameError" in r.tests[2]["error"]
    assert "called 3" in r.stdout
    ok = sandbox.run(Check(code, ["assert double(3) == 9 and pi > 3"], setup="double = sq", prelude="from math import pi"))
    assert ok.status == "pass" and ok.tests[0]["status"] == "pass"


def test_code_that_raises_is_a_failure(sandbox):
    r = sandbox.run(Check("raise ValueError('boom')", ["assert True"]))
    assert r.status == "fail" and "ValueError: boom" in r.detail
    assert r.tests[0]["status"] == "not_run"


def test_exiting_early_is_not_a_pass(sandbox):
    # a program that never ran its tests has failed them; `error` is kept for a broken checker
    r = sandbox.run(Check("import os\nos._exit(0)", ["assert True", "assert 1"]))
    assert r.status == "fail", r
    assert "the tests did not run" in r.detail and "exited with code 0" in r.detail and "2 of 2" in r.detail, r
    assert [t["status"] for t in r.tests] == ["not_run", "not_run"]
    r = sandbox.run(Check("print('ok')", ["assert True", "import os; os._exit(0)", "assert True"]))
    assert r.status == "fail" and "before 2 of 3 tests ran; 1 passed" in r.detail, r
    still_works(sandbox)


def test_infinite_loop_times_out(sandbox):
    t0 = time.monotonic()
    r = sandbox.run(Check("while True:\n    pass\n", ["assert True"]))
    assert r.status == "timeout", r
    assert time.monotonic() - t0 < TIMEOUT_S + 2
    still_works(sandbox)


def test_memory_bomb_is_contained(sandbox):
    r = sandbox.run(Check("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n", ["assert True"]))
    assert r.status == "fail" and "MemoryError" in r.detail, r
    still_works(sandbox)


def test_fork_bomb_is_contained(sandbox):
    code = textwrap.dedent("""
        import os, time
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()  # try to leave the process group that the scorer kills
                    time.sleep(60)
            except OSError:
                time.sleep(60)
    """)
    r = sandbox.run(Check(code, ["assert True"]))
    assert r.status in ("timeout", "fail"), r
    time.sleep(0.2)
    assert sandbox_processes() == [] and leftovers(sandbox) == []  # nothing it forked survives
    still_works(sandbox)


def test_writing_outside_its_folder_is_refused(sandbox, tmp_path):
    isolated(sandbox)
    outside = tmp_path / "escaped.txt"
    shared_tmp = Path("/tmp") / f"fusechat-escape-{uuid.uuid4().hex}"
    code = textwrap.dedent(f"""
        import os
        open("inside.txt", "w").write("ok")  # its own folder is writable
        wrote = []
        for path in ({str(outside)!r}, {str(shared_tmp)!r}, {str(Path.cwd() / 'escaped.txt')!r}):
            try:
                open(path, "w").write("x")
                wrote.append(path)
            except OSError:
                pass
        print("wrote", wrote)
    """)
    r = sandbox.run(Check(code, ["assert os.path.exists('inside.txt')"]))
    assert r.status == "pass", r
    assert not outside.exists() and not shared_tmp.exists() and not (Path.cwd() / "escaped.txt").exists()
    still_works(sandbox)


def test_parent_environment_secrets_are_not_visible(sandbox):
    code = textwrap.dedent(f"""
        import os
        found = [k for k, v in os.environ.items() if {SECRET!r} in v]
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{{pid}}/environ", "rb") as f:
                    if {SECRET!r}.encode() in f.read():
                        found.append(pid)
            except OSError:
                pass
        print("found", found)
    """)
    r = sandbox.run(Check(code, ["assert True"]))
    assert r.status == "pass", r
    if sandbox.isolation["isolated"]:  # without namespaces /proc/<scorer>/environ stays readable
        assert "found []" in r.stdout, r.stdout
    assert SECRET not in r.stdout


def test_network_is_unreachable(sandbox):
    isolated(sandbox)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = textwrap.dedent(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=1).sendall(b"hello")
                print("connected")
            except OSError as e:
                print("refused", e)
        """)
        r = sandbox.run(Check(code, ["assert True"]))
        assert r.status == "pass" and "refused" in r.stdout, r
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came through
    finally:
        listener.close()


def test_killing_its_parent_or_the_scorer_fails(sandbox):
    servers = [s.proc.pid for s in sandbox._servers]
    code = textwrap.dedent(f"""
        import os, signal
        for pid in (os.getppid(), {os.getpid()}, *{servers!r}):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    """)
    r = sandbox.run(Check(code, ["assert True"]))
    assert r.status in ("pass", "error"), r
    if sandbox.isolation["isolated"]:
        assert all(s.proc.poll() is None for s in sandbox._servers)
    still_works(sandbox)  # and this test process is evidently alive


def test_stdout_flood_is_capped(sandbox):
    code = "import sys\nfor _ in range(20000):\n    sys.stdout.write('x' * 2000 + '\\n')\n"
    t0 = time.monotonic()
    r = sandbox.run(Check(code, ["assert True"]))
    assert r.status == "pass", r
    assert len(r.stdout) == OUTPUT_CAP
    assert time.monotonic() - t0 < TIMEOUT_S
    still_works(sandbox)


def test_many_checks_in_parallel(sandbox):
    checks = [Check(f"def f():\n    return {i}\n", [f"assert f() == {i}", f"assert f() != {i}"]) for i in range(20)]
    results = sandbox.run_many(checks)
    assert [r.tests[0]["status"] for r in results] == ["pass"] * 20
    assert all(r.status == "fail" for r in results)
