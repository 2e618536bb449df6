"""Generated bot passwords and their SCRAM-SHA-256 verifiers.

The plaintext never leaves this process except into the bot's 0600 env file:
the server only ever receives the verifier, computed here by libpq.
"""

from __future__ import annotations

import base64
import functools
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
    return scram_keys(password, verifier) is not None


def scram_keys(password: str, verifier: str | None) -> tuple[str, str] | None:
    """The SCRAM ClientKey and ServerKey (base64) that ``password`` gives with the salt and the
    iteration count of ``verifier``, when they are the verifier's (else None: not its password).

    libpq 18 logs in with them (``scram_client_key``, ``scram_server_key``) instead of the password,
    so a login that must also check the password against the verifier hashes it once, here
    (OpenSSL's PBKDF2, about 0.9 ms, outside the GIL), not twice (libpq's own costs 2.3 ms more).
    The hash is kept for this process (:func:`_salted`): a command checking a password twice, or
    logging in with it twice, pays for it once."""
    if not verifier or not verifier.startswith("SCRAM-SHA-256$"):
        return None
    try:
        _, params, keys = verifier.split("$")
        iterations, salt_b64 = params.split(":")
        stored_b64, server_b64 = keys.split(":")
        salted = _salted(password, salt_b64, int(iterations))
        stored, server = base64.b64decode(stored_b64), base64.b64decode(server_b64)
    except ValueError:
        return None
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    if not (hmac.compare_digest(hashlib.sha256(client_key).digest(), stored)
            and hmac.compare_digest(server_key, server)):
        return None
    return base64.b64encode(client_key).decode(), base64.b64encode(server_key).decode()


@functools.lru_cache(maxsize=4096)
def _salted(password: str, salt_b64: str, iterations: int) -> bytes:
    """SCRAM's SaltedPassword (PBKDF2-HMAC-SHA256); a bad salt raises ValueError."""
    if not 0 < iterations <= 10_000_000:
        raise ValueError("iterations")
    return hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt_b64, validate=True), iterations)


def keys_supported() -> bool:
    """Whether this libpq can log in with SCRAM keys instead of a password (libpq 18)."""
    return psycopg.pq.version() >= 180000
