"""The pure matching engine: :class:`Engine` applies sequenced commands and returns events.

No I/O, no wall clock, deterministic. See docs/engine.md.
"""

from core.engine.engine import SNAPSHOT_FORMAT, Engine, SequenceError
from core.engine.views import BalanceView, BookView, OrderView

__all__ = ["SNAPSHOT_FORMAT", "BalanceView", "BookView", "Engine", "OrderView", "SequenceError"]
