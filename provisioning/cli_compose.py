"""`provision` commands for the compose stack: render, budget."""

from __future__ import annotations
