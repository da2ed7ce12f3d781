"""What one client may cost the server, and how that is kept: ``ServerLimits`` (the numbers, passed to the
Service, the scheduler, the feedback store and the HTTP server), the client a request comes from, a
per-request budget, a token-bucket rate per client, and a small thread pool that keeps tokenizing and
template rendering off the event loop.

Why each exists (issue 24, a security review of serve/):

* one request of 32 prompts x ``n`` 8 filled the whole queue: a request may ask for at most
  ``max_request_generations`` generations (prompts x n, prompts scored counted too) and
  ``max_request_tokens`` completion tokens (default: the slots x the context, what the KV cache holds at
  once); one client may hold ``client_share`` of the queue (``Scheduler.max_client_waiting``), and the
  scheduler shares slots between clients (inference/batching.py);
* 500 KB of spelled special tokens took a second of tokenizing on the event loop, freezing every stream
  and /health: a prompt is refused past ``max_prompt_chars`` before it is tokenized (default: the context
  x the longest token's bytes, past which it cannot fit), and tokenizing runs in ``tokenize_threads``
  threads, at most ``max_tokenizing`` requests at once (429 past that);
* feedback had no limits: ``feedback_per_minute`` per client (a token bucket of ``feedback_burst``), at
  most ``feedback_rows_per_conversation`` rows per conversation, and the export pairs at most
  ``feedback_pairs_per_conversation`` per conversation (serve/feedback.py);
* slow clients held connections: headers must arrive within ``header_timeout`` s, a body within
  ``body_timeout`` s; at most ``max_connections`` connections, ``max_client_connections`` from one
  address (serve/server.py).

A client is its IP address (an IPv4-mapped IPv6 address counts as the IPv4 one). Behind a reverse proxy
every request comes from the proxy: set ``client_share`` to 1 and the per-client limits apply to all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .protocol import APIError


@dataclass(frozen=True)
class ServerLimits:
    max_waiting: int = 256  # generations and prompts to score queued, all clients together
    client_share: float = 0.5  # of max_waiting one client may hold, waiting and running
    max_request_generations: int = 64  # prompts x n (and prompts scored) of one request
    max_request_tokens: int | None = None  # prompts x n x max_tokens of one request; None: slots x context
    max_prompt_chars: int | None = None  # None: the context x the longest token's bytes
    tokenize_threads: int = 2
    # requests tokenizing (or building an answer) or waiting for a thread to: a bound on queued work, not on
    # clients, so well above the concurrent clients a server holds (at 16, 32 streaming clients got 429s)
    max_tokenizing: int = 128
    feedback_per_minute: float = 60.0  # per client
    feedback_burst: int = 20
    feedback_rows_per_conversation: int = 64
    feedback_pairs_per_conversation: int = 64
    header_timeout: float = 10.0  # seconds from connecting (or the last answer) to a request's full headers
    body_timeout: float = 30.0  # seconds to read a request's whole body
    keep_alive: float = 5.0  # an idle connection closes after this many seconds
    max_connections: int = 512
    max_client_connections: int = 64

    def __post_init__(self):
        for name in ("max_waiting", "max_request_generations", "tokenize_threads", "max_tokenizing",
                     "feedback_burst", "feedback_rows_per_conversation", "feedback_pairs_per_conversation",
                     "max_connections", "max_client_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.client_share <= 1:
            raise ValueError(f"ServerLimits.client_share must be in (0, 1], got {self.client_share}")
        if min(self.feedback_per_minute, self.header_timeout, self.body_timeout, self.keep_alive) <= 0:
            raise ValueError("ServerLimits: rates and timeouts must be positive")

    @property
    def max_client_waiting(self) -> int:
        return max(1, int(self.max_waiting * self.client_share))


def client_of(request) -> str:
    """The address a request comes from, as one client (an IPv4-mapped IPv6 address as the IPv4 one)."""
    host = request.client.host if request.client else ""
    return canonical_ip(host) or host


def canonical_ip(addr: str | None) -> str | None:
    """``addr`` as one spelling of its IP address (``::ffff:127.0.0.1`` -> ``127.0.0.1``), or None."""
    try:
        ip = ipaddress.ip_address((addr or "").strip("[]").split("%")[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


def request_budget(limits: ServerLimits, slots: int, context: int, prompts: int, n: int, max_tokens: int,
                   explicit: bool, scored: int = 0) -> int:
    """A request's generations and tokens against the per-request budget -> the max_tokens to use (the
    default one shortened to fit; an explicit one past the budget is a 400 naming it)."""
    gens = (prompts * n if max_tokens > 0 else 0) + scored
    cap = limits.max_request_generations
    if gens > cap:
        parts = f"{prompts} prompt(s) x n={n}" + (f" + {scored} prompt(s) scored" if scored else "")
        raise APIError(400, f"this request asks for {gens} generations ({parts}); one request may ask for "
                            f"at most {cap}", "n" if n > 1 else "prompt", "request_too_large")
    budget = limits.max_request_tokens or slots * context
    if max_tokens * prompts * n > budget:
        if explicit:
            raise APIError(400, f"this request asks for {prompts * n * max_tokens} completion tokens ({prompts} "
                                f"prompt(s) x n={n} x max_tokens={max_tokens}); one request may ask for at most "
                                f"{budget}", "max_tokens", "request_too_large")
        max_tokens = max(1, budget // (prompts * n))
    return max_tokens


class RateLimiter:
    """A token bucket per client: ``per_minute`` refills, ``burst`` at most. Used on the event loop only."""

    def __init__(self, per_minute: float, burst: int):
        self.rate, self.burst = per_minute / 60.0, burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> float:
        """0.0 when ``client`` may go now (a token is taken), else the seconds until it may."""
        now = time.monotonic()
        tokens, then = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        if len(self.buckets) > 10_000:  # forget the clients whose buckets have refilled
            self.buckets = {c: (t, s) for c, (t, s) in self.buckets.items()
                            if t + (now - s) * self.rate < self.burst}
        if tokens >= 1.0:
            self.buckets[client] = (tokens - 1.0, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate


class WorkerPool:
    """CPU-bound request work (tokenizing, rendering the chat template) in ``threads`` threads, off the event
    loop, so that streams and /health go on meanwhile; past ``max_pending`` requests at once: 429."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="chatfactory-tokenize")
        self.max_pending, self.pending = max_pending, 0

    async def run(self, fn, *args, admitted: bool = False):
        """``fn(*args)`` in a thread; ``admitted``: the request was let in already (its answer), no 429."""
        if self.pending >= self.max_pending and not admitted:
            raise APIError(429, f"the server is busy tokenizing {self.pending} requests; retry later",
                           code="server_busy", retry_after=1)
        self.pending += 1  # on the event loop only: no lock
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
