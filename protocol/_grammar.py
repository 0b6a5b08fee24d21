# RFC 5321 / RFC 6531 address grammar, compiled once, plus the ESMTP parameter syntax.
#
# Strategy: the whole path is matched by one anchored regular expression (no hand-written
# character loops), then the length limits of RFC 5321 4.5.3.1 are checked on the UTF-8
# encoding, because the limits are in octets:
#
#   4.5.3.1.1  local-part   64 octets
#   4.5.3.1.2  domain      255 octets
#   4.5.3.1.3  path        256 octets "including the punctuation and element separators"
#
# Two grammars exist: plain RFC 5321 (ASCII only) and RFC 6531 (SMTPUTF8), which adds
# UTF8-non-ascii to atext, qtextSMTP and sub-domain (U-labels).  Which one applies is decided by
# the caller: the server uses the UTF-8 one only when the transaction carries SMTPUTF8.
#
# Source routes (A-d-l, "<@relay:user@example>") are obsolete but RFC 5321 4.1.1.3 says
# servers "MUST accept" them and "SHOULD ignore" the route: the route is matched and dropped.
#
# Errors are raised as GrammarError carrying the (code, enhanced code, text) the server should
# answer with, so the same parse is used by the server (which replies) and by event
# constructors (which turn it into LocalProtocolError).
from __future__ import annotations

import ipaddress
import re

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PATH = 256  # RFC 5321 4.5.3.1.3
MAX_LABEL = 63  # RFC 1035 2.3.4


class GrammarError(ValueError):
    """A syntax error, with the reply a server gives for it."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text


_UTF8_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"  # no lone surrogates
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"


def _build(utf8: bool) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    extra = _UTF8_NON_ASCII if utf8 else ""
    atom = f"[{_ATEXT}{extra}]+"
    dot_string = rf"{atom}(?:\.{atom})*"
    # qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = %d92 %d32-126
    quoted = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{extra}]|\\[\x20-\x7e])*"'
    let_dig = f"[A-Za-z0-9{extra}]"
    sub_domain = rf"{let_dig}(?:[A-Za-z0-9\-{extra}]*{let_dig})?"
    domain = rf"{sub_domain}(?:\.{sub_domain})*"
    # address-literal: IPv4, "IPv6:"..., or General-address-literal (tag ":" dcontent)
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"
    mailbox = rf"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})"
    adl = rf"@{domain}(?:,@{domain})*:"
    path = re.compile(rf"<(?:{adl})?{mailbox}>", re.ASCII)
    return path, re.compile(rf"{domain}", re.ASCII), re.compile(rf"{mailbox}", re.ASCII)


_PATH_ASCII, _DOMAIN_ASCII, _MAILBOX_ASCII = _build(False)
_PATH_UTF8, _DOMAIN_UTF8, _MAILBOX_UTF8 = _build(True)
_IPV4 = re.compile(r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}")
_GENERAL_TAG = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_POSTMASTER = re.compile(r"<postmaster>", re.IGNORECASE)


def _check_literal(literal: str) -> bool:
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    if _IPV4.fullmatch(inner):
        return True
    # General-address-literal: Standardized-tag ":" 1*dcontent (RFC 5321 4.1.3).  A tag that
    # looks like IPv6 was handled above, so a plain "1.2.3.999" is not accepted here.
    return bool(_GENERAL_TAG.fullmatch(inner)) and not inner[:1].isdigit()


def _check_domain(domain: str, errcode: str) -> None:
    if domain.startswith("["):
        if not _check_literal(domain):
            raise GrammarError(501, errcode, "Syntax error in address literal")
        return
    if len(domain) <= MAX_LABEL and domain.isascii():
        return  # the common case: nothing can be too long
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise GrammarError(501, errcode, "Domain name too long")
    for label in domain.split("."):
        if len(label.encode("utf-8")) > MAX_LABEL:
            raise GrammarError(501, errcode, "Domain label too long")


def parse_path(text: str, *, utf8: bool, recipient: bool) -> str:
    """Parse an RFC 5321 Path (with angle brackets) and return the mailbox.

    ``"<>"`` is *not* accepted here (callers handle the null reverse-path).  For recipients the
    special ``<Postmaster>`` (any case) is accepted and returned as ``"Postmaster"``.

    Raises:
        GrammarError: with 501 5.1.3 / 5.1.7 for bad syntax or lengths, 553 5.6.7 for
            non-ASCII addresses when ``utf8`` is false (RFC 6531 3.5).
    """
    errcode = "5.1.3" if recipient else "5.1.7"
    if recipient and _POSTMASTER.fullmatch(text):
        return "Postmaster"
    m = (_PATH_UTF8 if utf8 else _PATH_ASCII).fullmatch(text)
    if m is None:
        if not utf8 and not text.isascii() and _PATH_UTF8.fullmatch(text):
            raise GrammarError(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        what = "destination" if recipient else "sender"
        raise GrammarError(501, errcode, f"Bad {what} address syntax")
    local, domain = m.group("local"), m.group("domain")
    if text.isascii():
        if len(text) > MAX_PATH:
            raise GrammarError(501, errcode, "Path too long")
        if len(local) > MAX_LOCAL_PART:
            raise GrammarError(501, errcode, "Local part too long")
    elif len(text.encode("utf-8")) > MAX_PATH:
        raise GrammarError(501, errcode, "Path too long")
    elif len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise GrammarError(501, errcode, "Local part too long")
    _check_domain(domain, errcode)
    return f"{local}@{domain}"


def is_valid_mailbox(address: str, *, utf8: bool = True) -> bool:
    """True if ``address`` is a syntactically valid RFC 5321 Mailbox (``local@domain``)."""
    try:
        parse_path(f"<{address}>", utf8=utf8, recipient=False)
    except GrammarError:
        return False
    return True


def is_valid_domain(domain: str, *, utf8: bool = True) -> bool:
    """True if ``domain`` is an RFC 5321 Domain or address-literal."""
    if domain.startswith("["):
        return domain.endswith("]") and _check_literal(domain)
    if not (_DOMAIN_UTF8 if utf8 else _DOMAIN_ASCII).fullmatch(domain):
        return False
    try:
        _check_domain(domain, "5.5.2")
    except GrammarError:
        return False
    return True


def split_mailbox(address: str) -> tuple[str, str]:
    """Split ``local@domain``: at the last ``@`` (a quoted local part may contain ``@``), or,
    for an address literal (whose General-address-literal may itself contain ``@``), at the
    ``@`` that opens the literal."""
    if address.endswith("]"):
        at = address.rfind("@[")
        if at >= 0:
            return address[:at], address[at + 1 :]
    local, _, domain = address.rpartition("@")
    return local, domain


# --- ESMTP parameters (RFC 5321 4.1.2) -------------------------------------------------
#   esmtp-param   = esmtp-keyword ["=" esmtp-value]
#   esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
#   esmtp-value   = 1*(%d33-60 / %d62-126)        ; RFC 6531 adds UTF8-non-ascii
_PARAM_ASCII = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_PARAM_UTF8 = re.compile(
    rf"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e{_UTF8_NON_ASCII}]+))?"
)


def parse_params(text: str, *, utf8: bool) -> dict[str, str | None]:
    """Parse ``SP``-separated ESMTP parameters into an ordered dict keyed by upper-case keyword.

    Raises:
        GrammarError: 501 5.5.4 on bad syntax or a repeated keyword.
    """
    pattern = _PARAM_UTF8 if utf8 else _PARAM_ASCII
    out: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:
            continue  # tolerate runs of spaces, as Postfix does
        m = pattern.fullmatch(word)
        if m is None:
            raise GrammarError(501, "5.5.4", "Syntax error in parameters")
        key = m.group(1).upper()
        if key in out:
            raise GrammarError(501, "5.5.4", f"Duplicate {key} parameter")
        out[key] = m.group(2)
    return out


# --- xtext (RFC 3461 4) ---------------------------------------------------------------
#   xtext = *( xchar / hexchar ) ; xchar = %d33-42 / %d44-60 / %d62-126 ; hexchar = "+" 2HEX
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext.  Raises GrammarError 501 5.5.4 when malformed."""
    if not _XTEXT.fullmatch(text):
        raise GrammarError(501, "5.5.4", "Malformed xtext")
    if "+" not in text:
        return text
    raw = bytearray()
    pos = 0
    for m in _HEXCHAR.finditer(text):
        raw += text[pos : m.start()].encode("ascii")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += text[pos:].encode("ascii")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(501, "5.5.4", "xtext is not UTF-8") from None


def xtext_encode(text: str) -> str:
    """Encode a string as RFC 3461 xtext (non-ASCII is UTF-8 and hex-encoded)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)
