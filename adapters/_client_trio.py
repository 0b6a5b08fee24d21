# send_message() on trio: trio.open_tcp_stream, trio.SSLStream over the standard ssl module
# (for implicit TLS and for STARTTLS alike).
#
# The loop of adapters/_client_driver.py (SendJob); every read is bounded by the job's
# wait_time(), every write by ``timeout``.  To be re-exported by adapters/trio.py as
# ``send_message``.
from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from email.message import Message

import trio

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


async def send_message(
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
    """Send one message over SMTP (trio).

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
        OSError: the connection failed; trio.BrokenResourceError wrapping
            ssl.SSLCertVerificationError on a bad certificate.
        TimeoutError: connecting took longer than ``timeout``.
        ValueError: no envelope could be worked out, or a bad ``tls``.
    """
    mode = check_tls_mode(tls)
    prepared = prepare(message, sender=sender, recipients=recipients)
    if config is None:
        fqdn = local_hostname
        if fqdn is None:
            fqdn = str(await trio.to_thread.run_sync(socket.getfqdn))
        config = ClientConfig(local_hostname=fqdn)
    context = client_context(tls_context) if mode != "none" else None
    with trio.fail_after(timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port or DEFAULT_PORTS[mode])
        if mode == "implicit":
            assert context is not None
            stream = trio.SSLStream(stream, context, server_hostname=host)
            await stream.do_handshake()
    try:
        job = SendJob(
            prepared, tls=mode, auth=auth, config=config, timeout=timeout, now=trio.current_time()
        )
        while True:
            while out := job.data_to_send():  # all of it: DATA content comes in pieces
                with trio.fail_after(timeout):
                    await stream.send_all(out)
            if job.done:
                break
            if job.wants_tls:
                assert context is not None
                stream = trio.SSLStream(stream, context, server_hostname=host)
                with trio.fail_after(timeout):
                    await stream.do_handshake()
                job.tls_established()
                continue
            data = None
            with trio.move_on_after(max(job.wait_time(trio.current_time()), 0.001)):
                try:
                    data = await stream.receive_some(READ_SIZE)
                except trio.BrokenResourceError as exc:
                    job.connection_failed(exc)
                    continue
            if data is None:
                job.check_timeout(trio.current_time())
            elif data:
                job.receive_data(bytes(data), now=trio.current_time())
            else:
                job.receive_eof()
    finally:
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    return job.outcome()
