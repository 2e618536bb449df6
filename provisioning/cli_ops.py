"""`provision` commands for fleet operations: backup, restore, rotate-password, doctor."""

from __future__ import annotations
