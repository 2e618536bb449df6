"""The real console script, each run a new process: what only a process shows (its exit
status, usage errors, a closed stdout, Ctrl-C), and that the in-process runs the other
tests use (conftest.provision_in_process) behave as it does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

from .conftest import PROVISION, provision_in_process, provision_process


def _env(root) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ADMIN_DATABASE_URL", "BOTFLEET_HOME")}
    env.update(BOTFLEET_HOME=str(root), NO_COLOR="1", COLUMNS="200")
    return env


USAGE = [
    ([], 2, "Usage: provision [OPTIONS] COMMAND [ARGS]..."),  # help on stdout, status 2
    (["--help"], 0, "Usage: provision [OPTIONS] COMMAND [ARGS]..."),
    (["add-bot", "--help"], 0, "Usage: provision add-bot [OPTIONS]"),
    (["add-bot", "x", "--bogus"], 2, "error: No such option: --bogus"),
    (["frobnicate"], 2, "error: No such command 'frobnicate'. (see: provision --help)"),
    (["add-bot"], 2, "error: Missing argument 'name'. (see: provision add-bot --help)"),
    (["add-bot", "Bad_Name"], 2, "error: invalid bot name 'Bad_Name'"),
    (["add-bot", "ok-name", "--pool-size", "0"], 2, "error: "),
]


@pytest.mark.parametrize("args, code, needle", USAGE, ids=[" ".join(a) or "no-args" for a, _, _ in USAGE])
def test_usage_and_exit_status_match_in_process_runs(tmp_path, args, code, needle):
    """Usage errors are one red line and status 2 (help: 0); the in-process run prints and
    returns exactly what the console script does."""
    real = provision_process(args, _env(tmp_path))
    assert real.returncode == code, real.stderr
    assert needle in real.stdout + real.stderr
    if code == 2 and args:
        assert real.stdout == "" and len(real.stderr.strip().splitlines()) == 1, real.stderr
    inproc = provision_in_process(args, _env(tmp_path))
    assert (inproc.returncode, inproc.stdout, inproc.stderr) == (real.returncode, real.stdout, real.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing was written


@pytest.mark.parametrize("args", [["--help"], ["server", "status"]], ids=["help", "command"])
def test_a_closed_stdout_ends_quietly(tmp_path, args):
    """`provision ... | head`: the reader went away; status 1, and no traceback or error line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([PROVISION, *args], stdout=write_end, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env=_env(tmp_path), timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""


def test_ctrl_c_is_status_130_and_one_line(tmp_path):
    """Interrupted while waiting for a server (one that accepts and never answers)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(60)
    env = _env(tmp_path)
    env["ADMIN_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{listener.getsockname()[1]}/postgres"
    proc = subprocess.Popen([PROVISION, "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)  # its first packet: now it waits for the server's answer
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
    assert proc.returncode == 130
    assert out == ""
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        "error: interrupted; run the command again to finish (it converges)"]
    assert "Traceback" not in err
