# Work a handler hands to another thread (a group commit of the spool, a password hash of
# AUTH) comes back as a concurrent.futures.Future; the driver takes Replies and awaitables.
# when_done() bridges the two once, for every handler:
#
#   * on asyncio and trio (a loop is running in this thread) it returns an awaitable, so the
#     loop serves other sessions while the work runs;
#   * on threads it blocks the connection's own thread and returns the result directly.
#
# Wake-ups are batched per event loop (_Wakeups): a group commit releases many sessions at
# once, and waking the loop once per message (a write to its self-pipe, an extra loop
# iteration) cost more CPU than storing the message.  Cancelling the awaiting session does
# not cancel the work: a commit that finishes is still a stored message.
from __future__ import annotations

import concurrent.futures
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # asyncio and trio are looked up when called: importing loads neither
    import asyncio

T = TypeVar("T")


class _Wakeups:
    """Runs callbacks on an event loop for other threads, with one wake-up of the loop for
    all the callbacks that arrive before it runs them.

    Args:
        call_soon_threadsafe: the loop's thread-safe scheduler (asyncio's
            ``loop.call_soon_threadsafe`` or trio's ``token.run_sync_soon``).
    """

    def __init__(self, call_soon_threadsafe: Callable[[Callable[[], None]], object]) -> None:
        self._schedule = call_soon_threadsafe
        self._lock = threading.Lock()
        self._ready: list[Callable[[], None]] = []
        self._scheduled = False

    def add(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the loop soon (from any thread)."""
        with self._lock:
            self._ready.append(callback)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._schedule(self._run)
        except Exception:  # the loop is gone (closed asyncio loop, finished trio run)
            with self._lock:
                self._scheduled = False

    def _run(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for callback in ready:
            callback()


# per event loop (asyncio loop or trio token); forgotten with the loop
_WAKEUPS: weakref.WeakKeyDictionary[object, _Wakeups] = weakref.WeakKeyDictionary()
_WAKEUPS_LOCK = threading.Lock()


def _wakeups(loop: object, schedule: Callable[[Callable[[], None]], object]) -> _Wakeups:
    with _WAKEUPS_LOCK:
        wakeups = _WAKEUPS.get(loop)
        if wakeups is None:
            wakeups = _WAKEUPS[loop] = _Wakeups(schedule)
        return wakeups


def when_done(
    future: concurrent.futures.Future[Any], then: Callable[[concurrent.futures.Future[Any]], T]
) -> Any:
    """``then(future)`` once ``future`` is done, in the form the driver accepts from a handler.

    Args:
        future: work running on another thread.
        then: turns the finished future into the handler's answer (it reads the result or the
            exception itself).

    Returns:
        An awaitable of ``then(future)`` when called on a running asyncio loop or trio run;
        else ``then(future)`` itself, after blocking this thread until ``future`` is done.
    """
    aio = sys.modules.get("asyncio")  # not imported: no asyncio loop can be running
    if aio is not None:
        try:
            loop = aio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return _on_asyncio(loop, future, then)
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return _on_trio(trio, token, future, then)
    concurrent.futures.wait([future])
    return then(future)


async def _on_asyncio(
    loop: asyncio.AbstractEventLoop,
    future: concurrent.futures.Future[Any],
    then: Callable[[concurrent.futures.Future[Any]], T],
) -> T:
    wakeups = _wakeups(loop, loop.call_soon_threadsafe)
    waiter = loop.create_future()

    def ready() -> None:  # on the loop; the session may have been cancelled meanwhile
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(lambda _: wakeups.add(ready))
    await waiter
    return then(future)


async def _on_trio(
    trio: Any,
    token: Any,
    future: concurrent.futures.Future[Any],
    then: Callable[[concurrent.futures.Future[Any]], T],
) -> T:
    wakeups = _wakeups(token, token.run_sync_soon)
    done = trio.Event()
    future.add_done_callback(lambda _: wakeups.add(done.set))
    await done.wait()
    return then(future)
