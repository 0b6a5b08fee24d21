# send_message() on plain threads: blocking sockets, the standard ssl module.
#
# The loop of adapters/_client_driver.py (SendJob) with socket timeouts: every wait is bounded
# by the job's wait_time() (the smaller of the caller's ``timeout`` and the engine's RFC 5321
# deadline); sendall() blocks until the kernel took the bytes (back-pressure), bounded by
# ``timeout`` too.  To be re-exported by adapters/threads.py as ``send_message``.
from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from email.message import Message

from mailwire.adapters._client_driver import (
    DEFAULT_PORTS,
    READ_SIZE,
    Credentials,
    SendJob,
    SendResult,
    check_tls_mode,
    client_context,
    prepare,
)
from mailwire.protocol._config import ClientConfig
from mailwire.protocol._events import MailFrom, RcptTo


def send_message(
    message: Message | bytes,
    *,
    host: str,
    port: int | None = None,
    sender: str | MailFrom | None = None,
    recipients: Sequence[str | RcptTo] | str | None = None,
    tls: str = "starttls",
    tls_context: ssl.SSLContext | None = None,
    auth: Credentials = None,
    timeout: float = 60.0,
    local_hostname: str | None = None,
    config: ClientConfig | None = None,
) -> SendResult:
    """Send one message over SMTP (blocking).

    Args:
        message: an email.message.EmailMessage (envelope from its headers, Bcc removed), or
            the content as bytes (then ``sender`` and ``recipients`` are required).
        host: the server's name or address (also the name its certificate must carry).
        port: the server's port; default 587 for starttls, 465 for implicit, else 25.
        sender: the envelope sender (str, or MailFrom for DSN parameters).
        recipients: the envelope recipients (str, or RcptTo for DSN parameters).
        tls: "starttls" (required, the default), "opportunistic", "implicit" or "none".
        tls_context: client SSLContext; default verifies certificate and host name.
        auth: (username, password) for AUTH PLAIN/LOGIN (only over TLS), or a SaslMechanism.
        timeout: seconds for the connection and for each reply.
        local_hostname: the EHLO argument (default: this host's FQDN).
        config: the client engine configuration (overrides local_hostname).

    Returns:
        The SendResult (some recipients may have been refused: see ``rejected``).

    Raises:
        SendError: no recipient got the message.
        OSError: the connection failed (ssl.SSLCertVerificationError: bad certificate).
        ValueError: no envelope could be worked out, or a bad ``tls``.
    """
    mode = check_tls_mode(tls)
    prepared = prepare(message, sender=sender, recipients=recipients)
    if config is None:
        config = ClientConfig(local_hostname=local_hostname or socket.getfqdn())
    context = client_context(tls_context) if mode != "none" else None
    sock = socket.create_connection((host, port or DEFAULT_PORTS[mode]), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio and trio do
    try:
        if mode == "implicit":
            assert context is not None
            sock = context.wrap_socket(sock, server_hostname=host)
        job = SendJob(
            prepared, tls=mode, auth=auth, config=config, timeout=timeout, now=time.monotonic()
        )
        while True:
            while out := job.data_to_send():  # all of it: DATA content comes in pieces
                sock.settimeout(timeout)
                sock.sendall(out)
            if job.done:
                break
            if job.wants_tls:
                assert context is not None
                sock.settimeout(timeout)
                sock = context.wrap_socket(sock, server_hostname=host)
                job.tls_established()
                continue
            sock.settimeout(max(job.wait_time(time.monotonic()), 0.001))
            try:
                data = sock.recv(READ_SIZE)
            except TimeoutError:
                job.check_timeout(time.monotonic())
                continue
            except (ConnectionError, ssl.SSLError) as exc:
                job.connection_failed(exc)
                continue
            if data:
                job.receive_data(data, now=time.monotonic())
            else:
                job.receive_eof()
    finally:
        sock.close()
    return job.outcome()
