"""Children never outlive the server's main process: each watches its parent and exits when it is gone.

A `kill -9` of the main process runs none of its shutdown, so without this its API servers would keep the port (and
answer /health 200 with nothing behind them) and its workers would wait forever. Linux's PR_SET_PDEATHSIG would be
quicker, but it fires when the *thread* that started the child ends, and replacements are started by monitor
threads that end at shutdown, while those children are still draining; a watch of the parent's pid has no such
trap and costs one getppid() every 0.2 s.
"""

from __future__ import annotations

import os
import sys
import threading
import time

INTERVAL = 0.2  # seconds between looks: the port is free again within about this long after the main process dies
# (this process, the parent it watches): a forked child inherits the value but not the thread
_following: tuple[int, int] | None = None


def follow(parent: int) -> None:
    """In a child of the server: exit at once when `parent` (the main process's pid) is no longer our parent."""
    global _following
    if _following == (os.getpid(), parent):
        return
    _following = (os.getpid(), parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(INTERVAL)
        print(f"modelship: the server's main process ({parent}) is gone; process {os.getpid()} exits", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, name="modelship-lifeline", daemon=True).start()


def follow_in_forked_children() -> None:
    """Every process this one forks from now on (LitServe's Manager, the API servers) follows it."""
    parent = os.getpid()
    os.register_at_fork(after_in_child=lambda: follow(parent))
