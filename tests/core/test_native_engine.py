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
    assert loop.COMPILED is True
    _stops_where_the_reader_does(mod.Engine, loop.replay_segment)
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


def replay_segment_module() -> Any:
    import core.engine.replay as mod

    return mod


def _stops_where_the_reader_does(engine_cls: Any, loop: Any) -> None:
    """A replay loop takes every whole, intact record in order and stops at the first that is not:
    a damaged payload byte, a damaged length, a seq out of order, a torn last record."""
    from core.recovery import JournalRecord, _rec_dec, encode_record
    from core.wal import SEGMENT_HEADER_SIZE
    from core.wal import encode_record as frame

    stream = [SequencedCommand(seq=i, ts_ms=1_700_000_000_000 + i, fencing_token=1, correlation_id=f"s{i}",
                               command=Deposit(account_id=7, asset="USDT", amount=i))
              for i in range(1, 7)]
    recs = [frame(sc.seq, encode_record(JournalRecord(sc.seq + 2**33, sc))) for sc in stream]
    starts = [SEGMENT_HEADER_SIZE + sum(len(r) for r in recs[:i]) for i in range(len(recs) + 1)]

    def run(data: bytes) -> tuple[int, int, int]:
        eng = engine_cls()
        keys: list[int] = []
        off, expected, _ts, applied, _src = loop(eng, data, SEGMENT_HEADER_SIZE, 1, 1, 1 << 62, _rec_dec.decode,
                                                 keys, [], None, None, 0, 0)
        assert keys == [sc.seq + 2**33 for sc in stream[:applied]]
        return off, expected, applied

    whole = bytes(SEGMENT_HEADER_SIZE) + b"".join(recs)
    assert run(whole) == (starts[6], 7, 6)
    payload_byte = bytearray(whole)
    payload_byte[starts[4] - 3] ^= 0x40  # inside record 4's payload
    assert run(bytes(payload_byte)) == (starts[3], 4, 3)
    length = bytearray(whole)
    length[starts[2] + 5] ^= 0x01  # record 3's length, second byte
    assert run(bytes(length)) == (starts[2], 3, 2)
    order = bytes(SEGMENT_HEADER_SIZE) + recs[0] + recs[2]
    assert run(order) == (starts[1], 2, 1)
    assert run(whole[: starts[5] + 9]) == (starts[5], 6, 5)  # torn inside record 6's header
    assert run(whole[:-1]) == (starts[5], 6, 5)  # torn inside record 6's payload
    # seqs past 32 bits (records below apply_from are checked and walked, not applied)
    base = 0x0102_0304_0506_0708  # every byte of it differs
    high = bytes(SEGMENT_HEADER_SIZE) + b"".join(frame(base + i, r[20:]) for i, r in enumerate(recs))
    off, expected, _ts, applied, _src = loop(engine_cls(), high, SEGMENT_HEADER_SIZE, base, 1 << 62, 1 << 62,
                                             _rec_dec.decode, [], [], None, None, 0, 0)
    assert (off, expected, applied) == (len(high), base + 6, 0)


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
        assert rreplay.COMPILED is True and replay_segment_module().COMPILED is False
        _stops_where_the_reader_does(rengine.Engine, rreplay.replay_segment)  # the byte-by-byte header reads
        _stops_where_the_reader_does(PureEngine, replay_segment_module().replay_segment)
        assert native.verify(rengine, seeds=(5,), commands=1_500, replay=rreplay.replay_segment)["commands"] > 1_500
    finally:
        for name in [m for m in sys.modules if m == native.PACKAGE or m.startswith(native.PACKAGE + ".")]:
            del sys.modules[name]
