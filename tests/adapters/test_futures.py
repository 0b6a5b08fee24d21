"""when_done(): work finished on another thread comes back to the handler's runtime."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import trio

from mailwire.adapters._futures import when_done


def _result(future: concurrent.futures.Future[Any]) -> Any:
    return future.result()


def test_on_threads_it_blocks_and_returns_the_answer() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert when_done(pool.submit(lambda: 42), _result) == 42


def test_on_asyncio_one_loop_wakeup_serves_a_whole_batch() -> None:
    calls: list[object] = []

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counting(callback: Any, *args: Any) -> Any:
            calls.append(callback)
            return real(callback, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign,assignment]
        futures: list[concurrent.futures.Future[int]] = [
            concurrent.futures.Future() for _ in range(10)
        ]
        waiting = [asyncio.ensure_future(when_done(f, _result)) for f in futures]
        await asyncio.sleep(0)  # every session is waiting now

        def commit() -> None:  # a group commit: the whole batch at once, from its thread
            for i, f in enumerate(futures):
                f.set_result(i)

        thread = threading.Thread(target=commit)
        thread.start()
        thread.join()
        return list(await asyncio.gather(*waiting))

    assert asyncio.run(main()) == list(range(10))
    assert len(calls) == 1  # not one self-pipe write per message


def test_on_trio_the_answer_comes_back_and_errors_reach_then() -> None:
    async def main() -> tuple[Any, Any]:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            ok = await when_done(pool.submit(lambda: "queued"), _result)

            def boom() -> None:
                raise OSError("disk full")

            failed = await when_done(pool.submit(boom), lambda f: repr(f.exception()))
        return ok, failed

    assert trio.run(main) == ("queued", "OSError('disk full')")
