"""The pure matching engine: :class:`Engine` applies sequenced commands and returns events.

No I/O, no wall clock, deterministic. See docs/engine.md.

``SPOTEX_ENGINE=native`` selects the optional compiled build of the same code when a current,
verified one exists (``spotex core build-native``; see :mod:`core.engine.native`); ``ENGINE_IMPL``
says which one is in use. The pure-Python engine is the default and the reference.
"""

from core.engine import native as _native
from core.engine.engine import SNAPSHOT_FORMAT, Engine, SequenceError
from core.engine.replay import replay_segment
from core.engine.views import BalanceView, BookView, OrderView

_compiled = _native.select()
if _compiled is not None:
    Engine = _compiled.Engine  # type: ignore[misc]  # same class, compiled (checked by build-native)
    SequenceError = _compiled.SequenceError  # type: ignore[misc]
    replay_segment = _native.replay_module().replay_segment
ENGINE_IMPL = "native" if _compiled is not None else "python"

__all__ = [
    "ENGINE_IMPL", "SNAPSHOT_FORMAT", "BalanceView", "BookView", "Engine", "OrderView", "SequenceError",
    "replay_segment",
]
