"""The shared data layer: settings from the environment, engines, units of work,
health checks, on in-memory SQLite and on PostgreSQL as a provisioned bot's own role."""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import threading
import time
from datetime import datetime

import psycopg
import pytest
from sqlalchemy import ForeignKey, String, func, select, text
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column
from sqlalchemy.pool import StaticPool

from shared import NAMING_CONVENTION, Base, ConfigError, Database, DatabaseSettings, TimestampMixin, setting

from .conftest import assert_no_leak


class NoteBase(Base):
    __abstract__ = True


class Note(NoteBase, TimestampMixin):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(200))


class Tag(NoteBase):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    note_id: Mapped[int] = mapped_column(ForeignKey("notes.id", ondelete="CASCADE"), index=True)


SECRET = "pa55-word-never-shown"


# -- models -------------------------------------------------------------------
def test_each_bots_base_has_its_own_registry_and_metadata():
    from bots.chat_bot import models as chat
    from bots.feishu_bot import models as feishu
    from bots.hello_bot import models as hello

    bases = (chat.ChatBase, feishu.FeishuBase, hello.HelloBase, NoteBase)
    assert len({id(b.registry) for b in bases}) == len({id(b.metadata) for b in bases}) == len(bases)
    for module, base in ((chat, chat.ChatBase), (feishu, feishu.FeishuBase), (hello, hello.HelloBase)):
        assert module.metadata is base.metadata and base.registry.metadata is base.metadata
        assert module.metadata.naming_convention == NAMING_CONVENTION
    assert set(NoteBase.metadata.tables) == {"notes", "tags"}
    assert not hasattr(Base, "metadata")  # no shared schema for a table to land in by mistake
    # chat-bot and feishu-bot both have a Message: chat-bot's relationship strings still resolve.
    configure_mappers()
    assert chat.Conversation.messages.property.mapper.class_ is chat.Message


def test_the_package_names_load_when_first_used():
    import shared

    assert sorted(shared.__all__) == sorted(shared._WHERE)
    for name in shared.__all__:
        assert getattr(shared, name) is getattr(importlib.import_module(f"shared.{shared._WHERE[name]}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        shared.nope  # noqa: B018


def test_a_table_needs_a_bots_abstract_base():
    with pytest.raises(TypeError, match="__abstract__"):
        class Stray(Base):
            __tablename__ = "stray"
            id: Mapped[int] = mapped_column(primary_key=True)


# -- settings -----------------------------------------------------------------
def test_defaults_to_a_local_sqlite_file_with_fleet_pool_defaults():
    s = DatabaseSettings.from_env("hello-bot", env={})
    assert s.url.render_as_string() == "sqlite+aiosqlite:///./hello-bot.sqlite"
    assert (s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle) == (2, 3, 30, 3600)


def test_plain_postgres_urls_get_the_async_driver_and_pool_vars_are_read():
    s = DatabaseSettings.from_env(env={"DATABASE_URL": f"postgresql://u:{SECRET}@db:5432/x", "DB_POOL_SIZE": "4",
                                       "DB_MAX_OVERFLOW": "0", "DB_POOL_TIMEOUT": "5", "DB_POOL_RECYCLE": "60"})
    assert s.url.drivername == "postgresql+asyncpg"
    assert (s.pool_size, s.max_overflow, s.pool_timeout, s.pool_recycle) == (4, 0, 5, 60)
    assert_no_leak(SECRET, s.safe_url, repr(s.safe_url))


def test_database_url_file_docker_secret(tmp_path):
    secret = tmp_path / "url"
    secret.write_text(f"postgresql+asyncpg://u:{SECRET}@db/x\n")
    s = DatabaseSettings.from_env(env={"DATABASE_URL_FILE": str(secret)})
    assert s.source == "DATABASE_URL_FILE" and s.url.host == "db"


@pytest.mark.parametrize(
    "env, names",
    [
        ({"DATABASE_URL": f"not a url {SECRET}"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"mysql://u:{SECRET}@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "sqlite+aiosqlite://", "DATABASE_URL_FILE": "/x"}, "DATABASE_URL_FILE"),
        ({"DATABASE_URL_FILE": "/nonexistent/url"}, "DATABASE_URL_FILE"),
        ({"DB_POOL_SIZE": "two"}, "DB_POOL_SIZE"),
        ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
        ({"DB_MAX_OVERFLOW": "-1"}, "DB_MAX_OVERFLOW"),
    ],
)
def test_bad_configuration_names_the_variable_and_hides_the_password(env, names):
    with pytest.raises(ConfigError) as err:
        DatabaseSettings.from_env(env=env)
    assert names in str(err.value)
    assert_no_leak(SECRET, str(err.value))


# -- a bot's own settings: NAME or NAME_FILE ------------------------------------
def test_setting_from_the_environment_or_a_file(tmp_path):
    assert setting("BOT_TOKEN", env={"BOT_TOKEN": SECRET}) == SECRET
    secret = tmp_path / "BOT_TOKEN"
    secret.write_text(f"{SECRET}\n")  # a Docker secret: one trailing newline is dropped
    assert setting("BOT_TOKEN", env={"BOT_TOKEN_FILE": str(secret)}) == SECRET
    secret.write_text(f" {SECRET} \n\n")  # only one newline, and nothing else
    assert setting("BOT_TOKEN", env={"BOT_TOKEN_FILE": str(secret)}) == f" {SECRET} \n"
    secret.write_text(SECRET)
    assert setting("BOT_TOKEN", env={"BOT_TOKEN_FILE": str(secret)}) == SECRET
    # an empty variable is an unset one (a compose file's `BOT_TOKEN=` is no token)
    assert setting("BOT_TOKEN", env={"BOT_TOKEN": "", "BOT_TOKEN_FILE": str(secret)}) == SECRET


def test_setting_missing_gives_the_default_or_a_named_error(monkeypatch):
    assert setting("BOT_TOKEN", env={}) is None
    assert setting("BOT_TOKEN", env={"BOT_TOKEN": ""}, default="d") == "d"
    assert setting("OTHER", env={"BOT_TOKEN": SECRET}, default="d") == "d"
    with pytest.raises(ConfigError, match="BOT_TOKEN is not set") as err:
        setting("BOT_TOKEN", env={}, required=True)
    assert "BOT_TOKEN_FILE" in str(err.value)
    monkeypatch.setenv("BOTFLEET_TEST_SETTING", SECRET)
    assert setting("BOTFLEET_TEST_SETTING") == SECRET  # os.environ by default


def test_setting_refuses_both_and_an_unreadable_file_without_showing_the_value(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(SECRET)
    empty = tmp_path / "empty"
    empty.write_text("")
    not_utf8 = tmp_path / "latin1"
    not_utf8.write_bytes(b"\xff" + SECRET.encode())
    cases = [
        ({"BOT_TOKEN": SECRET, "BOT_TOKEN_FILE": str(secret)}, "both BOT_TOKEN and BOT_TOKEN_FILE are set"),
        ({"BOT_TOKEN_FILE": str(tmp_path / "missing")}, "BOT_TOKEN_FILE: cannot read"),
        ({"BOT_TOKEN_FILE": str(tmp_path)}, "BOT_TOKEN_FILE: cannot read"),  # a folder
        ({"BOT_TOKEN_FILE": str(not_utf8)}, "is not UTF-8 text"),
        ({"BOT_TOKEN_FILE": str(empty)}, "BOT_TOKEN is not set"),  # required: an empty file is no value
    ]
    if os.geteuid() != 0:  # root reads any file
        unreadable = tmp_path / "unreadable"
        unreadable.write_text(SECRET)
        unreadable.chmod(0)
        cases.append(({"BOT_TOKEN_FILE": str(unreadable)}, "Permission denied"))
    for env, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            setting("BOT_TOKEN", env=env, required=True)
        assert len(str(err.value).splitlines()) == 1
        assert_no_leak(SECRET, str(err.value))


def test_missing_driver_is_a_clear_start_up_error(tmp_path):
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "from shared import Database, ConfigError\n"
        "try:\n"
        f"    Database.from_env(env={{'DATABASE_URL': 'postgresql+asyncpg://u:{SECRET}@h/db'}})\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "DATABASE_URL" in out and "not installed" in out and "asyncpg" in out
    assert_no_leak(SECRET, out)


def test_pool_arguments_only_where_the_driver_takes_them():
    pg = Database.from_env(env={"DATABASE_URL": "postgresql+asyncpg://u@h/db"})
    assert pg.engine.pool.size() == 2 and pg.engine.pool._max_overflow == 3 and pg.engine.pool._pre_ping
    mem = Database.from_env(env={"DATABASE_URL": "sqlite+aiosqlite:///:memory:"})
    assert isinstance(mem.engine.pool, StaticPool)


# -- behaviour on both databases ----------------------------------------------
async def _exercise(db: Database) -> None:
    async with db.engine.begin() as conn:  # tests only: production schemas come from migrations
        await conn.run_sync(NoteBase.metadata.create_all)
    async with db.unit_of_work() as session:
        session.add(Note(body="kept"))
    with pytest.raises(RuntimeError):
        async with db.unit_of_work() as session:
            session.add(Note(body="rolled back"))
            await session.flush()
            raise RuntimeError("boom")
    async with db.sessionmaker() as session:
        notes = (await session.scalars(select(Note))).all()
        assert [n.body for n in notes] == ["kept"]
        assert isinstance(notes[0].created_at, datetime) and notes[0].updated_at is not None
        assert (await session.scalar(select(func.count()).select_from(Tag))) == 0

    # FastAPI dependency and aiogram middleware: one unit of work each.
    dep = db.session_dependency()
    session = await dep.__anext__()
    session.add(Note(body="from a request"))
    with pytest.raises(StopAsyncIteration):
        await dep.__anext__()

    async def handler(event, data):
        data["session"].add(Note(body=f"from update {event}"))
        return "handled"

    assert await db.middleware()(handler, 42, {}) == "handled"
    async with db.sessionmaker() as session:
        bodies = sorted((await session.scalars(select(Note.body))).all())
    assert bodies == ["from a request", "from update 42", "kept"]
    assert await db.healthcheck() is True
    await db.dispose()


def test_sqlite_in_memory():
    asyncio.run(_exercise(Database.from_env(env={"DATABASE_URL": "sqlite+aiosqlite:///:memory:"})))


@pytest.fixture
def bot_env(scram_fleet):
    """A provisioned bot's own env file, pointed at the test cluster over TCP (SCRAM)."""
    name = scram_fleet.name("shared")
    port = str(scram_fleet.server.embedded.status().port)
    scram_fleet.add(name, "--db-host", "127.0.0.1", "--db-port", port, "--pool-size", "1", "--max-overflow", "1")
    from provisioning.envfile import EnvFile

    return name, EnvFile.read(scram_fleet.env_file(name)).values


def test_postgresql_as_the_bots_own_role(bot_env):
    name, env = bot_env
    db = Database.from_env(name, env=env)
    assert db.settings.pool_size == 1 and db.settings.max_overflow == 1

    async def owner_check():
        await _exercise(db)
        check = Database.from_env(name, env=env)
        async with check.engine.connect() as conn:
            owner = (await conn.exec_driver_sql("SELECT tableowner FROM pg_tables WHERE tablename = 'notes'")).scalar_one()
            app = (await conn.exec_driver_sql("SELECT current_setting('application_name')")).scalar_one()
        await check.dispose()
        return owner, app

    owner, app = asyncio.run(owner_check())
    assert owner == name.replace("-", "_") + "_user" and app == name


def test_pool_never_opens_more_than_its_maximum(bot_env):
    name, env = bot_env
    db = Database.from_env(name, env={**env, "DB_POOL_TIMEOUT": "1"})

    async def hold_three():
        held = [await db.engine.connect() for _ in range(2)]  # pool 1 + overflow 1
        try:
            with pytest.raises(PoolTimeout):
                await db.engine.connect()
        finally:
            for conn in held:
                await conn.close()
            await db.dispose()

    asyncio.run(hold_three())


def test_healthcheck_reports_an_unreachable_server_without_raising():
    db = Database.from_env(env={"DATABASE_URL": f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/db"})
    assert asyncio.run(db.healthcheck(timeout=3)) is False


def test_health_module_for_container_healthchecks(bot_env):
    name, env = bot_env
    run_env = {**os.environ, **env}
    ok = subprocess.run([sys.executable, "-m", "shared.health", name], capture_output=True, text=True, env=run_env)
    assert ok.returncode == 0 and "database ok" in ok.stdout
    password = env["DATABASE_URL"].split(":")[2].split("@")[0]
    assert_no_leak(password, ok.stdout, ok.stderr)
    bad = subprocess.run([sys.executable, "-m", "shared.health", name], capture_output=True, text=True,
                         env={**run_env, "DATABASE_URL": "mysql://x"})
    assert bad.returncode == 2 and "DATABASE_URL" in bad.stderr


def _health(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The container's health check as compose runs it, reporting whether it loaded SQLAlchemy."""
    script = ("import sys; from shared import health; code = health.main(sys.argv[1:]); "
              "print('sqlalchemy loaded' if 'sqlalchemy' in sys.modules else 'no sqlalchemy'); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, env=env, timeout=60)


def test_the_health_check_reads_the_bots_heartbeat_and_needs_no_login_of_its_own(bot_env, tmp_path):
    """In a container the health check reads the heartbeat the bot keeps through its pool: it holds
    no SQLAlchemy in the container's memory and opens no connection, so a bot whose role is at its
    CONNECTION LIMIT is still healthy (a check with a login of its own is refused then)."""
    name, env = bot_env
    beat = tmp_path / "botfleet-health"
    run_env = {**os.environ, **env, "BOTFLEET_HEALTH_FILE": str(beat)}
    direct_env = {k: v for k, v in run_env.items() if k != "BOTFLEET_HEALTH_FILE"}
    db = Database.from_env(name, env=env)

    async def scenario() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess, str]:
        async with db.heartbeat(beat, every=0.1):
            for _ in range(100):
                if beat.exists():
                    break
                await asyncio.sleep(0.05)
            held = _hold_role_slots(env, 2)  # with the pool's one connection: the role's limit of 3
            try:
                via_heartbeat = await asyncio.to_thread(_health, name, run_env)
                direct = await asyncio.to_thread(_health, name, direct_env)
            finally:
                for conn in held:
                    conn.close()
            recorded = beat.read_text()
        await db.dispose()
        return via_heartbeat, direct, recorded

    via_heartbeat, direct, recorded = asyncio.run(scenario())
    assert recorded == "ok\n"
    assert via_heartbeat.returncode == 0, via_heartbeat.stdout + via_heartbeat.stderr
    assert "database ok" in via_heartbeat.stdout and "through the bot's pool" in via_heartbeat.stdout
    assert "no sqlalchemy" in via_heartbeat.stdout
    assert direct.returncode == 1 and "database unreachable" in direct.stdout  # refused: too many connections
    assert not beat.exists()  # the block ended: the file went with it (a later check makes its own)
    password = env["DATABASE_URL"].split(":")[2].split("@")[0]
    assert_no_leak(password, via_heartbeat.stdout, via_heartbeat.stderr, direct.stdout, direct.stderr)


def test_a_stale_or_failed_heartbeat_is_unhealthy_and_a_missing_one_means_a_check_of_its_own(tmp_path):
    beat = tmp_path / "botfleet-health"
    env = {**os.environ, "BOTFLEET_HEALTH_FILE": str(beat), "DATABASE_URL": "sqlite+aiosqlite:///:memory:"}
    missing = _health("b", env)
    assert missing.returncode == 0 and "database ok (sqlite" in missing.stdout, missing.stdout + missing.stderr
    beat.write_text("ok\n")
    assert _health("b", env).returncode == 0
    old = time.time() - 120
    os.utime(beat, (old, old))
    stale = _health("b", env)
    assert stale.returncode == 1 and "b: no heartbeat for 12" in stale.stdout, stale.stdout
    beat.write_text("unreachable\n")
    failed = _health("b", env)
    assert failed.returncode == 1 and "database unreachable at the bot's last check" in failed.stdout
    assert "no sqlalchemy" in failed.stdout


def test_the_heartbeat_records_an_unreachable_database_and_outlives_an_unwritable_file(tmp_path, monkeypatch, caplog):
    db = Database.from_env(env={"DATABASE_URL": f"postgresql+asyncpg://u:{SECRET}@127.0.0.1:1/db"})
    beat = tmp_path / "botfleet-health"
    unwritable = tmp_path / "no-such-folder" / "botfleet-health"
    monkeypatch.delenv("BOTFLEET_HEALTH_FILE", raising=False)

    async def scenario() -> tuple[str, list[str]]:
        async with db.heartbeat(beat, every=0.05):
            for _ in range(100):
                if beat.exists():
                    break
                await asyncio.sleep(0.05)
            recorded = beat.read_text()
        async with db.heartbeat(unwritable, every=0.05):
            await asyncio.sleep(0.3)  # the block runs on; only the heartbeat stops
        async with db.heartbeat(every=0.05):  # neither a path nor BOTFLEET_HEALTH_FILE: nothing kept
            await asyncio.sleep(0.2)
        await db.dispose()
        return recorded, sorted(p.name for p in tmp_path.iterdir())

    with caplog.at_level("WARNING", logger="shared.database"):
        recorded, left = asyncio.run(scenario())
    assert recorded == "unreachable\n" and left == []
    assert "database unreachable (heartbeat)" in caplog.text
    assert f"heartbeat stopped: cannot write {unwritable}" in caplog.text
    assert SECRET not in caplog.text


def _hold_role_slots(env: dict[str, str], count: int) -> list[psycopg.Connection]:
    """``count`` sessions of the bot's own role, opened outside its pool (its URL, as psycopg takes it)."""
    url = env["DATABASE_URL"].replace("postgresql+asyncpg://", "postgresql://")
    return [psycopg.connect(url, connect_timeout=10) for _ in range(count)]


def test_a_new_connection_refused_by_a_full_server_for_a_moment_is_tried_again(bot_env):
    """A connection storm holds slots until PostgreSQL refuses it (SQLSTATE 53300): the data layer
    waits a moment and tries again instead of failing the bot's request."""
    name, env = bot_env
    held = _hold_role_slots(env, 3)  # its role's CONNECTION LIMIT (pool 1+1, + 1 for migrations): full
    db = Database.from_env(name, env=env)
    released = threading.Event()

    def release_one() -> None:
        held.pop().close()
        released.set()

    async def unit_of_work() -> int:
        timer = threading.Timer(0.3, release_one)
        timer.start()
        try:
            async with db.unit_of_work() as session:
                return (await session.execute(text("SELECT 1"))).scalar_one()
        finally:
            timer.join()
            await db.dispose()

    try:
        assert asyncio.run(unit_of_work()) == 1 and released.is_set()
    finally:
        for conn in held:
            conn.close()


def test_a_server_that_stays_full_is_an_error_after_the_retries_and_others_are_not_retried(bot_env):
    from shared.database import _sqlstate

    name, env = bot_env
    held = _hold_role_slots(env, 3)
    db = Database.from_env(name, env=env)
    wrong = Database.from_env(name, env={**env, "DATABASE_URL": env["DATABASE_URL"].replace("@", "x@", 1)})

    async def attempt(database: Database) -> BaseException:
        try:
            async with database.engine.connect():
                pass
        except Exception as err:  # noqa: BLE001 - what the bot would see
            return err
        finally:
            await database.dispose()
        raise AssertionError("connected to a full server")

    try:
        err = asyncio.run(attempt(db))
        assert _sqlstate(err) == "53300" and "too many connections" in str(err)
    finally:
        for conn in held:
            conn.close()
    err = asyncio.run(attempt(wrong))
    assert _sqlstate(err) == "28P01"  # a wrong password is not retried: raised at once
