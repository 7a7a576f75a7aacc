"""Sharing the app fairly between clients: event bodies held in memory, and events in Gradio's queue.

A *client* is an address as the server sees it: `scope["client"]`, which uvicorn sets to the connection's
peer, or, when that peer is a trusted proxy (uvicorn's FORWARDED_ALLOW_IPS; by default only 127.0.0.1 and
::1), to the last address the proxy appended to X-Forwarded-For. That is all the app trusts about who sent
a request. On a Hugging Face Space app.py trusts the Space's proxies (`trust_space_proxies`), so that each
visitor is their own client; behind another proxy, set FORWARDED_ALLOW_IPS to its address. A *session* is
the session_hash a request carries; it is the client's to choose, so it only ever narrows a client's share.

- `BodyBudget`: event bodies are read whole to be checked; their bytes are counted as they arrive (an idle
  connection holds nothing), at most MAX_BUFFERED_PER_CLIENT per client and MAX_BUFFERED_EVENT_BYTES in all.
  The first SMALL_BODY_BYTES of each body count only against its client, so an ordinary request (a few
  settings and a file reference) never waits behind anyone else's bodies.
- `QueueLimits`: at the door of Gradio's queue, a bound per kind of work (each concurrency id), per client
  and per session, and inside it each kind's waiting line served round-robin across clients (`FairLine`),
  so one client's fifty queued events wait behind everyone else's first.
"""

from __future__ import annotations

import os
from collections import Counter

# ---- limits ---------------------------------------------------------------------------------------

# Event bodies being received at once from one client (each a JSON payload; a data: URL image is the largest).
MAX_BODIES_PER_CLIENT = 8
# Bytes of event bodies held at once: one data: URL image (28 MB) and change per client, four in all;
# parsing takes two or three times as much for a moment.
SMALL_BODY_BYTES = 64 * 1024
MAX_BUFFERED_PER_CLIENT = 32 * 2**20
MAX_BUFFERED_EVENT_BYTES = 4 * MAX_BUFFERED_PER_CLIENT
# Events in the queue (waiting or running). A page user has one at a time; an API client may send a few at
# once; 16 lets the load benchmark's 16 clients share one loopback address.
MAX_EVENTS_PER_CLIENT = 16
MAX_EVENTS_PER_SESSION = 4
# Each kind of work may have this many events waiting per slot of its concurrency limit (a kind with 2 slots:
# 32), so that no kind fills the queue for the others; one client at most half of a kind's line.
WAITING_PER_SLOT = 16

# ---- messages -----------------------------------------------------------------------------------

BUSY = "The server is busy receiving other requests. Please try again in a moment."
TOO_MANY_BODIES = "Too many requests from your address are being received at once. Please wait for them to finish."
TOO_MANY_EVENTS = ("You have too many requests waiting already (at most {limit} at once). "
                   "Please wait for them to finish before sending more.")
KIND_FULL = "Too many requests of this kind are waiting. Please try again in a minute."


class Refused(Exception):
    """A request refused for its share of the server; the message is for the user, the status for HTTP."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# On a Hugging Face Space every request reaches the app through the Space's own proxies, from private addresses.
SPACE_PROXY_NETWORKS = "127.0.0.0/8,::1,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"


def trust_space_proxies(environ=os.environ) -> None:
    """On a Space (SPACE_ID set), unless FORWARDED_ALLOW_IPS says otherwise, trust X-Forwarded-For from the Space's
    proxies, so that each visitor is their own client: uvicorn trusts only loopback by default, and every visitor
    would be the proxy's address, sharing one client's bounds. uvicorn takes the rightmost address no trusted
    proxy added, the one the proxies saw: a visitor's own X-Forwarded-For entries can't pose as another client."""
    if environ.get("SPACE_ID") and "FORWARDED_ALLOW_IPS" not in environ:
        environ["FORWARDED_ALLOW_IPS"] = SPACE_PROXY_NETWORKS


def client_address(scope) -> str:
    """The client a request is counted against (see the module doc: uvicorn's view, proxies included)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


# ---- event bodies ---------------------------------------------------------------------------------


class BodyBudget:
    """Bytes of event bodies held in memory now, counted as they arrive (single-threaded: the event loop's)."""

    def __init__(self):
        self.total = 0  # bytes beyond each body's first SMALL_BODY_BYTES
        self.by_client: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()

    def open(self, client: str) -> HeldBody:
        if self.bodies[client] >= MAX_BODIES_PER_CLIENT:
            raise Refused(429, TOO_MANY_BODIES)
        self.bodies[client] += 1
        return HeldBody(self, client)


class HeldBody:
    """One body's share of the BodyBudget: add() each chunk as it arrives, close() when done with the body."""

    def __init__(self, budget: BodyBudget, client: str):
        self.budget, self.client, self.size, self.closed = budget, client, 0, False

    def add(self, count: int) -> None:
        budget = self.budget
        shared = max(0, self.size + count - SMALL_BODY_BYTES) - max(0, self.size - SMALL_BODY_BYTES)
        if budget.by_client[self.client] + count > MAX_BUFFERED_PER_CLIENT:
            raise Refused(429, TOO_MANY_BODIES)
        if budget.total + shared > MAX_BUFFERED_EVENT_BYTES:
            raise Refused(503, BUSY)
        self.size += count
        budget.by_client[self.client] += count
        budget.total += shared

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        budget = self.budget
        budget.total -= max(0, self.size - SMALL_BODY_BYTES)
        budget.by_client[self.client] -= self.size
        budget.bodies[self.client] -= 1
        for counter in (budget.by_client, budget.bodies):
            if counter[self.client] <= 0:
                del counter[self.client]


# ---- Gradio's queue -------------------------------------------------------------------------------


def event_client(event) -> str:
    """The client of a queued Gradio event (its request's scope, as for every request here)."""
    request = getattr(event, "request", None)
    return client_address(getattr(request, "scope", {}) or {})


class FairLine(list):
    """A kind of work's waiting line in Gradio's queue, served round-robin across clients.

    Gradio appends each new event and takes the first; here an event goes in after every waiting event of
    the same or lower rank, its rank being how many of its client's events wait before it. So a client's
    n-th waiting event runs after every other client's n-th: a flood from one client delays only itself.
    """

    def append(self, event) -> None:
        client = event_client(event)
        rank = sum(1 for waiting in self if event_client(waiting) == client)
        ranks: Counter[str] = Counter()
        position = 0
        for index, waiting in enumerate(self):
            waiting_rank = ranks[event_client(waiting)]
            ranks[event_client(waiting)] += 1
            if waiting_rank <= rank:
                position = index + 1
        self.insert(position, event)


class QueueLimits:
    """Who may add an event to Gradio's queue (bounds per kind, client and session), and its fair lines."""

    def __init__(self, blocks):
        self.blocks = blocks

    @property
    def queue(self):
        return getattr(self.blocks, "_queue", None)

    def admit(self, fn, client: str, session: str | None) -> None:
        """Raise Refused if `client` (and `session`) may not queue another event for `fn` now."""
        queue = self.queue
        if queue is None or not getattr(fn, "queue", False):
            return
        line = self._line(fn)
        events = list(queue.event_ids_to_events.values())  # every event not yet finished: waiting or running
        mine = [event for event in events if event_client(event) == client]
        if len(mine) >= MAX_EVENTS_PER_CLIENT:
            raise Refused(429, TOO_MANY_EVENTS.format(limit=MAX_EVENTS_PER_CLIENT))
        if session and sum(1 for event in events if event.session_hash == session) >= MAX_EVENTS_PER_SESSION:
            raise Refused(429, TOO_MANY_EVENTS.format(limit=MAX_EVENTS_PER_SESSION))
        slots = line.concurrency_limit or 1
        waiting_bound = WAITING_PER_SLOT * slots
        if sum(1 for event in line.queue if event_client(event) == client) >= max(1, waiting_bound // 2):
            raise Refused(429, TOO_MANY_EVENTS.format(limit=max(1, waiting_bound // 2)))
        if len(line.queue) >= waiting_bound:
            raise Refused(503, KIND_FULL)

    def _line(self, fn):
        """fn's kind of work in Gradio's queue (created now if Gradio hasn't yet), its waiting line made fair."""
        queue = self.queue
        queue.create_event_queue_for_fn(fn)
        line = queue.event_queue_per_concurrency_id[fn.concurrency_id]
        if not isinstance(line.queue, FairLine):
            line.queue = FairLine(line.queue)
        return line
