"""The hosted Voice Agent API's voice names, mapped onto the voices this server can speak.

A self-hosted server cannot have the hosted voices, but clients name them
(``anna``, ``ivy``, ``james`` …). Every name of the hosted catalogue
(:data:`HOSTED_VOICES`) resolves to an installed voice of the server's TTS engine:

1. the operator's map for that engine (``VOXLOOP_VOICE_MAP_<ENGINE>``, a JSON object
   ``{"anna": "nova"}``), then the operator's map for every engine
   (``VOXLOOP_VOICE_MAP``);
2. otherwise the default map: the engine's installed voice closest in language and
   gender (:func:`default_target`).

A name that is an installed voice's own id (or one of its aliases) speaks with that
voice. Anything else is unknown (refused as the hosted API refuses it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from runtime.speech.tts import Voice

Gender = Literal["female", "male"]


@dataclass(frozen=True, slots=True)
class HostedVoice:
    """One name of the hosted catalogue: its gender and accent (``en-US``, ``en-GB``, ``es`` …)."""

    name: str
    gender: Gender
    accent: str


def _voices(accent: str, female: str, male: str) -> tuple[HostedVoice, ...]:
    return tuple(HostedVoice(n, "female", accent) for n in female.split()) + tuple(
        HostedVoice(n, "male", accent) for n in male.split()
    )


HOSTED_VOICES: Final[tuple[HostedVoice, ...]] = (
    # The catalogue clients use today, and the names older examples use.
    *_voices("en-US", "alba eve jane jean mary", "george michael"),
    *_voices("en-GB", "anna vera", "charles paul"),
    *_voices(
        "en-US",
        "ivy winter bella helen martha river emma eleanor claire",
        "james tyler david kyle victor",
    ),
    *_voices("es", "lola lucia", "mateo diego"),
    *_voices("fr", "estelle", "pierre"),
    *_voices("de", "", "juergen"),
    *_voices("it", "giulia", "giovanni luca"),
    *_voices("pt", "", "rafael"),
    *_voices("hi", "", "arjun"),
    *_voices("ru", "", "dmitri"),
)
"""Every hosted voice name a client may send (lower case, as the hosted API spells them)."""

DEFAULT_HOSTED_VOICE: Final = "anna"
"""The hosted API's documented default voice (used when a session names none)."""

_BY_NAME: Final = {v.name: v for v in HOSTED_VOICES}


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a requested voice name speaks with.

    Attributes:
        requested: the name as the client gave it.
        voice_id: the installed voice that speaks it.
        alias: ``requested`` is not the voice's own id (a hosted name or an alias).
        source: ``"voice"`` (its own id), ``"alias"`` (an alias the voice declares),
            ``"operator"`` (the operator's map) or ``"default"`` (the default map).
    """

    requested: str
    voice_id: str
    alias: bool
    source: str

    def warning(self, param: str) -> dict[str, str] | None:
        """The ``warnings`` entry that tells a client its name is an alias (``None``: not one)."""
        if not self.alias:
            return None
        return {
            "param": param,
            "code": "voice_alias",
            "message": f"voice {self.requested!r} is a name of the hosted catalogue; this "
            f"server speaks it with the voice {self.voice_id!r}",
        }


def default_target(hosted: HostedVoice, voices: Iterable[Voice]) -> str | None:
    """The installed voice a hosted name speaks with by default.

    The first of ``voices`` (in their order) matching the name's language and gender,
    then its language alone, then its gender among English voices, then the first voice.
    """
    voices = list(voices)
    if not voices:
        return None
    lang = hosted.accent.split("-")[0].lower()

    def language(v: Voice) -> str:
        return v.language.lower()

    def same_accent(v: Voice) -> bool:
        return language(v) in (hosted.accent.lower(), lang) or language(v).startswith(lang + "-")

    exact = hosted.accent.lower()
    for match in (
        lambda v: language(v) == exact and v.gender == hosted.gender,
        lambda v: same_accent(v) and v.gender == hosted.gender,
        same_accent,
        lambda v: language(v).startswith("en") and v.gender == hosted.gender,
        lambda v: language(v).startswith("en"),
    ):
        found = [v for v in voices if match(v)]
        if found:
            return found[0].id
    return voices[0].id


class VoiceMap:
    """The hosted names (and the installed voices' own ids) a server's TTS engine speaks.

    Args:
        engine: the TTS engine's name (``piper``, ``espeak``, ``openai`` …).
        voices: that engine's voices (installed or not: ids agents may name).
        overrides: the operator's map, name -> voice id of ``voices``.

    Raises:
        ValueError: an override names a voice the engine does not have.
    """

    def __init__(
        self, engine: str, voices: Iterable[Voice], overrides: Mapping[str, str] | None = None
    ) -> None:
        self.engine = engine
        self.voices = list(voices)
        ids = {v.id for v in self.voices}
        self.overrides = dict(overrides or {})
        for name, target in self.overrides.items():
            if target not in ids:
                raise ValueError(
                    f"voice map: {name!r} -> {target!r}: the {engine} engine has no voice "
                    f"{target!r} (voices: {', '.join(sorted(ids)) or 'none'})"
                )

    def names(self) -> frozenset[str]:
        """Every name that resolves (hosted names, overrides, voice ids and aliases)."""
        own = {n for v in self.voices for n in (v.id, *v.aliases)}
        if not self.voices:
            return frozenset(own)
        return frozenset(own | set(_BY_NAME) | set(self.overrides))

    def resolve(self, name: str) -> Resolved | None:
        """What ``name`` speaks with (``None``: an unknown name)."""
        if name in self.overrides:
            return Resolved(name, self.overrides[name], name != self.overrides[name], "operator")
        for v in self.voices:
            if name == v.id:
                return Resolved(name, v.id, False, "voice")
        hosted = _BY_NAME.get(name)
        if hosted is not None:
            target = default_target(hosted, self.voices)
            return None if target is None else Resolved(name, target, True, "default")
        for v in self.voices:
            if name in v.aliases:
                return Resolved(name, v.id, True, "alias")
        return None

    def listing(self, installed: frozenset[str]) -> list[dict[str, object]]:
        """``GET /v1/voices``: the engine's voices, then each hosted name and its voice."""
        out: list[dict[str, object]] = [
            {"voice_id": v.id, "name": v.name, "language": v.language, "engine": v.engine,
             "gender": v.gender, "aliases": list(v.aliases), "installed": v.id in installed,
             "speaks_with": v.id}
            for v in self.voices
        ]  # fmt: skip
        for hosted in HOSTED_VOICES:
            resolved = self.resolve(hosted.name)
            if resolved is None:
                continue
            out.append({
                "voice_id": hosted.name, "name": hosted.name.capitalize(),
                "language": hosted.accent, "engine": self.engine, "gender": hosted.gender,
                "aliases": [], "installed": resolved.voice_id in installed,
                "speaks_with": resolved.voice_id, "mapped_by": resolved.source,
            })  # fmt: skip
        return out


def voice_map_from_env(env: Mapping[str, str], engine: str, voices: Iterable[Voice]) -> VoiceMap:
    """The server's :class:`VoiceMap`: ``VOXLOOP_VOICE_MAP`` and ``VOXLOOP_VOICE_MAP_<ENGINE>``
    (JSON objects, name -> voice id; the engine's own map wins).

    Raises:
        ValueError: a map is not a JSON object of strings, or names a voice the engine lacks.
    """
    merged: dict[str, str] = {}
    for var in ("VOXLOOP_VOICE_MAP", f"VOXLOOP_VOICE_MAP_{engine.upper()}"):
        text = env.get(var, "").strip()
        if not text:
            continue
        try:
            table = json.loads(text)
        except ValueError:
            table = None
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in table.items()
        ):
            raise ValueError(f"{var} must be a JSON object of voice name -> voice id")
        merged.update(table)
    return VoiceMap(engine, voices, merged)
