"""`provision` commands for the compose stack: render, budget."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import JsonOpt, ProjectOpt, app, command, print_json, print_table, project_of, say

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
ExporterOpt = Annotated[Optional[bool], typer.Option("--exporter/--no-exporter", help="Run provision metrics as a "
                                                     "service of the stack (Prometheus text at :9187/metrics), as "
                                                     "its own monitoring role.", show_default="off")]
ExporterPublishOpt = Annotated[Optional[str], typer.Option("--exporter-publish", metavar="ADDRESS:PORT",
                                                           help="Where the host reaches the exporter ('' = the "
                                                           "stack's networks only).", show_default="127.0.0.1:9187")]
ArchiveOpt = Annotated[Optional[bool], typer.Option("--archive/--no-archive", help="Add an archive service (Barman): "
                                                   "WAL streamed to its own volume, base backups every [backup] "
                                                   "base_every, retention from [backup], as its own replication role.",
                                                   show_default="off")]
PoolOpt = Annotated[Optional[int], typer.Option("--pgbouncer-pool-size", help="Server connections PgBouncer keeps per bot.",
                                                show_default="1")]
ActiveOpt = Annotated[Optional[int], typer.Option("--active-percent", help="Percent of the connections the memory "
                                                  "budget assumes run a query (sort/hash: work_mem) at once.",
                                                  show_default="10")]
HeadroomOpt = Annotated[Optional[int], typer.Option("--headroom-percent", help="Percent of the postgres memory the "
                                                    "budget keeps free.", show_default="10")]
ImageOpt = Annotated[Optional[str], typer.Option("--bot-image", help="Image the bots and migrate run (built from the "
                                                 "Dockerfile).", show_default="botfleet-bot:latest")]


def _print_budget(b) -> None:
    from ..budget import memory_terms

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
    share = ("PgBouncer's server pool per bot" if b.pgbouncer
             else "pool max x replicas + 1 for migrations: the roles' CONNECTION LIMITs")
    migrations = f" + migrations {b.migration_reserve}" if b.migration_reserve else ""
    migrations += f" + exporter {b.exporter_connections}" if b.exporter_connections else ""
    migrations += f" + archive {b.archive_connections}" if b.archive_connections else ""
    rows = [
        ("reserve", f"{b.reserve} (superuser_reserved_connections {t.superuser_reserved_connections} + provisioner 2"
                    f"{migrations})"),
        ("bots", f"{b.total} ({share})"),
        ("total", f"{b.reserve + b.total} of max_connections {t.max_connections}"),
        ("headroom", str(b.headroom)),
    ]
    if t.memory_mb:
        rows.append(("memory", f"{t.memory_estimate_mb}MB of {t.memory_mb}MB: {memory_terms(t)}"))
        rows.append(("bot memory", f"{b.bots_memory_mb}MB of container memory limits besides postgres's "
                             f"(host total {b.bots_memory_mb + t.memory_mb}MB)"))
    else:
        rows.append(("memory", "not botfleet's to budget (a server it does not run)"))
    for label, value in rows:
        typer.echo(f"{label:<11}{value}")
    typer.secho("fits" if b.fits else "does NOT fit", fg=typer.colors.GREEN if b.fits else typer.colors.RED, bold=True)


@app.command("budget")
@command
def budget_cmd(
    postgres_memory: MemoryOpt = None,
    max_connections: MaxConnOpt = None,
    pgbouncer: PgbouncerOpt = None,
    pgbouncer_pool_size: PoolOpt = None,
    active_percent: ActiveOpt = None,
    headroom_percent: HeadroomOpt = None,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """The shared PostgreSQL's connection and memory budget: max_connections, the reserve, each bot's share, the sum and the headroom, and the memory estimate against the container limit.

    Options preview a change without saving it. Exit code 2 when the fleet does not fit, with the ways out (the smallest --postgres-memory at which it fits, among them).
    A fleet with several servers gets one budget per server.

    Example: provision budget --postgres-memory 1G
    """
    from .. import commands
    from ..budget import BudgetExceeded, explain
    from ..db import describe

    proj = project_of(project)
    budgets = commands.budget(proj, postgres_memory=postgres_memory, max_connections=max_connections,
                              pgbouncer=pgbouncer, pgbouncer_pool_size=pgbouncer_pool_size,
                              active_percent=active_percent, headroom_percent=headroom_percent)
    many = bool(proj.fleet.servers)
    if as_json:
        print_json(budgets["default"].as_dict() if not many else {"servers": {n: b.as_dict() for n, b in budgets.items()}})
    else:
        for i, (name, b) in enumerate(budgets.items()):
            if many:
                typer.secho(("\n" if i else "") + f"== server {name}" + (" (the compose stack's postgres)"
                            if name == "default" else f" ({describe(proj.fleet.servers[name].admin_url)})"), bold=True)
            _print_budget(b)
    over = [explain(b, f"server {name}" if many else "the fleet") for name, b in budgets.items() if not b.fits]
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
    active_percent: ActiveOpt = None,
    headroom_percent: HeadroomOpt = None,
    bot_image: ImageOpt = None,
    exporter: ExporterOpt = None,
    exporter_publish: ExporterPublishOpt = None,
    archive: ArchiveOpt = None,
    allow_missing_config: Annotated[bool, typer.Option("--allow-missing-config", help="Render even when a bot lacks a "
                                                       "setting its code requires (it would crash-loop on start).")] = False,
    as_json: JsonOpt = False,
    project: ProjectOpt = None,  # type: ignore[assignment]
) -> None:
    """Write the compose stack from fleet.toml: compose.yaml (docker compose), compose.stack.yaml (docker stack deploy), deploy/postgresql.conf, and the secret files they mount.

    Validated (Compose Specification schema and semantic checks) before anything is written; options are remembered in fleet.toml. Refuses when the fleet does not fit the connection or memory budget; a refused render changes nothing (the new options are saved only once the whole stack is checked with them). Once a project has a stack, add-bot and remove-bot re-render it. Needs no server.

    Example: provision render --postgres-memory 1G --pgbouncer --exporter --archive
    """
    from .. import commands

    result = commands.render(project_of(project), allow_missing_config=allow_missing_config, progress=say,
                             postgres_memory=postgres_memory,
                             max_connections=max_connections, bot_memory=bot_memory, postgres_major=postgres_major,
                             publish=publish, pgbouncer=pgbouncer, pgbouncer_pool_size=pgbouncer_pool_size,
                             active_percent=active_percent, headroom_percent=headroom_percent, bot_image=bot_image,
                             exporter=exporter, exporter_publish=exporter_publish, archive=archive)
    if as_json:
        print_json(result.as_dict())
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
                f"(headroom {b['headroom']}); memory {b['memory']['estimate_mb']}MB of {b['memory']['limit_mb']}MB, "
                f"bots {b['memory']['bots_mb']}MB",
                fg=typer.colors.GREEN, bold=True)
