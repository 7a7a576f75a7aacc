"""What sessions keep between requests, bounded in total: `KeptViews`.

Gradio keeps each session's gr.State values in memory for up to SESSION_CAPACITY sessions (middleware.py),
an hour after the session's page closes. The page's word clicks need the last explained photo (a JPEG and a
heatmap per word, about 0.65 MB): kept in a session's state, a thousand sessions would hold 650 MB. So the
state holds only a key, and the views themselves live here, at most MAX_KEPT_BYTES of them: the least
recently used go first, and a click on a word of a view that went asks for the photo to be explained again.

    key = KEPT_VIEWS.put(view, size=bytes_it_holds)   # what gr.State keeps (handlers.ExplainedPhoto)
    view = KEPT_VIEWS.get(key)                          # None if it went
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

# 64 MB: about a hundred sessions' last views, the ones a user is likely still clicking on.
MAX_KEPT_BYTES = 64 * 2**20

VIEW_GONE = "This photo's view is no longer kept. Please caption the photo again to see where the model looked."


class KeptViews:
    """A least-recently-used store of objects by random key, at most `max_bytes` of them (thread-safe)."""

    def __init__(self, max_bytes: int = MAX_KEPT_BYTES):
        self.max_bytes, self.used = max_bytes, 0
        self._views: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, view, size: int) -> str:
        """Keep `view` (`size` bytes); -> its key, which no other session can guess."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._views[key] = (view, size)
            self.used += size
            while self.used > self.max_bytes and len(self._views) > 1:
                _, (_, dropped) = self._views.popitem(last=False)
                self.used -= dropped
        return key

    def get(self, key) -> object | None:
        if not isinstance(key, str):
            return None
        with self._lock:
            kept = self._views.get(key)
            if kept is None:
                return None
            self._views.move_to_end(key)
            return kept[0]

    def __len__(self) -> int:
        return len(self._views)


KEPT_VIEWS = KeptViews()  # the app's one store: its sessions' explained photos
