"""Message transport helpers shared by the server's rounds."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger("fedlora")


def stream_replies(grid: Grid, messages: list[Message], timeout: float | None) -> Iterator[Message]:
    """Push ``messages`` and yield each reply as soon as it arrives (until ``timeout`` seconds)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.time() + timeout
    while pending and (deadline is None or time.time() < deadline):
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending:
            time.sleep(0.1)
    if pending:
        log.warning("%d client(s) did not reply within %.0f s (stragglers dropped)", len(pending), timeout)
