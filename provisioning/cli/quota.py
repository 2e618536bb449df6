"""`provision quota status | enforce`: each bot's database size against its storage quota
(``--max-size`` / ``max_size``), and the enforcement the operator opts into (see quota.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import AdminUrlOpt, JsonOpt, ProjectOpt, app, command, print_json, print_table, project_of, say, servers_of, size

quota_app = typer.Typer(
    help="Storage quotas: each bot's database size against its max_size, and their enforcement.",
    no_args_is_help=True,
)
app.add_typer(quota_app, name="quota")

BotsOpt = Annotated[Optional[list[str]], typer.Argument(help="Bots (names in fleet.toml).", show_default="every bot")]


def _print(states) -> None:
    if not states:
        typer.echo("no bots yet: provision add-bot NAME")
        return
    from ..quota import growth_words

    print_table(("BOT", "DATABASE", "SIZE", "QUOTA", "USED", "STATE", "GROWTH"), [
        (s.bot, s.database, size(s.size_bytes), size(s.max_size_bytes) if s.max_size_bytes else "-",
         "-" if s.percent is None else f"{s.percent:.0f}%", s.state, growth_words(s) or "-")
        for s in states
    ])
    for s in states:
        if s.action == "suspended":
            typer.secho(f"{s.bot}: suspended: its role may not log in, {s.sessions_ended} session(s) ended "
                        "(provision quota enforce lifts it once it is under its quota)", fg=typer.colors.YELLOW)
        elif s.action == "lifted":
            typer.secho(f"{s.bot}: lifted: its role may log in again", fg=typer.colors.GREEN)


@quota_app.command("status")
@command
def status_cmd(
    bots: BotsOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Each bot's database size against its quota (max_size, else fleet.toml \\[defaults]). Reads only.

    Example: provision quota status --json
    """
    from .. import commands

    proj = project_of(project)
    states = commands.quota(proj, servers_of(proj, admin_url, read_only=True), bots or None)
    if as_json:
        print_json([s.as_dict() for s in states])
        return
    _print(states)


@quota_app.command("enforce")
@command
def enforce_cmd(
    bots: BotsOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
    admin_url: AdminUrlOpt = None,
) -> None:
    """Suspend each bot over its quota, lift each suspended bot that is under it again.

    A suspended bot's role may not log in (NOLOGIN) and its sessions are ended: a bot cannot undo that itself (it owns its database, not its role's attributes). botfleet records it on the server, so add-bot, apply and doctor --fix keep it. Its data is untouched. Idempotent: run it from cron.

    Example: provision quota enforce
    """
    from .. import commands

    proj = project_of(project)
    states = commands.quota(proj, servers_of(proj, admin_url), bots or None, enforce=True, progress=say)
    if as_json:
        print_json([s.as_dict() for s in states])
        return
    _print(states)
