"""The optional compiled engine: selected only when asked for, current and verified; the differential
check that gates a build catches an engine that differs; and a present build equals pure Python.

The engine suites themselves run against the compiled build with
``SPOTEX_ENGINE=native pytest tests/core`` (docs/engine.md): ``core.engine.Engine`` is then the
compiled class, and ``test_engine_impl_is_what_was_asked`` fails if it silently was not.
"""

from __future__ import annotations

import json
import logging
import os
import types
from pathlib import Path

import pytest

import core.engine
from core.engine import native
from core.engine.engine import Engine as PureEngine
from core.wire import Event, SequencedCommand, TradeExecuted


def test_default_is_the_pure_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOTEX_ENGINE", raising=False)
    assert native.select() is None
    monkeypatch.setenv("SPOTEX_ENGINE", "python")
    assert native.select() is None


def test_engine_impl_is_what_was_asked() -> None:
    asked = os.environ.get("SPOTEX_ENGINE", "python")
    expected = "native" if asked == "native" else "python"
    impl: str = core.engine.ENGINE_IMPL
    assert impl == expected
    if asked == "native":
        assert core.engine.Engine is not PureEngine
        assert str(getattr(__import__(core.engine.Engine.__module__, fromlist=["x"]), "__file__", "")).endswith(".so")


def test_missing_or_stale_build_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SPOTEX_ENGINE", "native")
    monkeypatch.setenv("SPOTEX_NATIVE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="core.engine.native"):
        assert native.select() is None
    assert "no verified build" in caplog.text
    caplog.clear()
    (tmp_path / "stamp.json").write_text(json.dumps({"source_sha256": "0" * 64, "verified": True}))
    with caplog.at_level(logging.WARNING, logger="core.engine.native"):
        assert native.select() is None
    assert "stale" in caplog.text
    caplog.clear()
    # current sources but never verified: refused too
    (tmp_path / "stamp.json").write_text(json.dumps({"source_sha256": native.source_digest(), "verified": False}))
    with caplog.at_level(logging.WARNING, logger="core.engine.native"):
        assert native.select() is None
    assert "stale" in caplog.text
    monkeypatch.setenv("SPOTEX_ENGINE", "rust")
    with caplog.at_level(logging.WARNING, logger="core.engine.native"):
        assert native.select() is None
    assert "not python or native" in caplog.text


class _FloorFeeEngine(PureEngine):
    """A subtly wrong engine: the taker fee of every 50th trade is one minor unit lower."""

    def apply(self, cmd: SequencedCommand) -> list[Event]:
        out = super().apply(cmd)
        for i, e in enumerate(out):
            if isinstance(e, TradeExecuted) and e.trade_id % 50 == 0 and e.taker_fee:
                import msgspec

                out[i] = msgspec.structs.replace(e, taker_fee=e.taker_fee - 1)
        return out


def test_the_differential_check_catches_a_different_engine() -> None:
    fake = types.SimpleNamespace(Engine=_FloorFeeEngine)
    with pytest.raises(AssertionError, match="events differ"):
        native.verify(fake, seeds=(1,), commands=1_500)  # type: ignore[arg-type]
    same = types.SimpleNamespace(Engine=PureEngine)
    assert native.verify(same, seeds=(1,), commands=300)["commands"] > 300  # type: ignore[arg-type]


def test_a_present_build_equals_the_pure_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTEX_ENGINE", "native")
    mod = native.select()
    if mod is None:
        pytest.skip(f"no current native build in {native.native_dir()} (spotex core build-native)")
    assert mod.Engine is not PureEngine
    res = native.verify(mod, seeds=(11, 12), commands=2_000)
    assert res["commands"] > 4_000
