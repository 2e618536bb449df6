"""hello-bot fed real aiogram updates (no network, no real token), on SQLite and on
PostgreSQL as the bot's own provisioned role."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys

import pytest
from aiogram import Bot
from aiogram.types import Chat, Message, Update
from aiogram.types import User as TgUser
from sqlalchemy import select

from bots.hello_bot.handlers import build_dispatcher
from bots.hello_bot.models import HelloBase, User
from shared import Database

from .conftest import REPO, assert_no_leak, provisioned_bot_env


@pytest.fixture(params=["sqlite", "postgresql"])
def db_env(request):
    if request.param == "sqlite":
        return {"DATABASE_URL": "sqlite+aiosqlite:///:memory:"}
    _name, env = provisioned_bot_env(request.getfixturevalue("scram_code_fleet"), "hello", "hello-bot")
    return env  # its schema came from migrations/hello_bot, run by add-bot as the bot's role


def update(n: int, text: str, user_id: int = 1001, is_bot: bool = False, **user: str) -> Update:
    sender = TgUser(id=user_id, is_bot=is_bot, first_name=user.get("first_name", "Ann"),
                    last_name=user.get("last_name"), username=user.get("username"), language_code="en")
    return Update(update_id=n, message=Message(
        message_id=n, date=dt.datetime.now(dt.timezone.utc), chat=Chat(id=user_id, type="private"),
        from_user=sender, text=text,
    ))


async def run(db_env, scenario):
    db = Database.from_env("hello-bot", env=db_env)
    if db.engine.dialect.name == "sqlite":  # in-memory SQLite; PostgreSQL was migrated by add-bot
        async with db.engine.begin() as conn:
            await conn.run_sync(HelloBase.metadata.create_all)
    bot = Bot("123456:TEST-TOKEN-NOT-REAL")
    try:
        return await scenario(db, build_dispatcher(db), bot)
    finally:
        await bot.session.close()
        await db.dispose()


def test_start_greets_by_display_name_and_stores_the_user(db_env):
    async def scenario(db, dp, bot):
        reply = await dp.feed_update(bot, update(1, "/start", first_name="Ann", last_name="Lee"))
        assert reply.text == "Hello, Ann Lee! Nice to meet you."
        reply = await dp.feed_update(bot, update(2, "/start", username="annlee"))
        assert reply.text.startswith("Hello, annlee!")
        async with db.sessionmaker() as s:
            users = (await s.scalars(select(User))).all()
        assert len(users) == 1
        u = users[0]
        assert (u.telegram_id, u.username, u.first_name, u.language_code, u.is_active) == (1001, "annlee", "Ann", "en", True)
        assert u.created_at is not None and u.updated_at >= u.created_at

    asyncio.run(run(db_env, scenario))


def test_every_update_upserts_and_other_text_gets_a_count(db_env):
    async def scenario(db, dp, bot):
        await dp.feed_update(bot, update(1, "hi", user_id=1))
        reply = await dp.feed_update(bot, update(2, "hello", user_id=2, first_name="Bob"))
        assert reply.text == "Bob, I know 2 users. Send /start."

    asyncio.run(run(db_env, scenario))


def test_racing_updates_from_a_new_user_create_one_row(db_env):
    async def scenario(db, dp, bot):
        await asyncio.gather(*(dp.feed_update(bot, update(i, "/start", user_id=77)) for i in range(10)))
        async with db.sessionmaker() as s:
            rows = (await s.scalars(select(User).where(User.telegram_id == 77))).all()
        assert len(rows) == 1

    asyncio.run(run(db_env, scenario))


def test_updates_without_a_human_sender_write_nothing(db_env):
    async def scenario(db, dp, bot):
        robot = update(1, "/start", user_id=9, is_bot=True)
        assert await dp.feed_update(bot, robot) is None
        async with db.sessionmaker() as s:
            assert (await s.scalars(select(User))).all() == []

    asyncio.run(run(db_env, scenario))


def test_display_name_fallbacks():
    assert User(telegram_id=5, first_name="John", last_name="Doe").display_name == "John Doe"
    assert User(telegram_id=5, username="jd", first_name="John").display_name == "jd"
    assert User(telegram_id=5).display_name == "User5"


def test_main_reads_its_token_through_the_shared_setting_and_never_prints_it(tmp_path):
    token = "123456:MAIN-TOKEN-NOT-REAL"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BOT_TOKEN", "DATABASE_URL"))}
    cmd = [sys.executable, "-m", "bots.hello_bot"]
    secret = tmp_path / "BOT_TOKEN"
    secret.write_text(token + "\n")
    runs = {
        "BOT_TOKEN is not set": {},
        "both BOT_TOKEN and BOT_TOKEN_FILE are set": {"BOT_TOKEN": token, "BOT_TOKEN_FILE": str(secret)},
        "BOT_TOKEN_FILE: cannot read": {"BOT_TOKEN_FILE": str(tmp_path / "missing")},
    }
    for words, extra in runs.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, **extra}, timeout=60, cwd=REPO)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert_no_leak(token, proc.stdout, proc.stderr)


def test_telegram_out_of_reach_at_start_is_waited_out_not_a_crash_loop(tmp_path):
    """The bot's container must stay up (and healthy: its database answers) while Telegram is out
    of reach: the real entry point against a Bot API address where nothing listens."""
    import socket
    import threading
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    env = {**os.environ, "BOT_TOKEN": "123456789:AAFakeTokenForTheOutageTest", "PYTHONPATH": str(REPO),
           "TELEGRAM_API_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "bots.hello_bot"], env=env, stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, cwd=REPO)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        # Two retries seen (however slow the machine is today), and the bot still up after them.
        deadline = time.monotonic() + 90
        while sum("Telegram is out of reach" in line for line in lines) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the bot exited while Telegram was out of reach:\n" + "".join(lines)
            time.sleep(0.2)
        assert proc.poll() is None, "the bot exited while Telegram was out of reach"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    err = "".join(lines)
    assert err.count("Telegram is out of reach") >= 2, err
    assert_no_leak("AAFakeTokenForTheOutageTest", err, where="the bot's log")
