# The compose stack's archive service (provision render --archive), run by the container's
# python3 as the barman user. Barman does the archiving; this loop only schedules it:
#
#   - every minute: `barman cron` (starts pg_receivewal, the WAL stream from the stack's postgres
#     through the replication slot, again when it stopped; applies the retention policy);
#   - a base backup (pg_basebackup through `barman backup`) at once when there is none, then
#     whenever the newest is older than BOTFLEET_BASE_EVERY seconds;
#   - `barman check` after each round: the container is healthy while the last check passed
#     (/run/barman/healthy, touched every 15 s by a heartbeat; the compose health check reads its
#     age). A failing check's lines go to the container's log.
#
# Nothing here holds a secret: the role's password is in the passfile the entrypoint copied to
# /run/barman/pgpass (0600, the barman user's), named in barman.conf's conninfo.
import json
import os
import signal
import subprocess
import sys
import threading
import time

CONFIG = os.environ.get("BOTFLEET_BARMAN_CONFIG", "/etc/botfleet/barman.conf")
SERVER = os.environ.get("BOTFLEET_ARCHIVE_SERVER", "default")
BASE_EVERY = int(os.environ.get("BOTFLEET_BASE_EVERY", "86400"))
ROUND = int(os.environ.get("BOTFLEET_ARCHIVE_ROUND", "60"))
ROUNDS = int(os.environ.get("BOTFLEET_ARCHIVE_ROUNDS", "0"))  # 0: until stopped (a test runs one)
HOME = os.environ.get("BOTFLEET_BARMAN_HOME", "/var/lib/barman")  # barman_home in barman.conf
HEALTHY = os.environ.get("BOTFLEET_ARCHIVE_HEALTH", "/run/barman/healthy")

stopping = threading.Event()
healthy = threading.Event()


def say(msg):
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC [archive] {msg}", flush=True)


def barman(*args, json_out=False, timeout=3600):
    cmd = ["barman", "-c", CONFIG, *(["-f", "json"] if json_out else ["-q"]), *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout} s")
    finally:
        reap()


def reap():
    """As PID 1, collect pg_receivewal and barman's other background children once they end.
    Called only between barman calls: no child of subprocess.run is ever waited for here."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def last_lines(proc):
    lines = [line.strip() for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or f"exit code {proc.returncode}"


def newest_backup_end():
    """The end (epoch seconds) of the newest done base backup, 0 when there is none, None when
    barman could not tell."""
    proc = barman("list-backups", SERVER, json_out=True, timeout=120)
    if proc.returncode != 0:
        say(f"barman list-backups failed: {last_lines(proc)}")
        return None
    try:
        rows = json.loads(proc.stdout or "{}").get(SERVER, [])
    except (ValueError, AttributeError):
        return None
    ends = [float(r.get("end_time_timestamp") or 0) for r in rows if isinstance(r, dict) and r.get("status") == "DONE"]
    return max(ends, default=0)


def has_wal():
    wals = os.path.join(HOME, SERVER, "wals")
    return os.path.isdir(wals) and any(name != "xlog.db" for name in os.listdir(wals))


def one_round():
    proc = barman("cron", timeout=300)
    if proc.returncode != 0:
        say(f"barman cron failed: {last_lines(proc)}")
    newest = newest_backup_end()
    if newest is not None and time.time() - newest > BASE_EVERY:
        if not has_wal():
            say("archiving a first WAL file (barman switch-wal)")
            proc = barman("switch-wal", "--force", "--archive", "--archive-timeout", "120", SERVER, timeout=180)
            if proc.returncode != 0:
                say(f"barman switch-wal failed: {last_lines(proc)}")
        say("taking a base backup (barman backup)")
        started, began = time.monotonic(), time.time()
        proc = barman("backup", SERVER, timeout=24 * 3600)
        if proc.returncode == 0:
            # The backup's last WAL is in the segment being streamed: close it and have it archived
            # (barman cron moves what the receiver wrote into the archive), then the backup is done.
            proc = barman("switch-wal", "--force", "--archive", "--archive-timeout", "300", SERVER, timeout=360)
            if proc.returncode != 0:
                say(f"barman switch-wal failed: {last_lines(proc)}")
            barman("cron", timeout=300)  # its WAL, and the retention policy now that a newer backup exists
            newest = newest_backup_end()
            if newest is not None and newest >= began:
                say(f"base backup done in {time.monotonic() - started:.1f} s")
            else:
                say("base backup taken; waiting for its WAL (the next round finishes it)")
        else:
            say(f"barman backup failed: {last_lines(proc)}")
    proc = barman("check", SERVER, timeout=300)
    if proc.returncode == 0:
        if not healthy.is_set():
            say("barman check: every check passed")
        healthy.set()
    else:
        failed = [line.strip() for line in proc.stdout.splitlines() if "FAILED" in line]
        say(f"barman check failed: {'; '.join(failed) or last_lines(proc)}")
        healthy.clear()


def beat():
    try:
        if healthy.is_set():
            with open(HEALTHY, "w") as fh:
                fh.write(f"{int(time.time())}\n")
        elif os.path.exists(HEALTHY):
            os.unlink(HEALTHY)
    except OSError as err:
        say(f"cannot write {HEALTHY}: {err.strerror}")


def heartbeat():
    while not stopping.is_set():
        beat()
        stopping.wait(15)


def stop(signum, _frame):
    stopping.set()


def main():
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say(f"archiving server {SERVER} with {CONFIG}; a base backup every {BASE_EVERY} s")
    threading.Thread(target=heartbeat, daemon=True).start()
    rounds = 0
    while not stopping.is_set():
        one_round()
        rounds += 1
        if rounds == ROUNDS:
            break
        stopping.wait(ROUND)
    say("stopping: barman receive-wal --stop")
    barman("receive-wal", "--stop", SERVER, timeout=60)
    if ROUNDS:  # a test's run: the heartbeat has written what the last check said
        beat()
    return 0


if __name__ == "__main__":
    sys.exit(main())
