# SASLprep (RFC 4013): the stringprep profile (RFC 3454) that prepares user names and
# passwords for SASL mechanisms, so that strings that look alike compare alike.  RFC 4616 2
# (PLAIN): "the server ... MUST" prepare the authentication identity and the password with
# SASLprep before comparing them; LOGIN has no specification, and servers do the same.
#
# Strategy.  A pure function of its input, built on the stdlib's stringprep tables, which are
# RFC 3454's tables for Unicode 3.2.  The steps, in RFC 4013 2's order:
#
#   2.1 Mapping        C.1.2 non-ASCII space characters -> U+0020 SPACE;
#                      B.1 "commonly mapped to nothing" (soft hyphen, zero-width joiners,
#                      variation selectors ...) -> removed.  No case folding (B.2 is not
#                      used): "USER" and "user" stay different.
#   2.2 Normalization  Unicode NFKC, with the Unicode 3.2 data stringprep is defined on
#                      (RFC 3454 4), i.e. unicodedata.ucd_3_2_0 -- the current data would
#                      also fold characters assigned after 3.2 that a stored string may not
#                      contain anyway, and would change with every Python release.
#   2.3 Prohibited     C.1.2, C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8, C.9 in the output.
#   2.4 Bidi           RFC 3454 6: a string with any RandALCat character (D.1) MUST NOT
#                      contain an LCat character (D.2), and MUST start and end with a
#                      RandALCat character ("\u0627\u0031" fails: it ends with a digit).
#   2.5 Unassigned     A.1 code points (unassigned in Unicode 3.2).  RFC 3454 7: they are
#                      allowed in "queries" and "MUST NOT" be in "stored strings"; the caller
#                      says which with ``allow_unassigned`` (setting a password: False;
#                      checking one at AUTH: True).  Unassigned code points are left alone by
#                      the mapping and by 3.2 normalization, so checking the output is the
#                      same as checking the input.
#
# Invariants.  saslprep() is idempotent where it succeeds (saslprep(saslprep(x)) ==
# saslprep(x), tests/test_saslprep.py checks it under hypothesis), and the identity on
# printable ASCII (U+0020..U+007E), which is also its fast path: most passwords and user
# names pay one str.isascii()/isprintable() scan.  A prohibited string raises SASLprepError
# (a ValueError) whose ``reason`` names the offending class but not the character, so an
# error about a password can be shown without echoing part of it.
#
# Caution.  A string whose preparation fails is not an identity at all: a server treats it as
# a failed authentication (RFC 4013 2.3: such strings "MUST" not be output), never as an
# error of the connection.
from __future__ import annotations

import stringprep
import unicodedata
from collections.abc import Callable

# RFC 4013 2.3: the prohibited output, in the RFC's order, with a description for errors.
_PROHIBITED: tuple[tuple[Callable[[str], bool], str], ...] = (
    (stringprep.in_table_c12, "a non-ASCII space character (RFC 3454 C.1.2)"),
    (stringprep.in_table_c21, "an ASCII control character (RFC 3454 C.2.1)"),
    (stringprep.in_table_c22, "a non-ASCII control character (RFC 3454 C.2.2)"),
    (stringprep.in_table_c3, "a private use character (RFC 3454 C.3)"),
    (stringprep.in_table_c4, "a non-character code point (RFC 3454 C.4)"),
    (stringprep.in_table_c5, "a surrogate code point (RFC 3454 C.5)"),
    (stringprep.in_table_c6, "a character inappropriate for plain text (RFC 3454 C.6)"),
    (stringprep.in_table_c7, "a character inappropriate for canonical text (RFC 3454 C.7)"),
    (stringprep.in_table_c8, "a display property or deprecated character (RFC 3454 C.8)"),
    (stringprep.in_table_c9, "a tagging character (RFC 3454 C.9)"),
)


class SASLprepError(ValueError):
    """A string SASLprep (RFC 4013) prohibits.

    ``str(error)`` names the offending code point; ``reason`` does not (safe to show for a
    password).

    Attributes:
        reason: what is wrong, e.g. ``"contains an ASCII control character (RFC 3454 C.2.1)"``.
        code_point: the offending character, or None (a bidi violation is the whole string's).
    """

    def __init__(self, reason: str, code_point: str | None = None) -> None:
        shown = f" (U+{ord(code_point):04X})" if code_point is not None else ""
        super().__init__(f"SASLprep (RFC 4013) prohibits this string: it {reason}{shown}")
        self.reason = reason
        self.code_point = code_point


def saslprep(text: str, *, allow_unassigned: bool) -> str:
    """Prepare a user name or password with SASLprep (RFC 4013).

    Args:
        text: the string as received or typed.
        allow_unassigned: True for a query (a password checked at AUTH), False for a stored
            string (a password being set): RFC 3454 7 forbids code points unassigned in
            Unicode 3.2 in stored strings.

    Returns:
        The prepared string (``text`` itself if it is printable ASCII).

    Raises:
        SASLprepError: a ValueError; the output would contain a prohibited character, break
            the bidi rules, or (``allow_unassigned=False``) contain an unassigned code point.
    """
    if text.isascii() and text.isprintable():
        return text  # printable ASCII: no step changes or refuses anything
    # 2.1 mapping
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    # 2.2 normalization (RFC 3454 4: Unicode 3.2's NFKC)
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    # 2.3 prohibited output, 2.5 unassigned code points
    for c in prepared:
        for in_table, description in _PROHIBITED:
            if in_table(c):
                raise SASLprepError(f"contains {description}", c)
        if not allow_unassigned and stringprep.in_table_a1(c):
            raise SASLprepError(
                "contains a code point unassigned in Unicode 3.2 (RFC 3454 A.1), which a "
                "stored string must not (RFC 3454 7)",
                c,
            )
    # 2.4 bidi (RFC 3454 6)
    if any(stringprep.in_table_d1(c) for c in prepared):
        if any(stringprep.in_table_d2(c) for c in prepared):
            raise SASLprepError("mixes right-to-left and left-to-right characters (RFC 3454 6)")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise SASLprepError(
                "has right-to-left characters but does not start and end with one (RFC 3454 6)"
            )
    return prepared


__all__ = ["SASLprepError", "saslprep"]
