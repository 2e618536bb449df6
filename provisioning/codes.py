"""A bot's code in the project: its package under ``bots/``, its migrations, its metadata.

A *code* is a package ``bots/<pkg>`` (``hello-bot`` and ``hello_bot`` name the
same one); every instance of a bot deployed from it (``add-bot --code``) shares
its models and its script directory ``migrations/<pkg>/versions``.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput, ProvisionError

CODE_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")


class NoMigrations(ProvisionError):
    """A bot's code has no migrations directory."""


@dataclass(frozen=True)
class Code:
    root: Path  # the project
    package: str  # bots/<package>

    @property
    def migrations(self) -> Path:
        return self.root / "migrations"

    @property
    def versions(self) -> Path:
        return self.migrations / self.package / "versions"

    @property
    def module(self) -> str:
        return f"bots.{self.package}"


def find(root: Path, code: str) -> Code:
    """The code ``code`` under ``root/bots`` (InvalidInput when there is none)."""
    if CODE_RE.fullmatch(code) is None:
        raise InvalidInput(f"{code!r} is not a bot code name (a-z, 0-9, '-' or '_', starting with a letter)")
    for candidate in (code, code.replace("-", "_")):
        if (root / "bots" / candidate).is_dir():
            return Code(root, candidate)
    raise InvalidInput(f"no bot code {code!r} under {root / 'bots'}")


def with_migrations(root: Path, code: str) -> Code:
    """Like :func:`find`, and the code must have ``migrations/<pkg>/versions`` and the shared env.py."""
    found = find(root, code)
    if not (found.migrations / "env.py").is_file():
        raise NoMigrations(f"no {found.migrations / 'env.py'}: this project has no shared migration environment")
    if not found.versions.is_dir():
        raise NoMigrations(f"bot code {found.package!r} has no migrations ({found.versions} is missing)")
    return found


def migration_codes(root: Path) -> list[str]:
    """Every code with a script directory under ``migrations/``."""
    base = root / "migrations"
    if not base.is_dir():
        return []
    return sorted(p.parent.name for p in base.glob("*/versions") if p.is_dir())


def _use_project_bots(root: Path) -> None:
    """Import ``bots.*`` from this project first.

    ``bots`` may already be importable from the installed botfleet (its
    example bots); the project's own ``bots/`` folder takes precedence so a
    user's new bot is found beside them.
    """
    project_bots = str(root / "bots")
    if "bots" not in sys.modules:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    import bots

    path = bots.__path__  # a list for a regular package
    if project_bots not in path:
        path.insert(0, project_bots)
    importlib.invalidate_caches()


def load_metadata(root: Path, code: str):
    """``bots/<code>/models.py``'s ``metadata``: the bot's own schema."""
    found = find(root, code)
    _use_project_bots(root)
    try:
        module = importlib.import_module(f"{found.module}.models")
    except ImportError as err:
        raise ProvisionError(f"cannot import {found.module}.models: {err}") from None
    metadata = getattr(module, "metadata", None)
    if metadata is None:
        raise ProvisionError(f"{found.module}.models has no `metadata` (set metadata = YourBase.metadata)")
    return metadata


SETTING_RE = re.compile(r"[A-Z_][A-Z0-9_]*")


def required_settings(root: Path, code: str) -> tuple[str, ...]:
    """The settings a bot code declares it needs: ``REQUIRED_SETTINGS = ("BOT_TOKEN",)`` in
    ``bots/<pkg>/__init__.py``, read with ``ast`` (the bot's code, and its heavy imports, are
    never run). () for code that is not there or declares none; ProvisionError for a
    declaration that is not a literal tuple or list of setting names."""
    try:
        found = find(root, code)
    except InvalidInput:
        return ()
    init = root / "bots" / found.package / "__init__.py"
    try:
        text = init.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as err:
        raise ProvisionError(f"cannot read {init}: {getattr(err, 'strerror', None) or err}") from None
    # Parsed once per process and text (a fleet-wide command asks for every bot of a code).
    key = (str(init), text)
    if key not in _DECLARED:
        _DECLARED[key] = _declared(init, text)
    return _DECLARED[key]


_DECLARED: dict[tuple[str, str], tuple[str, ...]] = {}


def _declared(init: Path, text: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(text, str(init))
    except (SyntaxError, ValueError) as err:
        raise ProvisionError(f"cannot read {init}: {err}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "REQUIRED_SETTINGS" for t in targets):
            continue
        try:
            declared = ast.literal_eval(value)
        except ValueError:
            declared = None
        if not isinstance(declared, (tuple, list)) or not all(
                isinstance(k, str) and SETTING_RE.fullmatch(k) for k in declared):
            raise ProvisionError(f"{init}: REQUIRED_SETTINGS must be a literal tuple of setting names "
                                 "(A-Z, 0-9, '_'), e.g. (\"BOT_TOKEN\",)")
        return tuple(dict.fromkeys(declared))
    return ()
