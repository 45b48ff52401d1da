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
from typing import Any

import pytest

import core.engine
from benchmarks.bench_replay import run as replay_bench
from core.engine import native
from core.engine.engine import Engine as PureEngine
from core.wire import Deposit, Event, SequencedCommand, TradeExecuted


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


class _SilentSkipsCheckpointSeq(PureEngine):
    """Right with events on; with them off it forgets that a checkpoint takes a _sys seq."""

    def _checkpoint(self) -> None:
        if self.emitting:
            super()._checkpoint()


def _replay_with_an_extra_deposit(engine: Any, *args: Any) -> Any:
    """The replay loop, then one command the segment does not hold."""
    from core.engine.replay import replay_segment

    progress = replay_segment(engine, *args)
    engine.apply(SequencedCommand(seq=progress[1], ts_ms=0, fencing_token=1, correlation_id="x",
                                  command=Deposit(account_id=1_000, asset="USDT", amount=1)))
    return progress


def test_the_differential_check_catches_a_different_engine() -> None:
    fake = types.SimpleNamespace(Engine=_FloorFeeEngine)
    with pytest.raises(AssertionError, match="events differ"):
        native.verify(fake, seeds=(1,), commands=1_500)  # type: ignore[arg-type]
    fake = types.SimpleNamespace(Engine=_SilentSkipsCheckpointSeq)
    with pytest.raises(AssertionError, match="with events off ends in another state"):
        native.verify(fake, seeds=(1,), commands=300)  # type: ignore[arg-type]
    same = types.SimpleNamespace(Engine=PureEngine)
    with pytest.raises(AssertionError, match="replay loop over a WAL segment ends in another state"):
        native.verify(same, seeds=(1,), commands=300, replay=_replay_with_an_extra_deposit)  # type: ignore[arg-type]
    assert native.verify(same, seeds=(1,), commands=300)["commands"] > 300  # type: ignore[arg-type]


def _can_compile() -> str | None:
    """Why this machine cannot build C extensions, or None when it can (a C compiler and Python.h)."""
    import shutil
    import sysconfig

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python.h (the Python development headers)"
    return None


def test_a_present_build_equals_the_pure_engine(tmp_path_factory: pytest.TempPathFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled engine (the one that meets the brief's engine target) is built, verified and used
    wherever a C compiler exists, CI included: a current build in build/native is taken as it is;
    otherwise ``spotex core build-native --out`` builds one in a temporary directory, through the CLI
    an operator uses. Then it is selected, checked against the pure engine on other seeds, the
    engine benchmark runs on it, and so do the engine's golden and model-based suites."""
    from spotex.testing import spotex_cli

    monkeypatch.setenv("SPOTEX_ENGINE", "native")
    if native.select() is None:
        why = _can_compile()
        if why is not None:
            pytest.skip(f"no current native build in {native.native_dir()} and {why}")
        out = tmp_path_factory.mktemp("native")
        res = spotex_cli("core", "build-native", "--out", str(out), "--verify-commands", "1000", timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert "native_build_ok=true" in res.stdout
        monkeypatch.setenv("SPOTEX_NATIVE_DIR", str(out))
    mod = native.select()
    assert mod is not None
    assert mod.Engine is not PureEngine
    loop = native.replay_module()
    assert str(loop.__file__).endswith(".so")
    res_v = native.verify(mod, seeds=(11, 12), commands=2_000, replay=loop.replay_segment)
    assert res_v["commands"] > 4_000
    bench = spotex_cli("bench", "engine", "--commands", "20000", "--json", timeout=300)  # inherits the env set above
    assert bench.returncode == 0, bench.stderr
    out_b = json.loads(bench.stdout)
    assert out_b["engine_impl"] == "native" and out_b["commands"] == 20_000
    # A restart's replay through the compiled loop: same state hash as the pure engine's replay.
    replay = spotex_cli("bench", "replay", "--records", "20000", "--replay-events", "5000", "--json", timeout=300)
    assert replay.returncode == 0, replay.stderr
    out_r = json.loads(replay.stdout)
    assert out_r["engine_impl"] == "native" and out_r["records"] == 20_000
    assert out_r["state_hash"] == replay_bench(20_000, replay_events=5_000)["state_hash"]
    # The golden scenarios and the model-based test against the compiled class, in a child pytest
    # whose core.engine.Engine is the compiled one (the first test named checks that it is).
    import subprocess
    import sys

    here = Path(__file__).parent
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{here / 'test_native_engine.py'}::test_engine_impl_is_what_was_asked",
         str(here / "test_engine_golden.py"), str(here / "test_engine_model.py")],
        capture_output=True, text=True, timeout=600, cwd=here.parent.parent,
    )
    assert suite.returncode == 0, suite.stdout[-3000:]
    assert " passed" in suite.stdout and "skipped" not in suite.stdout


def test_the_rewritten_sources_are_the_same_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What build-native hands to mypyc, run uncompiled: ``Order`` becomes a dataclass whose explicit
    ``__init__`` takes exactly the Struct's fields (defaults included), and the engine built on it
    passes the same differential check a compiled build must pass. Needs no compiler."""
    import importlib
    import inspect
    import sys

    from core.engine import book

    pkg = tmp_path / native.PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in native._COMPILED:
        (pkg / name).write_text(native._rewrite((Path(book.__file__).parent / name).read_text()))
    assert f"from {native.PACKAGE}.engine import Engine" in (pkg / "replay.py").read_text()
    text = (pkg / "book.py").read_text()
    assert "@dataclass\nclass Order:" in text and "msgspec" not in text
    for name in [m for m in sys.modules if m == native.PACKAGE or m.startswith(native.PACKAGE + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rbook = importlib.import_module(f"{native.PACKAGE}.book")
        rengine = importlib.import_module(f"{native.PACKAGE}.engine")
        # written in the source (so mypyc compiles it), not generated by dataclasses at import time
        assert inspect.getsource(rbook.Order.__init__).lstrip().startswith("def __init__(self, order_id: int")
        fields = book.Order.__struct_fields__
        o = rbook.Order(*range(len(fields) - 1))
        assert [getattr(o, f) for f in fields] == [*range(len(fields) - 1), None]  # quote_amount defaults
        assert rengine.Order is rbook.Order
        rreplay = importlib.import_module(f"{native.PACKAGE}.replay")
        assert rreplay.Engine is rengine.Engine
        assert native.verify(rengine, seeds=(5,), commands=1_500, replay=rreplay.replay_segment)["commands"] > 1_500
    finally:
        for name in [m for m in sys.modules if m == native.PACKAGE or m.startswith(native.PACKAGE + ".")]:
            del sys.modules[name]
