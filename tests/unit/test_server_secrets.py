from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from runtime.agents.secrets import KeyRing, SecretBox, SecretError
from runtime.secret import Secret

KEY = "sk-live-0123456789abcdef"


def test_seal_and_open_round_trip_and_never_store_plaintext():
    box = SecretBox(KeyRing.generate())
    sealed = box.seal(Secret(KEY), context="agent:1:llm.api_key")
    assert KEY not in sealed and sealed.startswith(f"v1.{box.ring.primary}.")
    assert box.open(sealed, context="agent:1:llm.api_key").reveal() == KEY
    # Fresh nonce each time: the same secret never seals to the same text.
    assert box.seal(KEY, context="c") != box.seal(KEY, context="c")


def test_context_binding_and_tampering_are_detected():
    box = SecretBox(KeyRing.generate())
    sealed = box.seal(KEY, context="agent:1:llm.api_key")
    with pytest.raises(SecretError, match="does not open") as info:
        box.open(sealed, context="agent:2:llm.api_key")
    assert KEY not in str(info.value)
    version, kid, body = sealed.split(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(SecretError):
        box.open(f"{version}.{kid}.{flipped}", context="agent:1:llm.api_key")
    for bad in ("", "plain text", "v2.x.y", "v1.nokey.AAAA"):
        with pytest.raises(SecretError):
            box.open(bad, context="agent:1:llm.api_key")


def test_rotation_keeps_old_values_readable_and_reseals():
    ring = KeyRing.generate()
    old = SecretBox(ring).seal(KEY, context="c")
    new_box = SecretBox(ring.rotated())
    assert new_box.ring.primary != ring.primary
    assert new_box.open(old, context="c").reveal() == KEY
    resealed = new_box.reseal(old, context="c")
    assert new_box.key_id(resealed) == new_box.ring.primary
    assert new_box.open(resealed, context="c").reveal() == KEY
    assert new_box.reseal(resealed, context="c") == resealed


def test_env_form_round_trip_and_errors():
    ring = KeyRing.generate().rotated()
    again = KeyRing.from_env(ring.to_env())
    assert again.primary == ring.primary and again.keys == ring.keys
    # The repr names key ids only, never key material.
    assert all(part.split(":")[1] not in repr(ring) for part in ring.to_env().split(","))
    for bad in ("", "nokey", "k1:!!!", "k1:" + "A" * 10):
        with pytest.raises(SecretError) as info:
            KeyRing.from_env(bad)
        assert "!!!" not in str(info.value)


def test_key_file_is_created_0600_and_refused_when_readable_by_others(tmp_path: Path):
    path = tmp_path / "data" / "secret.key"
    ring = KeyRing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert KeyRing.load_or_create(path).keys == ring.keys
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        KeyRing.load(path)
    os.chmod(path, 0o600)
    path.write_text("{not json")
    with pytest.raises(SecretError, match="malformed"):
        KeyRing.load(path)
