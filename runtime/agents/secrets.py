"""Secrets at rest: AES-GCM with key ids, so the encryption key can be rotated.

Theory of operation
-------------------
A :class:`KeyRing` holds 256-bit keys by id; one is primary. :meth:`SecretBox.seal`
encrypts with the primary key and a fresh 96-bit nonce, binding the value to a
*context* (for example ``agent:<id>:llm.api_key``) as associated data, so a
ciphertext copied to another record does not decrypt. The stored form is
``v1.<key id>.<base64url(nonce || ciphertext+tag)>``: the key id says which key
opens it, so after a rotation old values stay readable and can be resealed
under the new primary key at leisure.

The key ring comes from ``VOXLOOP_SECRET_KEY`` (``kid:base64key[,kid:base64key…]``,
the first is primary) or from a key file created with mode 0600 in the data
directory. Errors never contain plaintext or key material.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runtime.secret import Secret

VERSION: Final = "v1"
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12


class SecretError(Exception):
    """A secret could not be sealed or opened (the message never holds the secret)."""


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 §5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of :func:`b64url_encode` (padding restored).

    Raises:
        ValueError: not base64url.
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _new_kid() -> str:
    return "k" + secrets.token_hex(4)


@dataclass(frozen=True, slots=True)
class KeyRing:
    primary: str
    keys: dict[str, bytes]

    def __post_init__(self) -> None:
        if self.primary not in self.keys:
            raise SecretError("the primary key id is not in the key ring")
        for kid, key in self.keys.items():
            if not kid or "." in kid or len(key) != KEY_BYTES:
                raise SecretError(f"key {kid!r} is not a {KEY_BYTES * 8}-bit key with a plain id")

    def __repr__(self) -> str:
        return f"KeyRing(primary={self.primary!r}, ids={sorted(self.keys)!r})"

    @classmethod
    def generate(cls) -> KeyRing:
        kid = _new_kid()
        return cls(primary=kid, keys={kid: AESGCM.generate_key(bit_length=256)})

    @classmethod
    def from_env(cls, value: str) -> KeyRing:
        """Parse ``kid:base64key[,kid:base64key…]``; the first key is primary.

        Raises:
            SecretError: malformed value (the message does not echo it).
        """
        keys: dict[str, bytes] = {}
        order: list[str] = []
        for part in value.split(","):
            kid, sep, encoded = part.strip().partition(":")
            if not sep:
                raise SecretError("VOXLOOP_SECRET_KEY must be kid:base64key[,kid:base64key…]")
            try:
                keys[kid] = b64url_decode(encoded)
            except (ValueError, TypeError):
                raise SecretError(f"key {kid!r} in VOXLOOP_SECRET_KEY is not base64") from None
            order.append(kid)
        if not order:
            raise SecretError("VOXLOOP_SECRET_KEY holds no key")
        return cls(primary=order[0], keys=keys)

    def to_env(self) -> str:
        ordered = [self.primary, *(k for k in self.keys if k != self.primary)]
        return ",".join(f"{kid}:{b64url_encode(self.keys[kid])}" for kid in ordered)

    def rotated(self) -> KeyRing:
        """A ring with a new primary key; the old keys stay for reading."""
        kid = _new_kid()
        return KeyRing(primary=kid, keys={**self.keys, kid: AESGCM.generate_key(bit_length=256)})

    def only(self, kids: set[str]) -> KeyRing:
        """A ring with only the primary key and ``kids`` (retiring the others)."""
        keep = {k: v for k, v in self.keys.items() if k == self.primary or k in kids}
        return KeyRing(primary=self.primary, keys=keep)

    def save(self, path: Path) -> None:
        """Write the ring to ``path`` with mode 0600, atomically and durably.

        The file and its directory are fsynced before this returns, so a crash
        afterwards cannot lose the new ring.
        """
        doc = {"primary": self.primary, "keys": {k: b64url_encode(v) for k, v in self.keys.items()}}
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a key file.

        Raises:
            SecretError: unreadable, malformed, or readable by others than its owner.
        """
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecretError(f"cannot read the key file {path}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretError(f"the key file {path} must not be accessible to others (chmod 600)")
        try:
            doc = json.loads(text)
            keys = {str(k): b64url_decode(str(v)) for k, v in doc["keys"].items()}
            return cls(primary=str(doc["primary"]), keys=keys)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SecretError(f"the key file {path} is malformed") from None

    @classmethod
    def load_or_create(cls, path: Path) -> KeyRing:
        """The data directory's key ring, generated (0600) on first use."""
        if path.exists():
            return cls.load(path)
        ring = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        ring.save(path)
        return ring


class KeyUnavailable(SecretError):
    """The key a value must be sealed with (or was sealed with) is not in this worker's ring."""


class SecretBox:
    """Seals and opens secrets with a :class:`KeyRing`.

    Args:
        ring: the keys.
        key_file: where the ring came from; when a key id is missing (another
            process rotated the key), the file is read again, so running
            workers pick up a new primary key without a restart.
    """

    def __init__(self, ring: KeyRing, key_file: Path | None = None) -> None:
        self.ring = ring
        self.key_file = key_file

    def has_key(self, kid: str) -> bool:
        """Whether ``kid`` is in the ring (re-reading the key file once if it is not)."""
        if kid in self.ring.keys:
            return True
        self.refresh()
        return kid in self.ring.keys

    def refresh(self) -> None:
        """Re-read the key file, if the ring came from one (keys are only ever added)."""
        if self.key_file is None:
            return
        try:
            ring = KeyRing.load(self.key_file)
        except SecretError:
            return
        self.ring = KeyRing(primary=ring.primary, keys={**self.ring.keys, **ring.keys})

    def seal(self, value: str | Secret, *, context: str, kid: str | None = None) -> str:
        """Encrypt under key ``kid`` (default: the ring's primary key).

        Raises:
            KeyUnavailable: ``kid`` is not in the ring, even after re-reading the key file.
        """
        kid = kid or self.ring.primary
        if not self.has_key(kid):
            raise KeyUnavailable(
                f"secrets are now sealed under key {kid!r}, which this process does not have; "
                "restart it with the rotated VOXLOOP_SECRET_KEY"
            )
        plaintext = value.reveal() if isinstance(value, Secret) else value
        nonce = secrets.token_bytes(NONCE_BYTES)
        key = self.ring.keys[kid]
        sealed = AESGCM(key).encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return f"{VERSION}.{kid}.{b64url_encode(nonce + sealed)}"

    def open(self, token: str, *, context: str) -> Secret:
        """Decrypt a sealed value.

        Raises:
            SecretError: unknown format or key id, wrong context, or tampered data.
        """
        _, kid, body = self._split(token)
        if not self.has_key(kid):
            raise KeyUnavailable(f"no key with id {kid!r} in the key ring")
        key = self.ring.keys[kid]
        try:
            data = b64url_decode(body)
            plaintext = AESGCM(key).decrypt(
                data[:NONCE_BYTES], data[NONCE_BYTES:], context.encode("utf-8")
            )
        except (InvalidTag, ValueError):
            raise SecretError(
                "the sealed value does not open (tampered, or another record's)"
            ) from None
        return Secret(plaintext.decode("utf-8"))

    def key_id(self, token: str) -> str:
        return self._split(token)[1]

    def reseal(self, token: str, *, context: str, kid: str | None = None) -> str:
        """Re-encrypt under key ``kid`` (default: primary); no-op if it already is.

        Raises:
            SecretError: the value does not open.
        """
        kid = kid or self.ring.primary
        if self.key_id(token) == kid:
            return token
        return self.seal(self.open(token, context=context), context=context, kid=kid)

    @staticmethod
    def _split(token: str) -> tuple[str, str, str]:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != VERSION:
            raise SecretError("not a sealed value")
        return parts[0], parts[1], parts[2]
