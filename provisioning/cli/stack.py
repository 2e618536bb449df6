"""`provision` commands for the compose stack: render, budget."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .cli import JsonOpt, ProjectOpt, _project, _say, app, command, print_table

MemoryOpt = Annotated[Optional[str], typer.Option("--postgres-memory", help="Memory limit of the postgres container "
                                                  "(512M, 1G); its tuning derives from it.", show_default="512M")]
MaxConnOpt = Annotated[Optional[int], typer.Option("--max-connections", help="PostgreSQL max_connections "
                                                   "(0: as many as the memory affords).", show_default="0")]
BotMemoryOpt = Annotated[Optional[str], typer.Option("--bot-memory", help="Memory limit of each bot container.",
                                                     show_default="128M")]
MajorOpt = Annotated[Optional[int], typer.Option("--postgres-major", help="Major version of the official postgres image.",
                                                 show_default="17")]
PublishOpt = Annotated[Optional[str], typer.Option("--publish", help="ADDRESS:PORT on the host where the admin reaches "
                                                   "postgres ('' = not published).", show_default="127.0.0.1:5432")]
PgbouncerOpt = Annotated[Optional[bool], typer.Option("--pgbouncer/--no-pgbouncer", help="Put PgBouncer (transaction "
                                                      "pooling) between the bots and postgres.", show_default="off")]
PoolOpt = Annotated[Optional[int], typer.Option("--pgbouncer-pool-size", help="Server connections PgBouncer keeps per bot.",
                                                show_default="2")]
ImageOpt = Annotated[Optional[str], typer.Option("--bot-image", help="Image the bots and migrate run (built from the "
                                                 "Dockerfile).", show_default="botfleet-bot:latest")]


def _settings(server, **changes):
    """A copy of the registry's [server] with the options given (None = keep)."""
    import dataclasses

    from .budget import canonical_memory

    changes = {k: v for k, v in changes.items() if v is not None}
    for key in ("postgres_memory", "bot_memory"):
        if key in changes:
            changes[key] = canonical_memory(changes[key], "--" + key.replace("_", "-"))
    new = dataclasses.replace(server, **changes)
    if "pgbouncer" in changes and changes["pgbouncer"] != server.pgbouncer:
        # Bots reach the database through PgBouncer when it is on (their env files follow on add-bot).
        fro, to = (("postgres", 5432), ("pgbouncer", 6432)) if new.pgbouncer else (("pgbouncer", 6432), ("postgres", 5432))
        if (new.bot_host, new.bot_port) == fro:
            new = dataclasses.replace(new, bot_host=to[0], bot_port=to[1])
    return new


def _print_budget(b) -> None:
    t = b.tuning
    how = "derived from the memory" if t.max_connections_derived else "set in fleet.toml"
    mode = "through PgBouncer (transaction pooling)" if b.pgbouncer else "direct (no PgBouncer)"
    if t.memory_mb:
        typer.echo(f"postgres {t.memory_mb}MB, max_connections {t.max_connections} ({how}); bots connect {mode}")
    else:
        typer.echo(f"max_connections {t.max_connections} ({how}); bots connect directly")
    typer.echo("")
    if b.bots:
        print_table(("BOT", "POOL", "REPLICAS", "CLIENTS", "SERVER SHARE"), [
            (s.name, s.pool, str(s.replicas), str(s.client_connections), str(s.share)) for s in b.bots
        ])
        typer.echo("")
    share = "PgBouncer's cap per bot + 1 for migrations" if b.pgbouncer else "pool max x replicas + 1 for migrations: the roles' CONNECTION LIMITs"
    rows = [
        ("reserve", f"{b.reserve} (superuser_reserved_connections {t.superuser_reserved_connections} + provisioner 2)"),
        ("bots", f"{b.total} ({share})"),
        ("total", f"{b.reserve + b.total} of max_connections {t.max_connections}"),
        ("headroom", str(b.headroom)),
    ]
    if t.memory_mb:
        rows.append(("memory", f"{t.memory_estimate_mb}MB of {t.memory_mb}MB: shared_buffers {t.shared_buffers_mb}MB + "
                               f"other fixed {t.fixed_mb - t.shared_buffers_mb}MB + {t.max_connections} connections x "
                               f"{t.per_connection_mb}MB (work_mem {t.work_mem_mb}MB + backend)"))
    else:
        rows.append(("memory", "not botfleet's to budget (a server it does not run)"))
    for label, value in rows:
        typer.echo(f"{label:<10}{value}")
    typer.secho("fits" if b.fits else "does NOT fit", fg=typer.colors.GREEN if b.fits else typer.colors.RED, bold=True)


@app.command("budget")
@command
def budget_cmd(
    postgres_memory: MemoryOpt = None,
    max_connections: MaxConnOpt = None,
    pgbouncer: PgbouncerOpt = None,
    pgbouncer_pool_size: PoolOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """The shared PostgreSQL's connection and memory budget: max_connections, the reserve, each bot's share, the sum and the headroom, and the memory estimate against the container limit.

    Options preview a change without saving it. Exit code 2 when the fleet does not fit.
    A fleet with several servers gets one budget per server.

    Example: provision budget --postgres-memory 1G
    """
    from .budget import BudgetExceeded, explain, server_budget
    from .db import describe
    from .fleet import Project

    fleet = Project(_project(project)).registry.load()
    fleet.server = _settings(fleet.server, postgres_memory=postgres_memory, max_connections=max_connections,
                             pgbouncer=pgbouncer, pgbouncer_pool_size=pgbouncer_pool_size)
    budgets = {name: server_budget(fleet, name) for name in fleet.server_names()}
    if as_json:
        data = (budgets["default"].as_dict() if not fleet.servers
                else {"servers": {name: b.as_dict() for name, b in budgets.items()}})
        typer.echo(json.dumps(data, indent=2))
    else:
        for i, (name, b) in enumerate(budgets.items()):
            if fleet.servers:
                typer.secho(("\n" if i else "") + f"== server {name}" + (" (the compose stack's postgres)"
                            if name == "default" else f" ({describe(fleet.servers[name].admin_url)})"), bold=True)
            _print_budget(b)
    over = [explain(b, f"server {name}" if fleet.servers else "the fleet") for name, b in budgets.items() if not b.fits]
    if over:
        raise BudgetExceeded("; ".join(over))


@app.command("render")
@command
def render_cmd(
    postgres_memory: MemoryOpt = None,
    max_connections: MaxConnOpt = None,
    bot_memory: BotMemoryOpt = None,
    postgres_major: MajorOpt = None,
    publish: PublishOpt = None,
    pgbouncer: PgbouncerOpt = None,
    pgbouncer_pool_size: PoolOpt = None,
    bot_image: ImageOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Write the compose stack from fleet.toml: compose.yaml (docker compose), compose.stack.yaml (docker stack deploy), deploy/postgresql.conf, and the secret files they mount.

    Validated (Compose Specification schema and semantic checks) before anything is written; options are remembered in fleet.toml. Refuses when the fleet does not fit the connection or memory budget. Once a project has a stack, add-bot and remove-bot re-render it. Needs no server.

    Example: provision render --postgres-memory 1G --pgbouncer
    """
    from . import budget as budgets
    from .compose import render
    from .fleet import Project

    proj = Project(_project(project))
    registry = proj.registry
    current = registry.load()
    new = _settings(current.server, postgres_memory=postgres_memory, max_connections=max_connections,
                    bot_memory=bot_memory, postgres_major=postgres_major, publish=publish, pgbouncer=pgbouncer,
                    pgbouncer_pool_size=pgbouncer_pool_size, bot_image=bot_image)
    budgets.validate_server(new)
    current.server = new
    budgets.check(budgets.compute(current), "the fleet")  # refuse before saving anything
    if new != registry.load().server:
        with registry.editing() as fleet:
            fleet.server = new
        _say(f"saved the stack settings in {registry.path}")
    result = render(proj.root)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
        return
    for rel in result.written:
        typer.echo(f"  wrote      {rel}")
    for rel in result.removed:
        typer.echo(f"  removed    {rel}")
    if result.unchanged:
        typer.echo(f"  unchanged  {len(result.unchanged)} file(s)")
    for note in result.skipped:
        typer.echo(f"  not in the stack: {note}")
    b = result.budget
    typer.secho(f"stack: {len(result.bots)} bot(s); connections {b['reserve'] + b['total']} of {b['max_connections']} "
                f"(headroom {b['headroom']}); memory {b['memory']['estimate_mb']}MB of {b['memory']['limit_mb']}MB",
                fg=typer.colors.GREEN, bold=True)
