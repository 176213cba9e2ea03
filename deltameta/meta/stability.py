"""Flag meta-gradient spikes: outer steps whose meta-gradient norm jumps far above the recent norms.

A spike is finite, so the non-finite guards of the trainer let it through and ``meta_clip`` scales
it down to the clip norm (``meta_clip=0`` lets it through whole); training goes on, but a run with
many spikes has usually left the region where the meta-gradient is informative (second-order MAML
and task-count studies showed runs whose norm went from about 10 to thousands while the
pre-adaptation loss climbed). The trainer reports each spike and counts them, so the run's summary
says whether training was unstable.
"""

from __future__ import annotations

import collections
import statistics
from typing import Any

SPIKE_FACTOR = 10.0
"""A norm above this multiple of the median of the recent norms is a spike."""
WINDOW = 20
"""How many recent outer steps the median is taken over."""
MIN_HISTORY = 5
"""No step is called a spike before this many norms have been seen."""


class GradSpikeMonitor:
    """Counts meta-gradient norms far above the median of the last ``window`` norms.

    Args:
        factor: A norm above ``factor`` times the recent median is a spike.
        window: The number of recent norms the median is taken over (spikes included: the median
            is robust to the few that enter it).
        min_history: Norms seen before any step can be called a spike.
    """

    def __init__(self, factor: float = SPIKE_FACTOR, window: int = WINDOW, min_history: int = MIN_HISTORY) -> None:
        if factor <= 1 or window < 1 or not 1 <= min_history <= window:
            raise ValueError(f"need factor > 1 and 1 <= min_history <= window; got factor={factor}, "
                             f"window={window}, min_history={min_history}")
        self.factor = factor
        self.min_history = min_history
        self.recent: collections.deque[float] = collections.deque(maxlen=window)
        self.spikes = 0

    def update(self, norm: float) -> float | None:
        """Record one outer step's (pre-clip, finite) meta-gradient norm.

        Args:
            norm: The norm of the whole meta-gradient before clipping.

        Returns:
            ``norm`` divided by the recent median when the step is a spike, else ``None``.
        """
        ratio = None
        if len(self.recent) >= self.min_history:
            median = statistics.median(self.recent)
            if median > 0 and norm > self.factor * median:
                ratio = norm / median
                self.spikes += 1
        self.recent.append(float(norm))
        return ratio

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run flags the same steps."""
        return {"recent": list(self.recent), "spikes": self.spikes}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` output (``None``: a checkpoint written before spikes were tracked)."""
        state = state or {}
        self.recent.clear()
        self.recent.extend(float(x) for x in state.get("recent") or ())
        self.spikes = int(state.get("spikes") or 0)
