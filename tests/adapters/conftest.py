"""Fixtures for the adapter tests: real servers on loopback, on every runtime.

``serve(handler, config, **options)`` starts a Controller on 127.0.0.1 with a kernel-assigned
port and returns it; teardown stops it and checks that no thread it started is left running.
A hung test must fail rather than hang: clients use socket timeouts, and a faulthandler
watchdog ends the run with a traceback dump if a single test exceeds WATCHDOG seconds.
"""

from __future__ import annotations

import faulthandler
import importlib
import ssl
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
import trustme

from mailwire.adapters._driver import BaseController, Handler, MessageHandler
from mailwire.protocol import Envelope, ServerConfig

RUNTIMES = ["asyncio", "trio", "threads"]
WATCHDOG = 60.0
CLIENT_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG, exit=True, file=2)  # the real stderr
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def adapter(runtime: str) -> ModuleType:
    return importlib.import_module(f"mailwire.adapters.{runtime}")


class Inbox(MessageHandler):
    """Accepts everything; keeps (bytes, envelope) of every message and the sessions seen."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, Envelope]] = []
        self.aborted = 0
        super().__init__(lambda data, env: self.messages.append((data, env)))

    def on_message_aborted(self, session: Any) -> None:
        self.aborted += 1
        super().on_message_aborted(session)


Serve = Callable[..., BaseController]


@pytest.fixture
def serve(adapter: ModuleType) -> Iterator[Serve]:
    before = set(threading.enumerate())
    controllers: list[BaseController] = []

    def start(
        handler: Handler | None = None, config: ServerConfig | None = None, **options: Any
    ) -> BaseController:
        controller: BaseController = adapter.Controller(
            handler if handler is not None else Inbox(),
            config if config is not None else ServerConfig(hostname="mx.test"),
            **options,
        )
        controller.start()
        controllers.append(controller)
        return controller

    yield start
    for controller in controllers:
        controller.stop()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(5)
    assert [t for t in leaked if t.is_alive()] == []


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
