"""One thread owns a served model: it loads it, compiles its step and runs every forward.

Torch runs a CPU op on several cores through OpenMP, and libgomp keeps a pool of worker threads for each
thread that has opened a parallel region, for as long as that thread lives. Two such threads on a 2-core
host make libgomp count more of its threads than there are cores, and it then cuts its workers' spin-wait
short: every parallel op of either thread wakes sleeping workers. A model loaded in the main thread and
decoded in the scheduler's thread decoded at half speed so (docs/experiment-log.md, issue 26). So the
scheduler's thread does all of it, from the load on, and the threads that ask for a model (the main
thread at start-up, a hot swap, an admin) only wait for it to be ready. A thread that exits frees its pool:
a retired version's scheduler stops slowing the others once it has drained.

    thread = start_owner("chatfactory-scheduler", setup=lambda: load_and_compile(), loop=serve_forever)
    # returns once setup has run in the new thread; setup's exception is raised here
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_owner(name: str, setup: Callable[[], None], loop: Callable[[], None]) -> threading.Thread:
    """A daemon thread that runs ``setup()`` then ``loop()``. Returns once ``setup`` has finished in it;
    an exception from ``setup`` is raised in the caller (and the thread ends without running ``loop``)."""
    ready, failed = threading.Event(), []

    def run() -> None:
        try:
            setup()
        except BaseException as e:  # handed to the caller, which waits for it
            failed.append(e)
            return
        finally:
            ready.set()
        loop()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    if failed:
        thread.join()
        raise failed[0]
    return thread
