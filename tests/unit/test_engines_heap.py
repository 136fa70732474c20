"""A worker's heap is settled once its engines are loaded: what start-up made is frozen
out of the garbage collector's full collections."""

from __future__ import annotations

import gc

from runtime.endpoints import URLPolicy
from runtime.sessions.engines import Engines
from runtime.speech.engines.registry import RemoteOptions


async def test_the_engines_load_freezes_what_start_up_made():
    remote = RemoteOptions("http://127.0.0.1:9/v1", policy=URLPolicy(allow_private=True))
    engines = Engines("openai", "openai", stt_remote=remote, tts_remote=remote)
    gc.unfreeze()
    try:
        made_before: object = type("StartUp", (), {})()  # tracked, as start-up's are
        assert gc.get_freeze_count() == 0
        engines.start()
        assert engines._task is not None
        await engines._task
        assert engines.ready and engines.problem is None
        assert gc.get_freeze_count() > 0
        # Start-up's objects are out of reach of every collection from now on.
        assert all(made_before is not o for o in gc.get_objects(generation=2))
    finally:
        gc.unfreeze()
        await engines.aclose()
