"""Message transport helpers shared by the server's rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("fedlora")


def stream_replies(grid: Grid, messages: list[Message], timeout: float | None,
                   window: int | None = None) -> Iterator[Message]:
    """Push ``messages`` and yield each reply as soon as it arrives (until ``timeout`` seconds).

    ``window``: keep at most this many in flight, pushing the next as replies come back. The
    simulation engine's in-memory SuperLink scans every stored message for every node on each
    delivery pass, so thousands of messages at once cost nodes × messages per pass."""
    queue = list(messages)
    size = window or len(queue)
    pending = set(grid.push_messages(queue[:size]))
    queue = queue[size:]
    deadline = None if timeout is None else time.time() + timeout
    while (pending or queue) and (deadline is None or time.time() < deadline):
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if queue and len(pending) < size:
            free = size - len(pending)
            pending |= set(grid.push_messages(queue[:free]))
            queue = queue[free:]
        if pending:
            time.sleep(0.1)
    if pending or queue:
        log.warning("%d client(s) did not reply within %.0f s (stragglers dropped)", len(pending) + len(queue), timeout)
