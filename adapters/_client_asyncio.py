# send_message() on asyncio: streams, the standard ssl module (StreamWriter.start_tls for
# STARTTLS).
#
# The loop of adapters/_client_driver.py (SendJob); every read is bounded by the job's
# wait_time(), every drain() by ``timeout``.  To be re-exported by adapters/asyncio.py as
# ``send_message``.
from __future__ import annotations

import asyncio
import socket
import ssl
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
    """Send one message over SMTP (asyncio).

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
    loop = asyncio.get_running_loop()
    if config is None:
        fqdn = local_hostname
        if fqdn is None:
            fqdn = str(await loop.run_in_executor(None, socket.getfqdn))
        config = ClientConfig(local_hostname=fqdn)
    context = client_context(tls_context) if mode != "none" else None
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host,
            port or DEFAULT_PORTS[mode],
            ssl=context if mode == "implicit" else None,
            server_hostname=host if mode == "implicit" else None,
        ),
        timeout,
    )
    try:
        job = SendJob(
            prepared, tls=mode, auth=auth, config=config, timeout=timeout, now=loop.time()
        )
        while True:
            while out := job.data_to_send():  # all of it: DATA content comes in pieces
                writer.write(out)
                await asyncio.wait_for(writer.drain(), timeout)
            if job.done:
                break
            if job.wants_tls:
                assert context is not None
                await asyncio.wait_for(writer.start_tls(context, server_hostname=host), timeout)
                job.tls_established()
                continue
            try:
                data = await asyncio.wait_for(
                    reader.read(READ_SIZE), max(job.wait_time(loop.time()), 0.001)
                )
            except TimeoutError:
                job.check_timeout(loop.time())
                continue
            except (ConnectionError, ssl.SSLError) as exc:
                job.connection_failed(exc)
                continue
            if data:
                job.receive_data(data, now=loop.time())
            else:
                job.receive_eof()
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        except (OSError, ssl.SSLError, TimeoutError):
            pass
    return job.outcome()
