"""Hostile code in the sandbox: each attack is contained, the scorer keeps going, the machine is
unharmed. The full isolation (namespaces, unprivileged uid) needs root, as in CI."""

from __future__ import annotations

import os
import socket
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from fusechat.scoring.sandbox import OUTPUT_CAP, Check, Sandbox, sandbox_uid

WORKERS = 2
TIMEOUT_S = 2.0
SECRET = f"s3cr3t-{uuid.uuid4().hex}"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid switch need root")


@pytest.fixture(scope="module")
def sandbox():
    os.environ["FUSECHAT_TEST_SECRET"] = SECRET  # a secret of the scorer's environment
    sb = Sandbox(workers=WORKERS, timeout_s=TIMEOUT_S, memory_mb=256)
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


def still_works(sb: Sandbox) -> None:
    r = sb.run(Check("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3"]))
    assert r.status == "pass", r
    if os.geteuid() == 0:
        time.sleep(0.05)
        assert sandbox_processes() == []


def test_isolation_reported(sandbox):
    if os.geteuid() == 0:
        assert sandbox.isolation["isolated"], sandbox.isolation
    else:
        assert not sandbox.isolation["isolated"] and "not root" in sandbox.isolation["reason"]


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
    r = sandbox.run(Check("import os\nos._exit(0)", ["assert True"]))
    assert r.status == "error", r
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
    assert sandbox_processes() == []  # nothing it forked survives
    still_works(sandbox)


@as_root
def test_writing_outside_its_folder_is_refused(sandbox, tmp_path):
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
    if os.geteuid() == 0:  # without the uid switch /proc/<scorer>/environ stays readable
        assert "found []" in r.stdout, r.stdout
    assert SECRET not in r.stdout


@as_root
def test_network_is_unreachable(sandbox):
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
    if os.geteuid() == 0:
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
