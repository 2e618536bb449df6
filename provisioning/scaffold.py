"""`provision new-bot`: a new bot package and its migrations, from jinja2 templates.

Never overwrites: each file is written only when it does not exist, so a rerun
converges (and fills in what an interrupted run left out). The first
revision's id is derived from the bot's name, so reruns produce the same file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jinja2

from . import codes
from .files import atomic_write
from .names import validate

TEMPLATES = Path(__file__).with_name("templates") / "new_bot"
_BOT_FILES = {"__init__.py": "__init__.py.j2", "models.py": "models.py.j2",
              "repository.py": "repository.py.j2", "__main__.py": "__main__.py.j2"}


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True, trim_blocks=True,
                              undefined=jinja2.StrictUndefined, autoescape=False)


def alembic_ini(root: Path) -> str:
    return _env().get_template("alembic.ini.j2").render(codes=codes.migration_codes(root))


def write_alembic_ini(root: Path) -> Path | None:
    """(Re)write migrations/alembic.ini with a section per code; None when unchanged."""
    path = root / "migrations" / "alembic.ini"
    text = alembic_ini(root)
    if path.exists() and path.read_text() == text:
        return None
    atomic_write(path, text, mode=0o644)
    return path


def new_bot(root: Path, name: str) -> list[Path]:
    """Scaffold bots/<pkg>/ and migrations/<pkg>/versions/; return the files written.

    Raises InvalidBotName for a bad name and InvalidInput when the project has
    no shared migrations/env.py to plug the new bot into.
    """
    validate(name)
    if not (root / "migrations" / "env.py").is_file():
        from .errors import InvalidInput

        raise InvalidInput(f"{root / 'migrations' / 'env.py'} is missing: run new-bot in a botfleet project")
    package = name.replace("-", "_")
    base = "".join(part.capitalize() for part in package.split("_")) + "Base"
    revision = hashlib.sha256(f"botfleet new-bot {package}".encode()).hexdigest()[:12]
    context = {"name": name, "package": package, "base": base, "revision": revision}
    env = _env()
    wanted: dict[Path, str] = {}
    if not (root / "bots" / "__init__.py").exists():
        wanted[root / "bots" / "__init__.py"] = '"""The fleet\'s bots: one package each."""\n'
    for filename, template in _BOT_FILES.items():
        wanted[root / "bots" / package / filename] = env.get_template(template).render(context)
    versions = root / "migrations" / package / "versions"
    if not any(versions.glob("*.py")):
        wanted[versions / f"{revision}_initial_schema.py"] = env.get_template("initial.py.j2").render(context)
    written = []
    for path, text in wanted.items():
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text, mode=0o644)
        written.append(path)
    ini = write_alembic_ini(root)
    if ini is not None:
        written.append(ini)
    return written
