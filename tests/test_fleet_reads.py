"""Fleet-wide reads (issue 16): `doctor` and `plan` visit the bot databases through a small
bounded pool of connections at once, one connection per bot database, and say exactly what
they said when they visited them one after another.

Every connection the command opens is seen by wrapping ``psycopg.connect`` in this process.
Two looks inside bot databases must be open at the same moment (a barrier the first two
wait on: a run that opens them one after another never gets past it), never more than
pool.MAX_JOBS at once, and each bot database is opened once: by the admin for plan; for
doctor by its login as the bot (its check of the bot's password), whose session also reads
inside, and by the admin only for a bot whose login fails.
"""

from __future__ import annotations

import collections
import json
import threading

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from provisioning import doctor, pool

from .conftest import other_fleets, provision_in_process


class Watch:
    """Every psycopg.connect of the command: per (database, user), and how many bot-database
    connections were open at once."""

    def __init__(self, bot_dbs: set[str], admin_user: str):
        self.bot_dbs, self.admin_user = bot_dbs, admin_user
        self.opened: collections.Counter[tuple[str, str]] = collections.Counter()
        self.open_now = self.peak = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=30)  # a deadlock guard, not a timing
        self.waited = 0

    def wrap(self, real):
        def connect(conninfo="", **kwargs):
            params = conninfo_to_dict(conninfo)
            key = (params.get("dbname", ""), params.get("user", ""))
            inside = key[0] in self.bot_dbs
            with self.lock:
                self.opened[key] += 1
                first_two = inside and self.waited < 2
                self.waited += first_two
            conn = real(conninfo, **kwargs)
            if key[0] in self.bot_dbs:
                with self.lock:
                    self.open_now += 1
                    self.peak = max(self.peak, self.open_now)
            if first_two:
                self.barrier.wait()  # the first two looks inside must be open together (counted, not yet closed)
                close = conn.close

                def closed(close=close):
                    with self.lock:
                        self.open_now -= 1
                    close()
                conn.close = closed
            return conn
        return connect


def watched(fleet, names, *args):
    bot_dbs = {n.replace("-", "_") + "_db" for n in names}
    watch = Watch(bot_dbs, conninfo_to_dict(fleet.server.url).get("user", "postgres"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(psycopg, "connect", watch.wrap(psycopg.connect))
        proc = provision_in_process(list(args), fleet.env())
    return proc, watch


def test_doctor_and_plan_visit_bot_databases_a_few_at_once_once_each_with_the_same_output(fleet, admin, monkeypatch):
    names = [fleet.name("fr") for _ in range(5)]
    for name in names:
        fleet.add(name, "--pool-size", "1", "--max-overflow", "0", "--no-migrate")
    # something for each command to say: drift on one bot's role, a loose env file on another
    admin.execute(sql.SQL("ALTER ROLE {} CONNECTION LIMIT 7").format(sql.Identifier(names[1].replace("-", "_") + "_user")))
    fleet.env_file(names[3]).chmod(0o644)
    ignore = other_fleets()

    for command in (["doctor", *ignore, "--json"], ["plan", *ignore, "--json"]):
        proc, watch = watched(fleet, names, *command)
        assert proc.returncode == (1 if command[0] == "doctor" else 0), proc.stderr
        per_db = collections.Counter({db: 0 for db in watch.bot_dbs})
        for (db, _user), n in watch.opened.items():
            if db in watch.bot_dbs:
                per_db[db] += n
        assert per_db == {db: 1 for db in watch.bot_dbs}, (command[0], watch.opened)  # one connection each
        as_bots = {db for (db, user) in watch.opened if db in watch.bot_dbs and user != watch.admin_user}
        # doctor: its login as each bot (they all succeed here) is the one connection; plan: the admin's
        assert as_bots == (watch.bot_dbs if command[0] == "doctor" else set()), watch.opened
        assert 2 <= watch.peak <= pool.MAX_JOBS
        parallel = json.loads(proc.stdout)

        # the same run, one bot database after another: the very same answer
        monkeypatch.setattr(pool, "MAX_JOBS", 1)
        serial = provision_in_process(command, fleet.env())
        monkeypatch.undo()
        assert serial.returncode == proc.returncode
        assert json.loads(serial.stdout) == parallel

        if command[0] == "doctor":  # the same report as with every read over the admin's connection
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(doctor, "_login_session", lambda url, made: lambda entry, observed: None)
                admin_only = provision_in_process(command, fleet.env())
            assert admin_only.returncode == proc.returncode and json.loads(admin_only.stdout) == parallel

        text = json.dumps(parallel)
        assert names[1] in text and "connection limit" in text and "7" in text  # the drift is reported
        if command[0] == "doctor":
            mode = [f for f in parallel["found"] if f["bot"] == names[3] and f["check"] == "env-file"]
            assert mode and "0644" in mode[0]["message"], parallel
        fleet.env_file(names[3]).chmod(0o644)


def test_doctor_reads_as_the_admin_what_the_bots_own_session_may_not_read(fleet, pg, admin):
    """A read inside the bot's database that fails in the bot's own session (here a version table
    the admin made, which the bot may not SELECT) is made again over the admin's connection: the
    bot's database is opened twice, and doctor reports what it reported before (the table's owner
    and the revision it holds)."""
    names = [fleet.name("fb") for _ in range(2)]
    for name in names:
        fleet.add(name, "--pool-size", "1", "--max-overflow", "0", "--no-migrate")
    odd, plain = names
    with pg.connect(odd.replace("-", "_") + "_db") as conn:  # as the admin, behind botfleet's back
        conn.execute("CREATE TABLE alembic_version (version_num varchar(32) NOT NULL PRIMARY KEY)")
        conn.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
    proc, watch = watched(fleet, names, "doctor", *other_fleets(), "--json")
    assert proc.returncode == 1, proc.stderr
    odd_db, plain_db = (n.replace("-", "_") + "_db" for n in names)
    assert {key: n for key, n in watch.opened.items() if key[0] == odd_db} == {
        (odd_db, odd.replace("-", "_") + "_user"): 1, (odd_db, watch.admin_user): 1}, watch.opened
    assert {key: n for key, n in watch.opened.items() if key[0] == plain_db} == {
        (plain_db, plain.replace("-", "_") + "_user"): 1}, watch.opened
    found = [f for f in json.loads(proc.stdout)["found"] if f["bot"] == odd]
    assert any(f["check"] == "ownership" and "table public.alembic_version" in f["message"]
               and f"owned by {watch.admin_user}" in f["message"] for f in found), found
    assert not any("cannot look inside" in f["message"] for f in found), found
    assert not [f for f in json.loads(proc.stdout)["found"] if f["bot"] == plain]

    # The very same report as doctor's reads over the admin's connection alone (as before issue 16).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(doctor, "_login_session", lambda url, made: lambda entry, observed: None)
        admin_only = provision_in_process(["doctor", *other_fleets(), "--json"], fleet.env())
    assert admin_only.returncode == 1 and json.loads(admin_only.stdout) == json.loads(proc.stdout)


@pytest.mark.parametrize("free, n, expected", [(400, 300, 8), (12, 300, 3), (2, 300, 1), (400, 1, 1), (400, 3, 3)])
def test_the_pool_takes_at_most_eight_and_a_quarter_of_the_free_slots(free, n, expected):
    class Conn:
        def execute(self, _query):
            return self

        def fetchone(self):
            return (free,)
    assert pool.jobs(Conn(), n) == expected
    assert pool.visit(range(n), lambda i: i * i, expected) == [i * i for i in range(n)]


def test_migrate_all_with_nothing_pending_reads_each_bot_once_and_forks_no_migrator(code_fleet, monkeypatch):
    from provisioning import migrate

    fleet = code_fleet
    names = [fleet.name("fm") for _ in range(3)]
    for name in names[:2]:
        fleet.add(name, "--pool-size", "1", "--max-overflow", "0", "--code", "chat-bot")
    fleet.add(names[2], "--pool-size", "1", "--max-overflow", "0", "--code", "chat-bot", "--no-migrate")
    head = migrate.head_of(migrate.script_directory(str(fleet.root), "chat_bot"), "chat_bot")
    migrated: list[list[str]] = []
    real = migrate.migrate_many
    monkeypatch.setattr(migrate, "migrate_many", lambda targets, *a, **k: (migrated.append([t.bot for t in targets]),
                                                                           real(targets, *a, **k))[1])
    for pending in (True, False):
        proc, watch = watched(fleet, names, "migrate", "--all", "--json")
        assert proc.returncode == 0, proc.stderr
        outcomes = {o["bot"]: o for o in json.loads(proc.stdout)}
        assert [outcomes[n]["status"] for n in names] == ["up to date", "up to date", "upgraded" if pending else "up to date"]
        assert all(outcomes[n]["to_rev"] == head for n in names)
        # the bots at head: one connection each, as the bot, and no migrator process for them
        assert all(watch.opened[(n.replace("-", "_") + "_db", n.replace("-", "_") + "_user")] == 1 for n in names[:2])
    assert migrated == [[names[2]]]  # only the pending bot reached the migrator; the second run none


def test_the_calling_thread_works_beside_the_pool_and_both_finish():
    """plan renders the stack while the pool visits the bot databases: ``meanwhile`` runs while
    a pool call is under way (a barrier both must reach: a run that did them one after the other
    would never get past it), the results keep their order, and an error of either is raised."""
    import sys

    met = threading.Barrier(2, timeout=30)  # a deadlock guard, not a timing
    interval = sys.getswitchinterval()

    def fn(i: int) -> int:
        if i == 3:
            met.wait()
        return i * i
    seen = []
    assert pool.visit_meanwhile(range(10), fn, 4, lambda: seen.append(met.wait())) == [i * i for i in range(10)]
    assert len(seen) == 1 and sys.getswitchinterval() == interval

    def boom(i: int) -> int:
        raise ValueError(f"item {i}")
    with pytest.raises(ValueError, match="item"):
        pool.visit_meanwhile(range(3), boom, 2, lambda: None)
    with pytest.raises(KeyError):
        pool.visit_meanwhile(range(3), fn, 2, lambda: {}["missing"])
    assert sys.getswitchinterval() == interval
