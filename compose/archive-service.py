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
# Left by `recover`: the recovered server is on a new timeline, so a base backup is due at once.
BACKUP_NOW = os.path.join(HOME, SERVER, "botfleet-backup-now")

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
    asked = os.path.exists(BACKUP_NOW)
    if newest is not None and (time.time() - newest > BASE_EVERY or asked):
        if not has_wal():
            say("archiving a first WAL file (barman switch-wal)")
            proc = barman("switch-wal", "--force", "--archive", "--archive-timeout", "120", SERVER, timeout=180)
            if proc.returncode != 0:
                say(f"barman switch-wal failed: {last_lines(proc)}")
        say("taking a base backup (barman backup)")
        started, began = time.monotonic(), int(time.time())  # barman keeps whole seconds
        proc = barman("backup", SERVER, timeout=24 * 3600)
        # Refused before it starts while one of barman's own checks fails: right after `barman
        # cron` the receiver it has just started may not stream yet. Again, a few times.
        for _ in range(15):
            if proc.returncode == 0 or "Impossible to start the backup" not in proc.stdout + proc.stderr \
                    or stopping.is_set():
                break
            time.sleep(2)
            proc = barman("backup", SERVER, timeout=24 * 3600)
        if proc.returncode == 0:
            # The backup's last WAL is in the segment being streamed: close it and have it archived
            # (barman cron moves what the receiver wrote into the archive, and marks the backup
            # done once it has all its WAL); again until it is done: each switch closes a segment.
            for _ in range(10):
                barman("cron", timeout=300)
                newest = newest_backup_end()
                if newest is not None and newest >= began or stopping.is_set():
                    break
                proc = barman("switch-wal", "--force", "--archive", "--archive-timeout", "60", SERVER, timeout=120)
                if proc.returncode != 0:
                    say(f"barman switch-wal failed: {last_lines(proc)}")
            if newest is not None and newest >= began:
                say(f"base backup done in {time.monotonic() - started:.1f} s")
                if asked:
                    os.unlink(BACKUP_NOW)
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


def recover(argv):
    """`archive-service.py recover TIME DATA [--replace]`, run as root in a one-off container of
    this service with the pgdata volume mounted at DATA (the path the postgres container sees it
    at: the recovered settings name it): the archive recovered into DATA to TIME (Barman, as the
    barman user; the server replays the WAL to TIME and promotes on its next start), then owned
    by postgres. DATA must be empty, or --replace (its content is deleted: copy it first). What the
    WAL receiver had streamed is moved to streaming-before-recovery/ in the archive's volume, so
    the receiver starts again on the recovered server's new timeline."""
    import shutil

    args = [a for a in argv if a != "--replace"]
    if len(args) != 2 or not os.path.isdir(args[1]):
        print("usage: archive-service.py recover 'YYYY-MM-DD HH:MM:SS+00' DATA_FOLDER [--replace]", file=sys.stderr)
        return 2
    target, data = args
    if os.listdir(data) and "--replace" not in argv:
        print(f"{data} is not empty: copy it first, then add --replace (nothing was changed)", file=sys.stderr)
        return 2
    as_barman = ["setpriv", "--reuid=barman", "--regid=barman", "--init-groups", "env", "HOME=" + HOME]
    # The time is checked before anything is deleted: in the archive's window, with a time zone.
    from dateutil import parser

    try:
        when = parser.parse(target)
    except (ValueError, OverflowError):
        print(f"{target!r} is not a time such as '2026-11-25 10:15:00+00' (nothing was changed)", file=sys.stderr)
        return 2
    if when.tzinfo is None:
        print("give the time with its time zone, e.g. '2026-11-25 10:15:00+00' (nothing was changed)", file=sys.stderr)
        return 2
    listed = subprocess.run([*as_barman, "barman", "-c", CONFIG, "-f", "json", "list-backups", SERVER],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    ends = [float(r["end_time_timestamp"]) for r in json.loads(listed.stdout or "{}").get(SERVER, [])
            if r.get("status") == "DONE" and r.get("end_time_timestamp")] if listed.returncode == 0 else []
    if not ends or when.timestamp() < min(ends) or when.timestamp() > time.time():
        first = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(min(ends))) if ends else "none yet"
        print(f"{target} is outside the archive's window (from the first base backup's end, {first}, to now): "
              "nothing was changed", file=sys.stderr)
        return 2
    for name in os.listdir(data):
        path = os.path.join(data, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    shutil.chown(data, "barman", "barman")
    say(f"recovering server {SERVER} to {target} into {data} (barman recover)")
    proc = subprocess.run([*as_barman, "barman", "-c", CONFIG, "recover", "--target-time", target, "--target-action",
                           "promote", SERVER, "latest", data], stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        say("barman recover failed (its lines are above)")
        return 1
    streaming = os.path.join(HOME, SERVER, "streaming")
    aside = streaming + "-before-recovery"
    moved = subprocess.run([*as_barman, "sh", "-c", 'mkdir -p -m 0700 "$1" && find "$2" -mindepth 1 -maxdepth 1 '
                            '-exec mv -t "$1" {} + && touch "$3"', "sh", aside, streaming, BACKUP_NOW],
                           stdin=subprocess.DEVNULL)
    if moved.returncode != 0:
        return 1
    for root, dirs, names in os.walk(data):
        for name in [*dirs, *names]:
            shutil.chown(os.path.join(root, name), "postgres", "postgres")
    shutil.chown(data, "postgres", "postgres")
    say(f"recovered: start the stack (docker compose up -d --wait); the WAL receiver's old files are in {aside}; "
        "the archive service takes a base backup of the new timeline as it starts")
    return 0


if __name__ == "__main__":
    sys.exit(recover(sys.argv[2:]) if sys.argv[1:2] == ["recover"] else main())
