"""Optional compiled build of the engine (mypyc), never required; the pure-Python engine is the reference.

``spotex core build-native`` copies ``book.py``, ``engine.py`` and ``replay.py`` (recovery's loop
over a WAL segment) into ``build/native/src/`` as the package ``spotex_native_engine`` (only their
imports of each other are rewritten; events, views, the wire contract and the WAL reader stay the
shared pure-Python code), compiles them with mypyc (shipped with mypy, needs a C compiler), then
runs a differential check: seeded command streams applied by both engines must give byte-identical
events, equal state hashes and interchangeable snapshots, the compiled engine with its events off
(how recovery replays) must end in the same state, and the compiled replay loop over a WAL segment
must end in that state too. Only then does it
write ``build/native/stamp.json`` with the sha256 of the sources it compiled.

``SPOTEX_ENGINE=native`` makes ``core.engine.Engine`` (and ``core.engine.replay_segment``) the compiled
one, if a build exists whose stamp
matches the current sources (a stale build after an edit is refused, with a warning, never used);
otherwise the pure-Python engine is used and the reason is logged. Unset (the default) or
``python``: pure Python. ``SPOTEX_NATIVE_DIR`` overrides where the build lives.

Nothing here is imported by anything but ``core.engine`` at start-up and the CLI; imports stay
stdlib-only at module level so that ``core.engine`` can import this module first.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["PACKAGE", "build", "native_dir", "replay_module", "select", "source_digest", "verify"]

log = logging.getLogger("core.engine.native")

PACKAGE = "spotex_native_engine"
_SRC = Path(__file__).resolve().parent
_COMPILED = ("book.py", "engine.py", "replay.py")
_STAMP = "stamp.json"


def native_dir() -> Path:
    env = os.environ.get("SPOTEX_NATIVE_DIR")
    return Path(env).resolve() if env else _SRC.parent.parent / "build" / "native"


def source_digest() -> str:
    h = hashlib.sha256()
    for name in _COMPILED:  # what mypyc compiles: a change to the rewrite also makes a build stale
        h.update(name.encode() + b"\0" + _rewrite((_SRC / name).read_text()).encode() + b"\0")
    return h.hexdigest()


_ORDER_CLASS = re.compile(r"^class Order\(msgspec\.Struct, gc=False\):\n(?P<body>(?:    .*\n|\n)*?)(?=\n\S)", re.M)
_FIELD = re.compile(r"^    (?P<name>\w+): (?P<type>[^=\n]+?)(?: = (?P<default>.+))?$", re.M)


def _native_order(match: re.Match[str]) -> str:
    """``Order`` as a dataclass with an explicit ``__init__``: a native class under mypyc (direct
    attribute access) whose constructor is compiled too (the ``__init__`` that ``dataclasses``
    generates would run in the interpreter, ~5% of a command). The fields are read from the
    Struct's own declaration, so the two shapes cannot drift apart."""
    body = match.group("body")
    fields = [(f["name"], f["type"], f["default"]) for f in _FIELD.finditer(body)]
    if not fields:
        raise ValueError("class Order: no fields found to rewrite")
    params = ", ".join(f"{n}: {t}" + (f" = {d}" if d is not None else "") for n, t, d in fields)
    assigns = "".join(f"        self.{n} = {n}\n" for n, _t, _d in fields)
    return f"@dataclass\nclass Order:\n{body.rstrip()}\n\n    def __init__(self, {params}) -> None:\n{assigns}\n"


def _rewrite(text: str) -> str:
    """The compiled copy's only differences: it imports its own book, its replay loop says it is
    compiled (``replay.COMPILED``: it then reads record headers byte by byte), and ``Order`` is a dataclass
    with a compiled ``__init__`` (a native class under mypyc, with direct attribute access) instead
    of a msgspec Struct (the faster shape in pure Python). Order never leaves the engine, is never
    encoded, and compares field by field either way; the differential check in :func:`verify`
    covers the rest."""
    text = re.sub(r"^from core\.engine\.(book|engine) import", rf"from {PACKAGE}.\1 import", text, flags=re.M)
    text = re.sub(r"^COMPILED: Final = False$", "COMPILED: Final = True", text, flags=re.M)  # replay.py
    text, n = _ORDER_CLASS.subn(_native_order, text)
    if n:
        text = re.sub(r"^import msgspec$", "from dataclasses import dataclass", text, count=1, flags=re.M)
    return text


def _load(directory: Path) -> ModuleType:
    src = str(directory / "src")
    if src not in sys.path:
        sys.path.append(src)  # last: nothing of the project can be shadowed by it
    for name in ("engine", "replay"):
        mod = importlib.import_module(f"{PACKAGE}.{name}")
        if not str(getattr(mod, "__file__", "")).endswith(".so"):
            raise ImportError(f"{PACKAGE}.{name} in {src} is not compiled")
    return importlib.import_module(f"{PACKAGE}.engine")


def replay_module() -> ModuleType:
    """The compiled replay loop of the build :func:`select` loaded (call only after it did)."""
    return importlib.import_module(f"{PACKAGE}.replay")


def select() -> ModuleType | None:
    """The compiled engine module when ``SPOTEX_ENGINE=native`` and a current verified build
    exists; else None (and a warning saying why, when native was asked for)."""
    want = os.environ.get("SPOTEX_ENGINE", "python").strip().lower()
    if want in ("", "python", "pure"):
        return None
    if want != "native":
        log.warning("SPOTEX_ENGINE=%r is not python or native: using the pure-Python engine", want)
        return None
    directory = native_dir()
    try:
        stamp = json.loads((directory / _STAMP).read_text())
    except (OSError, ValueError):
        log.warning("SPOTEX_ENGINE=native but no verified build in %s (spotex core build-native): "
                    "using the pure-Python engine", directory)
        return None
    if stamp.get("source_sha256") != source_digest() or not stamp.get("verified"):
        log.warning("SPOTEX_ENGINE=native but the build in %s is stale (the engine sources changed "
                    "since it was compiled; run spotex core build-native): using the pure-Python engine",
                    directory)
        return None
    try:
        return _load(directory)
    except ImportError as exc:
        log.warning("SPOTEX_ENGINE=native but the build in %s does not load (%s): using the pure-Python "
                    "engine", directory, exc)
        return None


def verify(native: ModuleType, seeds: tuple[int, ...] = (1, 2, 3), commands: int = 3_000,
           replay: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Differential check of a compiled engine module against the pure-Python reference; ``replay``
    is the build's replay loop (default: the pure one, driving ``native.Engine``)."""
    import msgspec

    from core.engine.engine import Engine as Pure
    from core.engine.replay import replay_segment
    from core.sim import generate, sim_markets
    from core.wire import AddMarket, Command, SequencedCommand, WithdrawalsHalt

    loop: Callable[..., Any] = replay if replay is not None else replay_segment
    enc = msgspec.msgpack.Encoder()
    checked = 0
    for seed in seeds:
        cmds: list[Command] = [AddMarket(config=m) for m in sim_markets()]
        cmds += generate(seed, commands)
        cmds.append(WithdrawalsHalt(on=True, reason="verify"))
        pure, nat = Pure(checkpoint_every=97), native.Engine(checkpoint_every=97)
        silent = native.Engine(checkpoint_every=97)  # events off all along, as recovery replays
        silent.emit_events(False)
        half = len(cmds) // 2
        stream: list[SequencedCommand] = []
        for i, c in enumerate(cmds, 1):
            # the fencing token steps back once per stream: stale-command rejections are compared too
            token = 1 if i < half + 10 or i > half + 20 else 0
            sc = SequencedCommand(seq=i, ts_ms=1_700_000_000_000 + i, fencing_token=token, correlation_id=f"v{i}",
                                  command=c)
            stream.append(sc)
            a, b = enc.encode(pure.apply(sc)), enc.encode(nat.apply(sc))
            if silent.apply(sc):
                raise AssertionError(f"seed {seed}, seq {i}: the compiled engine built events with them off")
            if a != b:
                raise AssertionError(f"seed {seed}, seq {i}: events differ between the pure and compiled engines")
            if i == half:
                # snapshots are interchangeable both ways
                if pure.snapshot() != nat.snapshot():
                    raise AssertionError(f"seed {seed}: snapshots differ at seq {i}")
                pure = Pure.from_snapshot(nat.snapshot())
                nat = native.Engine.from_snapshot(pure.snapshot())
            checked += 1
        if pure.state_hash() != nat.state_hash():
            raise AssertionError(f"seed {seed}: state hashes differ")
        if silent.snapshot() != pure.snapshot():
            raise AssertionError(f"seed {seed}: the compiled engine with events off ends in another state")
        for oid in range(1, len(cmds) + 1, 7):
            if pure.order(oid) != nat.order(oid):
                raise AssertionError(f"seed {seed}: order {oid} differs")
        _verify_replay(native, loop, stream, pure.snapshot())
    return {"commands": checked, "seeds": list(seeds)}


def _verify_replay(native: ModuleType, replay: Callable[..., Any], stream: list[Any], want: bytes) -> None:
    """The build's replay loop over a WAL segment of ``stream`` (sequenced commands, seq 1 on) ends
    in the state ``want``; events go on half way."""
    from core.recovery import JournalRecord, _rec_dec, encode_record
    from core.wal import SEGMENT_HEADER_SIZE
    from core.wal import encode_record as frame

    data = bytes(SEGMENT_HEADER_SIZE) + b"".join(
        frame(sc.seq, encode_record(JournalRecord(sc.seq, sc))) for sc in stream
    )
    eng = native.Engine(checkpoint_every=97)
    eng.emit_events(False)
    keys: list[int] = []
    off, expected, _ts, applied, last_src = replay(eng, data, SEGMENT_HEADER_SIZE, 1, 1, len(stream) // 2,
                                                   _rec_dec.decode, keys, [], None, None, 0, 0)
    if (off, expected, applied, last_src) != (len(data), len(stream) + 1, len(stream), len(stream)) \
            or len(keys) != len(stream):
        raise AssertionError(f"the replay loop stopped at offset {off} (seq {expected}) of {len(data)}")
    if eng.snapshot() != want:
        raise AssertionError("the replay loop over a WAL segment ends in another state")


def build(directory: Path | None = None, *, verify_commands: int = 3_000) -> dict[str, Any]:
    """Compile, verify, stamp. Raises CalledProcessError (compiler output in it) or AssertionError."""
    directory = directory or native_dir()
    t0 = time.perf_counter()
    digest = source_digest()
    src = directory / "src"
    shutil.rmtree(directory, ignore_errors=True)
    pkg = src / PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Compiled copy of core/engine (book, engine): see core/engine/native.py."""\n')
    for name in _COMPILED:
        (pkg / name).write_text(_rewrite((_SRC / name).read_text()))
    repo = _SRC.parent.parent
    env = {**os.environ, "MYPYPATH": str(repo), "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, "-m", "mypyc", *(f"{PACKAGE}/{name}" for name in _COMPILED)],
        cwd=src, env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    shutil.rmtree(src / "build", ignore_errors=True)
    compiled_s = time.perf_counter() - t0
    mod = _load(directory)
    result = verify(mod, commands=verify_commands, replay=replay_module().replay_segment)
    stamp = {"source_sha256": digest, "verified": True, "python": sys.version.split()[0],
             "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "verify": result,
             "compile_seconds": round(compiled_s, 1)}
    (directory / _STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True))
    return {"native_dir": str(directory), **stamp}
