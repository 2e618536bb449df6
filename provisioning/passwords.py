"""Generated bot passwords and their SCRAM-SHA-256 verifiers.

The plaintext never leaves this process except into the bot's 0600 env file:
the server only ever receives the verifier, computed here by libpq.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import psycopg

PASSWORD_BYTES = 32  # 256 bits of entropy


def generate() -> str:
    """A new password: 32 random bytes, URL-safe (no escaping needed in a URL)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(conn: psycopg.Connection, password: str, role: str) -> str:
    """The SCRAM-SHA-256 verifier for ``password``, computed on the client by libpq."""
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


def verifier_matches(password: str, verifier: str | None) -> bool:
    """Whether ``password`` is the one behind a stored SCRAM-SHA-256 verifier.

    Format (RFC 5803): ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``.
    """
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return False
    try:
        _, params, keys = verifier.split("$")
        iterations, salt_b64 = params.split(":")
        stored_b64, _server = keys.split(":")
        salt = base64.b64decode(salt_b64)
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, int(iterations))
    except ValueError:
        return False
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    return hmac.compare_digest(stored_key, base64.b64decode(stored_b64))
