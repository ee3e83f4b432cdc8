"""Turn a stream of token bytes into text: whole UTF-8 characters only, and stop strings honoured.

Text that might be the start of a stop string is held back until it is known not to be, so a
streaming caller never sees part of a stop string.
"""
from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded but not yet released
        self.text = ""  # everything released so far
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release(final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        cut = None
        for s in self.stops:
            i = self._pending.find(s)
            if i >= 0 and (cut is None or i < cut):
                cut = i
        if cut is not None:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final or not self.stops:
            out, self._pending = self._pending, ""
        else:
            hold = 0
            for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                    if self._pending.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(out):]
        self.text += out
        return out
