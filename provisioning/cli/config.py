"""`provision config set | unset | list`: a bot's own settings (BOT_TOKEN, ...) in its 0600 env file.

Values are never printed by set or unset, nor in progress; ``list`` masks them unless --show.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .common import JsonOpt, ProjectOpt, app, command, print_json, print_table, project_of, say

config_app = typer.Typer(
    help="A bot's own settings (BOT_TOKEN, ...), kept in its 0600 secrets/NAME.env, never in fleet.toml.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")

BotArg = Annotated[str, typer.Argument(help="The bot (a name in fleet.toml).", show_default=False)]


def _print_changed(result, verb: str) -> None:
    if result.changed:
        typer.secho(f"{result.bot}: {verb} {', '.join(result.changed)}", fg=typer.colors.GREEN, bold=True)
    else:
        typer.echo(f"{result.bot}: nothing to change")
    if result.unchanged:
        typer.echo(f"  {'unchanged' if verb == 'set' else 'not set'}: {', '.join(result.unchanged)}")
    typer.echo(f"  env file  {result.env_file}")
    if result.missing:
        typer.echo(f"  missing: {', '.join(result.missing)} (required by its code)")
    if result.changed:
        typer.echo(f"next: recreate the bot's container to read them: docker compose up -d --force-recreate {result.bot}")


@config_app.command("set")
@command
def config_set(
    bot: BotArg,
    pairs: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...", help="Settings to set; KEY is A-Z 0-9 _, "
                                               "VALUE one line (quote it for your shell).", show_default=False)],
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Set a bot's own settings in its env file secrets/NAME.env (0600, atomic).

    Never written to fleet.toml or a compose file, never printed.
    DATABASE_URL* and DB_POOL_* are botfleet's own (reserved). A value
    holding ', \\, a tab or a line break is refused. add-bot,
    rotate-password, apply, restore and render keep the settings.

    Example: provision config set hello-bot BOT_TOKEN=123456:ABC-DEF
    """
    from .. import commands
    from ..settings import parse_assignments

    values = parse_assignments(pairs)
    result = commands.config_set(project_of(project), bot, values, progress=say)
    if as_json:
        print_json(result.as_dict())
    else:
        _print_changed(result, "set")


@config_app.command("unset")
@command
def config_unset(
    bot: BotArg,
    keys: Annotated[list[str], typer.Argument(metavar="KEY...", help="Settings to remove.", show_default=False)],
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Remove settings from a bot's env file (a key that is not set is left alone).

    Example: provision config unset hello-bot BOT_TOKEN
    """
    from .. import commands

    result = commands.config_unset(project_of(project), bot, keys, progress=say)
    if as_json:
        print_json(result.as_dict())
    else:
        _print_changed(result, "unset")


@config_app.command("list")
@command
def config_list(
    bot: BotArg,
    show: Annotated[bool, typer.Option("--show", help="Print the values (masked by default).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """A bot's own settings (values masked unless --show).

    Also names the settings its code requires (REQUIRED_SETTINGS in
    bots/CODE/__init__.py) that are not set.

    Example: provision config list hello-bot --show
    """
    from .. import commands

    listing = commands.config_list(project_of(project), bot)
    if as_json:
        print_json(listing.as_dict(show=show))
        return
    shown = listing.as_dict(show=show)["settings"]
    if shown:
        print_table(("KEY", "VALUE"), [(k, v) for k, v in shown.items()])
    else:
        typer.echo(f"{bot}: no settings yet (provision config set {bot} KEY=VALUE)")
    if listing.missing:
        typer.secho(f"missing: {', '.join(listing.missing)} (required by {listing.code})", fg=typer.colors.YELLOW)
