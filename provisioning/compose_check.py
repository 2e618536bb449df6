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
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import budget as budgets
from .budget import parse_publish
from .errors import StackInvalid
from .registry import DEFAULT_SERVER, Fleet

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
    # Each entry that passed every check, by its verdict key (set_aside) -> what it names (a bot's
    # service) or 0: the next render leaves those out of its parse and its checks.
    verdicts: dict[str, Any] = field(default_factory=dict, repr=False)

    def content(self, path: str) -> str:
        return next(f.content for f in self.files if f.path == path)


STACK_FORBIDDEN = ("depends_on", "build", "restart", "env_file", "pull_policy", "user", "container_name")
SECRET_ENV = re.compile(r"(PASSWORD|DATABASE_URL|SECRET|TOKEN)$")


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _schema() -> dict[str, Any]:
    """check-jsonschema's builtin "vendor.compose-spec": its file read where check-jsonschema keeps
    it (importing check_jsonschema would import its whole command line, 0.2 s); else through
    check-jsonschema itself."""
    path = _schema_path()
    if path is not None:
        try:
            return json.loads(path.read_bytes())
        except OSError:
            pass
    from check_jsonschema.builtin_schemas import get_builtin_schema

    return get_builtin_schema("vendor.compose-spec")


# check-jsonschema's vendored copy of the Compose Specification schema, read as bytes for its digest.
_SCHEMA_FILE = ("builtin_schemas", "vendor", "compose-spec.json")


@functools.lru_cache(maxsize=1)
def _schema_digest() -> str:
    """The schema's digest, from its file when it is where check-jsonschema keeps it: a render
    whose services all passed before then never imports jsonschema nor builds the validator."""
    path = _schema_path()
    if path is not None:
        try:
            return "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            pass
    return hashlib.sha256(json.dumps(_validator().schema, sort_keys=True).encode()).hexdigest()


def _schema_path() -> Path | None:
    """Where check-jsonschema keeps the schema file (found without importing check_jsonschema)."""
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).parent.joinpath(*_SCHEMA_FILE)


def _service_digest(name: str, service: Any, section: str = "services") -> str:
    """What an entry's schema verdict depends on: the schema, its section and the entry itself."""
    key = [_schema_digest(), name, service] if section == "services" else [_schema_digest(), section, name, service]
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_KEY_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*):[ \t]*\n?")
_ANCHOR = re.compile(r"(^|[\s\[{,:])[&*][A-Za-z0-9_-]|<<:", re.M)
_NAME_CHAR = re.compile(r"[A-Za-z0-9_-]")


def _has_anchor(text: str) -> bool:
    """``_ANCHOR.search(text)``, in a small part of its time: each ``&`` and ``*`` (found with
    str.find: a URL or two has one, not every line) is checked for what precedes it."""
    if "<<:" in text:
        return True
    for mark in "&*":
        at = text.find(mark)
        while at != -1:
            if _NAME_CHAR.match(text, at + 1) and (at == 0 or text[at - 1] in " \t\n\r\x0b\x0c[{,:"
                                                   or text[at - 1].isspace()):
                return True
            at = text.find(mark, at + 1)
    return False


def _is_key(line: str, indent: str) -> bool:
    rest = line[len(indent):] if line.startswith(indent) else ""
    return rest[:1] not in ("", " ", "#", "-", "\n", "\t")


def _only_comments(block: list[str]) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in block)


class _Fallback(Exception):
    """The text is not shaped as render writes it: parse it whole."""


# Where an entry starts: the line break before a line that is its indent then a key (not a
# space, a comment or a list item); where a list item starts: before its indent, then "-". Each
# pattern starts with the line break itself (not ``^`` under re.M): the regex engine then jumps
# from one line break to the next, four times faster on a large fleet's file.
_KEY_AT = {n: re.compile(rf"\n(?={' ' * n}[^ #\-\n\t])") for n in (0, 2, 4)}
_ITEM_AT = {n: re.compile(rf"\n(?={' ' * n}-(?:[ \t]|$))", re.M) for n in (6,)}
# Line breaks other than \n (str.splitlines' and YAML's): a text with one is parsed whole.
_OTHER_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# A service's text longer than this is cut further, into its keys and their lists' items (the
# provision service names every bot's credentials file: one more bot must not parse it all again).
SPLIT_AT = 4096


def _other_breaks(text: str) -> bool:
    """Whether ``text`` has a line break other than \n: one ``in`` each (a memchr, or nothing at
    all for a character wider than the text's widest), not a regex over every character."""
    return any(char in text for char in _OTHER_BREAKS)


def _cut(text: str, at: re.Pattern[str]) -> list[str]:
    """``text`` cut before each line ``at`` matches (an indent, then a key or an item); what comes
    before the first such line is a piece of its own. (``at`` matches the line break ending the
    line before, which stays with that piece; a first line of the text is never cut before: it
    starts the first piece.)"""
    parts = at.split(text)
    pieces = [part + "\n" for part in parts[:-1]]
    pieces.append(parts[-1])
    return [piece for piece in pieces if piece]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_yaml_cached(text: str, cache: dict[str, Any], used: dict[str, Any],
                     digests: dict[int, str] | None = None) -> Any:
    """:func:`load_yaml` for the files render writes, entry by entry: each top-level scalar and
    each second-level entry (one service, one secret, ...) is parsed on its own (a long one, key
    by key and list item by list item), and a piece whose exact text parsed before (its digest
    in ``cache``) is not parsed again; ``used`` collects this text's pieces. So the cost follows
    what changed, not the fleet's size. ``digests``: each second-level entry's value (by id) ->
    the digest of its text, which the schema check keys its verdicts on.
    Anything else (anchors, a duplicate key, a top-level list...) is parsed whole, as before."""
    ids: dict[int, str] = {} if digests is None else digests

    def parse(chunk: str) -> tuple[Any, str]:
        digest = _digest(chunk)
        if digest not in cache:
            try:
                cache[digest] = load_yaml(chunk)
            except Exception:  # noqa: BLE001 - the whole parse raises it, with the file's own line numbers
                raise _Fallback from None
        used[digest] = cache[digest]
        return cache[digest], digest

    def one(part: Any, kind: type) -> Any:
        if not isinstance(part, kind) or len(part) != 1:
            raise _Fallback
        return part

    def merge(into: dict[str, Any], part: Any) -> None:
        key = next(iter(one(part, dict)))
        if key in into:
            raise _Fallback
        into[key] = part[key]

    def node(piece: str, indent: int) -> tuple[Any, str]:
        """One piece (``indent`` spaces, then a key): ({key: value}, the digest of its text)."""
        first, newline, rest = piece.partition("\n")
        head = _KEY_LINE.fullmatch(first[indent:] + newline) if first.startswith(" " * indent) else None
        if head is None or (indent > 0 and len(piece) <= SPLIT_AT):
            return parse(piece)  # a scalar, a flow value, a short entry
        inner = " " * (indent + 2)
        if indent + 2 in _KEY_AT:
            body = _cut(rest, _KEY_AT[indent + 2])
            if any(_is_key(entry, inner) for entry in body):
                value: dict[str, Any] = {}
                parts = []
                for entry in body:
                    if not _is_key(entry, inner):
                        if not _only_comments(entry.splitlines()):
                            raise _Fallback
                        continue
                    part, digest = node(entry, indent + 2)
                    merge(value, part)
                    if indent == 0:  # a second-level entry: one service, one secret...
                        ids[id(part[next(iter(part))])] = digest
                    parts.append(digest)
                return {head.group(1): value}, _digest(f"{head.group(1)}:{parts}")
        if indent + 2 in _ITEM_AT:
            items = _cut(rest, _ITEM_AT[indent + 2])
            if items and all(item.startswith(inner + "-") for item in items):
                values, parts = [], []
                for item in items:
                    part, digest = parse(item)
                    values.append(one(part, list)[0])
                    ids[id(values[-1])] = digest
                    parts.append(digest)
                return {head.group(1): values}, _digest(f"{head.group(1)}:[{parts}]")
        return parse(piece)

    if _has_anchor(text) or _other_breaks(text):
        return load_yaml(text)
    doc: dict[str, Any] = {}
    try:
        for block in _cut(text, _KEY_AT[0]):
            if not _is_key(block, ""):
                if not _only_comments(block.splitlines()):
                    raise _Fallback
                continue
            merge(doc, node(block, 0)[0])
    except _Fallback:
        return load_yaml(text)
    return doc


def load_yaml(text: str) -> Any:
    """Parse YAML with ruamel's C parser (ruamel.yaml.clib): five times the pure-Python one, which
    dominated a render of a large fleet."""
    return _yaml().load(text)


@functools.lru_cache(maxsize=1)
def _yaml():
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=False)


def _errors(doc: Any) -> list[str]:
    out = []
    for err in sorted(_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path) or "(top)"
        out.append(f"{where}: {err.message[:200]}")
    return out


# The top-level sections the schema judges entry by entry (each an object of named entries,
# ``patternProperties`` -> one definition, nothing relating two entries): checked one entry at
# a time, and an entry that passed before, unchanged, is not checked again.
SECTIONS = ("services", "networks", "volumes", "secrets", "configs")


def schema_errors(doc: Any, *, known: frozenset[str] | set[str] = frozenset(),
                  passed: set[str] | None = None, digests: dict[int, str] | None = None) -> list[str]:
    """The compose-spec schema's complaints, one line each ('' path = the top).

    The schema judges each entry of the sections in SECTIONS on its own (nothing in it relates
    two services, two secrets...), so the document is checked as its top level (those sections
    emptied) plus one small document per entry, and an entry whose digest is in ``known`` (it
    passed before, unchanged) is not checked again. ``passed`` collects the digests of the
    entries that pass now. A fleet's one new bot costs the schema its few entries, whatever the
    fleet's size. ``digests``: an entry's value (by id) -> the digest of the text it was parsed
    from (load_yaml_cached), which then stands for the value itself."""
    passed = set() if passed is None else passed
    if not isinstance(doc, dict):
        return _errors(doc)
    split = {k: v for k, v in doc.items() if k in SECTIONS and isinstance(v, dict) and v}
    if not split:
        return _errors(doc)
    skeleton = {k: ({} if k in split else v) for k, v in doc.items()}
    digest = _service_digest("", skeleton, "(top)")
    out = []
    if digest not in known:
        out = _errors(skeleton)
    if not out:
        passed.add(digest)
    schema = _schema_digest()
    for section, entries in split.items():
        for name, entry in entries.items():
            text = digests.get(id(entry)) if digests else None
            digest = (_digest(f"{schema}|{section}|{name}|{text}") if text is not None
                      else _service_digest(str(name), entry, section))
            if digest in known:
                passed.add(digest)
                passed.update(_item_digests(section, entry, digests))  # for the next render's changed lists
            else:
                out += _entry_errors(section, name, entry, digest, known, passed, digests)
    return out


# A service's lists whose items the schema judges each on its own (no uniqueItems, no length):
# in a long one, only the items not seen passing before are checked (the provision service's
# secrets name every bot's credentials file).
ITEM_LISTS = ("secrets", "configs")
_LONG_LIST = 8


def _long_lists(section: str, entry: Any) -> list[tuple[str, list[Any]]]:
    if section != "services" or not isinstance(entry, dict):
        return []
    return [(key, entry[key]) for key in ITEM_LISTS if isinstance(entry.get(key), list) and len(entry[key]) > _LONG_LIST]


def _item_digest(key: str, value: Any, digests: dict[int, str] | None) -> str:
    text = digests.get(id(value)) if digests else None
    return _digest(f"{key}|item|{text}") if text is not None else _service_digest(key, value, "service-item")


def _item_digests(section: str, entry: Any, digests: dict[int, str] | None) -> list[str]:
    return [_item_digest(key, value, digests) for key, values in _long_lists(section, entry) for value in values]


def _entry_errors(section: str, name: Any, entry: Any, digest: str, known: frozenset[str] | set[str],
                  passed: set[str], digests: dict[int, str] | None) -> list[str]:
    """The schema's complaints about one entry not known to pass; its digest (and its long lists'
    items') go to ``passed`` when there are none."""
    reduced, items = entry, []
    for key, values in _long_lists(section, entry):
        mine = [_item_digest(key, value, digests) for value in values]
        reduced = {**reduced, key: [v for v, d in zip(values, mine) if d not in known]}
        items += mine
    errors = _errors({section: {name: reduced}})
    if errors and reduced is not entry:
        errors = _errors({section: {name: entry}})  # the whole entry's complaints, as they always were
    if not errors:
        passed.add(digest)
        passed.update(items)
    return errors


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def semantic_errors(doc: dict, fleet: "Fleet", bots: list[str], *, stack: bool, publish: str = "",
                    aside: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Problems with a parsed compose file, beyond the schema. ``aside``: the entries left out of
    ``doc`` because they passed every check before (:func:`set_aside`), by section: a bot's
    service there is checked only for what it names (its refs: secrets, configs, networks), and
    the secrets and configs there only count as defined."""
    errs: list[str] = []
    aside = aside or {}
    services: dict = doc.get("services") or {}
    top_secrets = doc.get("secrets") or {}
    top_configs = doc.get("configs") or {}
    secret_names = set(top_secrets) | set(aside.get("secrets", ()))
    config_names = set(top_configs) | set(aside.get("configs", ()))
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
        if name not in ("provision", "archive") and "backup_pgpass" in _secret_sources(svc):
            errs.append(f"{name}: only the archive and provision services may see the backup role's passfile")
        for key, value in _env_items(svc):
            if key == "ADMIN_DATABASE_URL" and name == "provision" and ":" not in str(value).split("@")[0].split("//")[-1]:
                continue  # an admin URL without a password (the passfile holds it)
            if SECRET_ENV.search(key):
                errs.append(f"{name}: environment {key} would hold a secret inline (use a secret file)")
        errs += _undefined(name, service_refs(svc), networks, secret_names, config_names)
    for name, refs in aside.get("services", {}).items():
        errs += _undefined(name, refs, networks, secret_names, config_names)
    provision = services.get("provision")
    for bot in bots:
        if bot in aside.get("services", {}):
            continue  # its service passed every check below before, in the same context
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


def service_refs(svc: dict) -> dict[str, list[Any]]:
    """What a service names that must be defined at the top of its file."""
    return {"networks": list(svc.get("networks") or []), "secrets": _secret_sources(svc),
            "configs": [cfg.get("source") if isinstance(cfg, dict) else cfg for cfg in svc.get("configs") or []]}


def _undefined(name: str, refs: dict[str, list[Any]], networks: set[str], secrets: set[str],
               configs: set[str]) -> list[str]:
    return ([f"{name}: network {net} is not defined" for net in refs["networks"] if net not in networks]
            + [f"{name}: secret {src} is not defined" for src in refs["secrets"] if src not in secrets]
            + [f"{name}: config {cfg} is not defined" for cfg in refs["configs"] if cfg not in configs])


def _secret_sources(svc: dict) -> list[str]:
    return [s.get("source") if isinstance(s, dict) else s for s in svc.get("secrets") or []]


def _env_items(svc: dict) -> list[tuple[str, Any]]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return [tuple(item.split("=", 1)) if "=" in item else (item, None) for item in env]  # type: ignore[misc]
    return list(env.items())


_WORD = re.compile(r"[A-Za-z0-9_-]+")
_WINDOWED = 16  # shorter passwords (a few settings, if any) are searched for as they are


class PasswordFinder:
    """Whether a text contains any of many passwords, in time linear in the text. ``pw in text``
    for each of them costs the number of passwords times the text, and both grow with the fleet.

    A password made only of URL-safe characters (botfleet's own: ``secrets.token_urlsafe``) can
    only occur inside a run of such characters in the text, so the runs at least as long as it
    are cut into windows of its length and looked up in a set; any other password (a bot's
    setting, the TLS key) is searched for as it is."""

    def __init__(self, passwords: list[str]):
        self.by_length: dict[int, set[str]] = {}
        self.others: list[str] = []
        for pw in passwords:
            if not pw:
                continue
            if len(pw) >= _WINDOWED and _WORD.fullmatch(pw):
                self.by_length.setdefault(len(pw), set()).add(pw)
            else:
                self.others.append(pw)

    def found_in(self, text: str) -> bool:
        if any(pw in text for pw in self.others):
            return True
        if not self.by_length:
            return False
        for word in _runs(text, min(self.by_length)):
            for length, group in self.by_length.items():
                if any(word[i:i + length] in group for i in range(len(word) - length + 1)):
                    return True
        return False


# Every byte of a URL-safe character as "a", every other byte (a UTF-8 sequence's too) as " ".
_RUN_TABLE = bytes(97 if chr(i) in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-" else 32
                   for i in range(256))
_RUN_TAIL = re.compile(rb"a*")


def _runs(text: str, shortest: int) -> list[str]:
    """Each run of URL-safe characters in ``text`` at least ``shortest`` long: what
    ``re.findall(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{N,}", text)`` returns, in a seventh of its time
    (a render scans both compose files, megabytes at 1,000 bots): the text's bytes mapped to "a"
    (URL-safe) or " ", then each run found with bytes.find of N "a"s."""
    raw = text.encode("utf-8", "surrogatepass")
    mapped = raw.translate(_RUN_TABLE)
    needle = b"a" * shortest
    out = []
    at = mapped.find(needle)
    while at != -1:  # the leftmost match starts its run: an "a" before it would have matched first
        end = _RUN_TAIL.match(mapped, at + shortest).end()  # type: ignore[union-attr]
        out.append(raw[at:end].decode("ascii"))
        at = mapped.find(needle, end)
    return out


@functools.lru_cache(maxsize=1)
def _checks_digest() -> str:
    """This module's own source: a verdict kept from an earlier render holds only for the very
    checks that gave it (a botfleet upgrade checks every entry again, once)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


# The sections whose entries set_aside may leave out: each bot's service, every secret and config.
ASIDE_SECTIONS = ("services", "secrets", "configs")


def set_aside(text: str, verdicts: dict[str, Any], *, stack: bool, bots: set[str],
              local: dict[str, bool]) -> tuple[str, dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """``text`` without the entries that passed every check before, exactly as they are now.

    An entry's verdict key digests everything its checks read: the checks' own code, the
    schema, which file (compose or stack), its section and name, its exact text and, for a bot's
    service, whether the bot is on the stack's server and whether the file has a provision
    service. An entry whose key is in ``verdicts`` (kept by the last render that passed) is cut
    out of the text, which then parses to the rest of the document; what it names is checked
    from its refs (semantic_errors' ``aside``). So one more bot costs the checks its own entries,
    not every bot's. Left whole: a text not shaped as render writes it (anchors, other line
    breaks), a section with a name twice; a section always keeps one entry (never emptied).
    Returns the text, the entries set aside (section -> name -> refs), and every candidate's
    key (to keep the verdicts of those that pass now)."""
    aside: dict[str, dict[str, Any]] = {}
    keys: dict[tuple[str, str], str] = {}
    if _has_anchor(text) or _other_breaks(text):
        return text, aside, keys
    blocks = _cut(text, _KEY_AT[0])
    sections: dict[str, tuple[int, list[str], list[str | None]]] = {}
    for at, block in enumerate(blocks):
        first, newline, rest = block.partition("\n")
        section = first[:-1] if first.endswith(":") else ""
        if section not in ASIDE_SECTIONS or not newline or section in sections:
            continue
        entries = _cut(rest, _KEY_AT[2])
        names = []
        for entry in entries:
            end = entry.find("\n")
            head = _KEY_LINE.fullmatch(entry, 2, len(entry) if end < 0 else end + 1) if _is_key(entry, "  ") else None
            names.append(head.group(1) if head else None)
        found = [n for n in names if n is not None]
        if len(found) != len(set(found)):
            continue  # a duplicate key: the whole parse's error, as always
        sections[section] = (at, [first + newline] + entries, [None] + names)
    provision = "provision" in (sections["services"][2] if "services" in sections else ())
    prefix = f"{_checks_digest()}|{_schema_digest()}|{'stack' if stack else 'compose'}"
    for section, (at, pieces, names) in sections.items():
        left: dict[str, Any] = {}
        kept = []
        named = 0  # entries kept
        for piece, name in zip(pieces, names):
            if name is None or (section == "services" and name not in bots):
                kept.append(piece)
                named += name is not None
                continue
            context = f"local={local.get(name, True)}|provision={provision}" if section == "services" else ""
            digest = hashlib.sha256(f"{prefix}|{section}|{name}|{context}|".encode())
            digest.update(piece.encode())
            key = digest.hexdigest()[:32]
            keys[(section, name)] = key
            if key in verdicts:
                left[name] = verdicts[key]
            else:
                kept.append(piece)
                named += 1
        if left and not named:
            first_name = next(iter(left))  # never empty a section: its first entry is checked again
            del left[first_name]
            kept.insert(1, pieces[names.index(first_name)])
        if left:
            aside[section] = left
            blocks[at] = "".join(kept)
    return "".join(blocks), aside, keys


def validate(files: StackFiles, fleet: Fleet, known: frozenset[str] | set[str] = frozenset(),
             parsed: dict[str, Any] | None = None, verdicts: dict[str, Any] | None = None) -> None:
    """Raise StackInvalid unless both compose files pass the schema and the semantic checks
    and no rendered, non-secret file contains a password. ``known``, ``parsed`` and
    ``verdicts``: what the last render checked, parsed and found to pass (see ``schema_errors``,
    ``load_yaml_cached`` and ``set_aside``); this one's go to ``files.validated``,
    ``files.parsed`` and ``files.verdicts`` (kept only when it passes)."""
    published = parse_publish(fleet.stack.publish)
    publish = f"{published[0]}:{published[1]}" if published else ""
    problems: list[str] = []
    bots = set(files.bots)
    local = {name: entry.server == DEFAULT_SERVER for name, entry in fleet.bots.items()}
    for rel, stack in ((COMPOSE_FILE, False), (STACK_FILE, True)):
        digests: dict[int, str] = {}
        text, aside, keys = set_aside(files.content(rel), verdicts or {}, stack=stack, bots=bots, local=local)
        doc = load_yaml_cached(text, dict(parsed or {}), files.parsed, digests)
        problems += [f"{rel}: {e}" for e in schema_errors(doc, known=known, passed=files.validated, digests=digests)]
        problems += [f"{rel}: {e}" for e in semantic_errors(doc, fleet, files.bots, stack=stack, publish=publish,
                                                            aside=aside)]
        for (section, name), key in keys.items():
            if name in aside.get(section, {}):
                files.verdicts[key] = aside[section][name]
            elif isinstance(doc, dict) and isinstance(doc.get(section), dict) and name in doc[section]:
                entry = doc[section][name]
                files.verdicts[key] = service_refs(entry) if section == "services" and isinstance(entry, dict) else 0
    finder = PasswordFinder(files.passwords)
    for f in files.files:
        if not f.secret and finder.found_in(f.content):
            problems.append(f"{f.path}: contains a password")
    if problems:
        raise StackInvalid(f"the rendered stack is invalid ({len(problems)} problems): " + "; ".join(problems[:8]))

