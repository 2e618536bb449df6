"""The rendered stack's files (``StackFiles``), and their validation without a Docker engine.

1. The Compose Specification JSON schema (check-jsonschema's vendored
   ``vendor.compose-spec``), for both files.
2. Semantic checks the schema cannot express: every bot has its own
   credentials and only those, depends on a healthy postgres (and on the
   migrate service), has a memory limit, a restart policy, log rotation and a
   health check through the shared data layer; postgres is pinned, healthy
   over TCP, published on the configured address only, its password from a
   secret; no secret appears anywhere in a rendered file.
3. For ``compose.stack.yaml``, what ``docker stack deploy`` needs on top: a
   ``version``, no ``depends_on`` / ``build`` / ``restart`` / ``env_file`` /
   ``pull_policy`` / ``user``, no ``name`` at the top, ports never bound to a
   host address (swarm ignores it), and named (immutable) secrets and configs.

Every problem is collected; ``validate`` raises one StackInvalid listing them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import budget as budgets
from .budget import parse_publish
from .errors import StackInvalid
from .registry import Fleet

COMPOSE_FILE = "compose.yaml"
STACK_FILE = "compose.stack.yaml"


@dataclass
class PlannedFile:
    path: str  # relative to the project
    content: str = field(repr=False)
    secret: bool = False
    create_only: bool = False  # written when missing, never rewritten (the admin password)
    # A secret a bot's container reads as its non-root user through a bind mount: readable in
    # the file's mode, while the 0700 secrets/ folder keeps the host's other users out.
    container: bool = False

    @property
    def mode(self) -> int:
        if self.container:
            return 0o444
        return 0o600 if self.secret else 0o644


@dataclass
class StackFiles:
    files: list[PlannedFile]
    budget: budgets.Budget
    bots: list[str]
    skipped: list[str]  # "bot: why it is not in the stack"
    passwords: list[str] = field(default_factory=list, repr=False)
    # Digests of the services that passed the schema (``schema_errors``): kept by the render, so
    # the next one checks only the services that changed (one add-bot does not re-check the fleet).
    validated: set[str] = field(default_factory=set, repr=False)
    parsed: dict[str, Any] = field(default_factory=dict, repr=False)  # the YAML entries (load_yaml_cached)

    def content(self, path: str) -> str:
        return next(f.content for f in self.files if f.path == path)


STACK_FORBIDDEN = ("depends_on", "build", "restart", "env_file", "pull_policy", "user", "container_name")
SECRET_ENV = re.compile(r"(PASSWORD|DATABASE_URL|SECRET|TOKEN)$")


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema
    from check_jsonschema.builtin_schemas import get_builtin_schema

    schema = get_builtin_schema("vendor.compose-spec")
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@functools.lru_cache(maxsize=1)
def _schema_digest() -> str:
    return hashlib.sha256(json.dumps(_validator().schema, sort_keys=True).encode()).hexdigest()


def _service_digest(name: str, service: Any) -> str:
    """What a service's schema verdict depends on: the schema and the service itself."""
    text = json.dumps([_schema_digest(), name, service], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_KEY_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*):[ \t]*\n?")
_ANCHOR = re.compile(r"(^|[\s\[{,:])[&*][A-Za-z0-9_-]|<<:", re.M)


def _blocks(lines: list[str], indent: str) -> list[list[str]]:
    """``lines`` cut before each line that is ``indent`` then a key (not a space, a comment or a
    list item); lines before the first such line form a block of their own."""
    out: list[list[str]] = []
    for line in lines:
        if _is_key(line, indent) or not out:
            out.append([line])
        else:
            out[-1].append(line)
    return out


def _is_key(line: str, indent: str) -> bool:
    rest = line[len(indent):] if line.startswith(indent) else ""
    return rest[:1] not in ("", " ", "#", "-", "\n", "\t")


def _only_comments(block: list[str]) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in block)


class _Fallback(Exception):
    """The text is not shaped as render writes it: parse it whole."""


def load_yaml_cached(text: str, cache: dict[str, Any], used: dict[str, Any]) -> Any:
    """:func:`load_yaml` for the files render writes, entry by entry: each top-level scalar and
    each second-level entry (one service, one secret, ...) is parsed on its own, and an entry
    whose exact text parsed before (its digest in ``cache``) is not parsed again; ``used``
    collects this text's entries. So the cost follows what changed, not the fleet's size.
    Anything else (anchors, a duplicate key, a top-level list...) is parsed whole, as before."""

    def parse(chunk: str) -> Any:
        digest = hashlib.sha256(chunk.encode()).hexdigest()[:32]
        if digest not in cache:
            cache[digest] = load_yaml(chunk)
        used[digest] = cache[digest]
        return cache[digest]

    def merge(into: dict[str, Any], part: Any) -> None:
        if not isinstance(part, dict) or len(part) != 1 or set(part) & set(into):
            raise _Fallback
        into.update(part)

    if _ANCHOR.search(text):
        return load_yaml(text)
    doc: dict[str, Any] = {}
    try:
        for block in _blocks(text.splitlines(keepends=True), ""):
            if not _is_key(block[0], ""):
                if not _only_comments(block):
                    raise _Fallback
                continue
            head = _KEY_LINE.fullmatch(block[0])
            body = _blocks(block[1:], "  ") if head else []
            if head is None or not any(_is_key(entry[0], "  ") for entry in body):
                merge(doc, parse("".join(block)))  # a scalar, a flow value, or a key with no entries
                continue
            entries: dict[str, Any] = {}
            for entry in body:
                if not _is_key(entry[0], "  "):
                    if not _only_comments(entry):
                        raise _Fallback
                    continue
                merge(entries, parse("".join(entry)))
            merge(doc, {head.group(1): entries})
    except _Fallback:
        return load_yaml(text)
    return doc


def load_yaml(text: str) -> Any:
    """Parse YAML with ruamel's C parser (ruamel.yaml.clib): five times the pure-Python one, which
    dominated a render of a large fleet."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=False).load(text)


def _errors(doc: Any) -> list[str]:
    out = []
    for err in sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top)"
        out.append(f"{where}: {err.message[:200]}")
    return out


def schema_errors(doc: Any, *, known: frozenset[str] | set[str] = frozenset(),
                  passed: set[str] | None = None) -> list[str]:
    """The compose-spec schema's complaints, one line each ('' path = the top).

    The schema judges each service on its own (nothing in it relates two services), so the
    document is checked as its top level plus one small document per service, and a service
    whose digest is in ``known`` (it passed before, unchanged) is not checked again. ``passed``
    collects the digests of the services that pass now."""
    services = doc.get("services") if isinstance(doc, dict) else None
    if not isinstance(services, dict) or not services:
        return _errors(doc)
    out = _errors({**doc, "services": {}})
    for name, service in services.items():
        digest = _service_digest(str(name), service)
        if digest not in known:
            errors = _errors({"services": {name: service}})
            if errors:
                out += errors
                continue
        if passed is not None:
            passed.add(digest)
    return out


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def semantic_errors(doc: dict, fleet: "Fleet", bots: list[str], *, stack: bool, publish: str = "") -> list[str]:
    """Problems with a parsed compose file, beyond the schema."""
    errs: list[str] = []
    services: dict = doc.get("services") or {}
    top_secrets = doc.get("secrets") or {}
    top_configs = doc.get("configs") or {}
    networks = set((doc.get("networks") or {}).keys())
    pg = services.get("postgres")
    if not isinstance(pg, dict):
        return ["no postgres service"]
    major = fleet.stack.postgres_major
    if pg.get("image") != f"postgres:{major}":
        errs.append(f"postgres: image must be the official postgres:{major} (got {pg.get('image')!r})")
    test = _get(pg, "healthcheck", "test") or []
    if "pg_isready" not in test or "-h" not in test or "127.0.0.1" not in test or not _get(pg, "healthcheck", "start_period"):
        errs.append("postgres: the healthcheck must be pg_isready -h 127.0.0.1 with a start_period")
    env = pg.get("environment") or {}
    if "POSTGRES_PASSWORD" in env or "POSTGRES_PASSWORD_FILE" not in env or "postgres_password" not in _secret_sources(pg):
        errs.append("postgres: its password must come from the postgres_password secret (POSTGRES_PASSWORD_FILE)")
    volumes = pg.get("volumes") or []
    if not any(isinstance(v, str) and v.startswith("pgdata:") for v in volumes) or "pgdata" not in (doc.get("volumes") or {}):
        errs.append("postgres: its data must be on the named volume pgdata")
    ports = pg.get("ports") or []
    if stack and ports:
        errs.append("postgres: a swarm cannot publish on the loopback only, so the stack publishes nothing")
    if not stack:
        want = [f"{publish}:5432"] if publish else []
        if [str(p) for p in ports] != want:
            errs.append(f"postgres: ports must be {want} (got {ports})")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            errs.append(f"{name}: not a mapping")
            continue
        if not _get(svc, "deploy", "resources", "limits", "memory"):
            errs.append(f"{name}: no memory limit (deploy.resources.limits.memory)")
        if not _get(svc, "logging", "options", "max-size"):
            errs.append(f"{name}: no log rotation (logging.options.max-size)")
        if stack:
            if not _get(svc, "deploy", "restart_policy", "condition"):
                errs.append(f"{name}: no deploy.restart_policy")
            errs += [f"{name}: {key} is not for docker stack deploy" for key in STACK_FORBIDDEN if key in svc]
            if any(isinstance(p, dict) and "host_ip" in p for p in svc.get("ports") or []):
                errs.append(f"{name}: swarm ignores host_ip (the port would be public)")
        elif not svc.get("restart"):
            errs.append(f"{name}: no restart policy")
        if name != "postgres" and "postgres_password" in _secret_sources(svc):
            errs.append(f"{name}: only postgres may see the admin password")
        if name != "provision" and "postgres_pgpass" in _secret_sources(svc):
            errs.append(f"{name}: only the provision service may see the admin's passfile")
        for key, value in _env_items(svc):
            if key == "ADMIN_DATABASE_URL" and name == "provision" and ":" not in str(value).split("@")[0].split("//")[-1]:
                continue  # an admin URL without a password (the passfile holds it)
            if SECRET_ENV.search(key):
                errs.append(f"{name}: environment {key} would hold a secret inline (use a secret file)")
        for net in svc.get("networks") or []:
            if net not in networks:
                errs.append(f"{name}: network {net} is not defined")
        for src in _secret_sources(svc):
            if src not in top_secrets:
                errs.append(f"{name}: secret {src} is not defined")
        for cfg in svc.get("configs") or []:
            if (cfg.get("source") if isinstance(cfg, dict) else cfg) not in top_configs:
                errs.append(f"{name}: config {cfg} is not defined")
    provision = services.get("provision")
    for bot in bots:
        svc = services.get(bot)
        if not isinstance(svc, dict):
            errs.append(f"bot {bot}: no service")
            continue
        hc = _get(svc, "healthcheck", "test") or []
        if "shared.health" not in hc or bot not in hc:
            errs.append(f"bot {bot}: the healthcheck must be python -m shared.health {bot}")
        own_secret = f"{bot}_database_url"
        sources = _secret_sources(svc)
        env = dict(_env_items(svc))
        if (own_secret not in sources or env.get("DATABASE_URL_FILE") != "/run/secrets/database_url"
                or any(src != own_secret and not src.startswith(f"{bot}_") for src in sources) or "env_file" in svc):
            errs.append(f"bot {bot}: must get its own DATABASE_URL_FILE secret {own_secret}, its own settings, "
                        "and no other credentials")
        if not svc.get("read_only") or "ALL" not in (svc.get("cap_drop") or []):
            errs.append(f"bot {bot}: must run with a read-only root and no capabilities")
        if not _get(svc, "deploy", "resources", "limits", "cpus"):
            errs.append(f"bot {bot}: needs a CPU limit")
        if not stack and not _get(svc, "deploy", "resources", "limits", "pids"):
            errs.append(f"bot {bot}: needs a pids limit")  # (swarm's stack files cannot say one)
        if not stack:
            deps = svc.get("depends_on") or {}
            entry = fleet.bots.get(bot)
            local = entry is None or entry.server == "default"
            if local and _get(deps, "postgres", "condition") != "service_healthy":
                errs.append(f"bot {bot}: must depend on postgres with condition service_healthy")
            if not local and "postgres" in deps:
                errs.append(f"bot {bot}: lives on server {entry.server}, not on the stack's postgres")
            if local and provision is not None and _get(deps, "provision", "condition") != "service_completed_successfully":
                errs.append(f"bot {bot}: must wait for provision (service_completed_successfully)")
    if stack:
        if "name" in doc:
            errs.append("the top-level name is not for docker stack deploy")
        if not str(doc.get("version", "")).startswith("3."):
            errs.append("docker stack deploy needs version: 3.x")
        for kind, items in (("secret", top_secrets), ("config", top_configs)):
            errs += [f"{kind} {k}: needs a name (swarm {kind}s are immutable)" for k, v in items.items() if not v.get("name")]
    else:
        if doc.get("name") != fleet.stack.project_name:
            errs.append(f"the top-level name must be the project's, {fleet.stack.project_name!r} (it names the volume)")
        if provision is not None and (_get(provision, "depends_on", "postgres", "condition") != "service_healthy"
                                      or provision.get("restart") != "no"):
            errs.append("provision: must run once (restart: no) after postgres is healthy")
    return errs


def _secret_sources(svc: dict) -> list[str]:
    return [s.get("source") if isinstance(s, dict) else s for s in svc.get("secrets") or []]


def _env_items(svc: dict) -> list[tuple[str, Any]]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return [tuple(item.split("=", 1)) if "=" in item else (item, None) for item in env]  # type: ignore[misc]
    return list(env.items())


def validate(files: StackFiles, fleet: Fleet, known: frozenset[str] | set[str] = frozenset(),
             parsed: dict[str, Any] | None = None) -> None:
    """Raise StackInvalid unless both compose files pass the schema and the semantic checks
    and no rendered, non-secret file contains a password. ``known`` and ``parsed``: what the
    last render checked and parsed (see ``schema_errors`` and ``load_yaml_cached``); what this
    one checked and parsed goes to ``files.validated`` and ``files.parsed``."""
    published = parse_publish(fleet.stack.publish)
    publish = f"{published[0]}:{published[1]}" if published else ""
    problems: list[str] = []
    for rel, stack in ((COMPOSE_FILE, False), (STACK_FILE, True)):
        doc = load_yaml_cached(files.content(rel), dict(parsed or {}), files.parsed)
        problems += [f"{rel}: {e}" for e in schema_errors(doc, known=known, passed=files.validated)]
        problems += [f"{rel}: {e}" for e in semantic_errors(doc, fleet, files.bots, stack=stack, publish=publish)]
    for f in files.files:
        if not f.secret and any(pw and pw in f.content for pw in files.passwords):
            problems.append(f"{f.path}: contains a password")
    if problems:
        raise StackInvalid(f"the rendered stack is invalid ({len(problems)} problems): " + "; ".join(problems[:8]))

