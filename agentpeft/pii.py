"""PII redaction: e-mail addresses, phone numbers, card numbers, national IDs and medical-record numbers.

Each kind is found by a pattern built to leave ordinary facts alone (dates, prices, versions, model
and order numbers): card numbers must pass the Luhn check, bare 9- or 10-digit numbers count only
after a keyword ("SSN", "phone", "MRN"), and phone numbers need a telephone layout. What is found is
replaced by a typed placeholder such as ``[EMAIL]``.

Every pattern runs in time linear in the text: a run of whitespace, digits or address characters is
consumed possessively (``*+``, ``++``) wherever what follows cannot start with the same character, so
a near miss is never retried with every shorter run, and each pattern can start only once per run.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("EMAIL", "MRN", "NATIONAL_ID", "CARD", "PHONE")
# Between a keyword and its value: "MRN 1234567", "MRN: 1234567", "MRN is 1234567", or a short phrase
# ending in "is" or a colon, as in "the MRN of the patient is 1234567".
# Whatever follows a gap starts with a letter, a digit, "+", "#" or ":", never with whitespace, so its
# whitespace can be taken possessively.
_GAP = r"(?:\s*+[:#]\s*+|\s++(?:is\s++)?|(?:\s++[\w.'-]++){1,5}?(?:\s++(?:is|was)\s|\s*+[:=]\s*+))"

# The address (group "id") starts at the first letter or digit of a run of address characters: the
# run's leading ".", "_", "%", "+", "'" or "-" (as in 'bob@example.com' in quotes) is skipped, and
# no match starts anywhere else in the run, so each run is read once.
_EMAIL = re.compile(
    r"(?<![\w.+'%-])[._%+'-]*+(?P<id>[A-Za-z0-9][A-Za-z0-9._%+'-]*+\s?(?:@|\s?[\[(]at[\])]\s?)\s?"
    r"[A-Za-z0-9-]++(?:(?:\.|\s?[\[(]dot[\])]\s?)[A-Za-z0-9-]++)*(?:\.|\s?[\[(]dot[\])]\s?)[A-Za-z]{2,}\b)",
    re.IGNORECASE,
)
# The identifier after a medical-record keyword: "MRN 1234567", "Medical record no.: A-00123456".
_MRN = re.compile(
    r"\b(?:MRN|medical[ -]record(?:\s++(?:number|no\.?|num|#))?|patient\s++(?:id|number|no\.?)|chart\s++(?:number|no\.?))"
    rf"(?:{_GAP}|(?=[-#:]))[#:]?\s*+(?P<id>[A-Z]{{0,3}}-?\d[\d-]{{4,12}}\d)\b",
    re.IGNORECASE,
)
_SSN = re.compile(r"(?<![\w.-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\w-]|\.\d)")
_NATIONAL_KEYWORD = re.compile(
    r"\b(?:SSN|SIN|social\s++(?:security|insurance)\s++(?:number|no\.?|#)|national\s++(?:id|identity|insurance)"
    rf"(?:\s++(?:number|no\.?|card))?|NI\s++number|tax\s++id){_GAP}"
    r"(?P<id>[A-Z]{0,2}\s?\d[\d -]{6,12}\d\s?[A-Z]?)(?![\w-])",
    re.IGNORECASE,
)
# UK National Insurance numbers: two letters, six digits, one letter A-D.
_NINO = re.compile(r"\b(?![DFIQUV])[A-CEGHJ-PR-TW-Z](?![DFIQUVO])[A-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
_CARD = re.compile(
    r"(?<![\w.-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?![\w-]|\.\d)"
)
_PHONE_PATTERNS = (
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, +1 555 123 4567.
    re.compile(r"(?<![\w.+-])(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w-]|\.\d)"),
    # International with a country code: +44 20 7946 0958, +49 30 1234567, +33 1 23 45 67 89. Each group
    # takes its digits possessively (up to 5): a long digit run is cut one way only, not tried in every
    # split into 2 to 6 groups (thousands of them, for each "+").
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}+\)?){2,6}(?![\w-]|\.\d)"),
    # National with a trunk 0: 020 7946 0958, (030) 1234 5678, 0412 345 678.
    re.compile(r"(?<![\w.-])\(?0\d{1,4}\)?[ -]\d{3,4}[ -]?\d{3,4}(?![\w-]|\.\d)"),
)
_PHONE_KEYWORD = re.compile(
    r"\b(?:phone|tel|telephone|mobile|cell|fax|call|whatsapp)(?:\s++(?:number|no\.?|us|me))?"
    rf"(?:\.\s*+|\s++at\s++|\s++on\s++|{_GAP})"
    r"(?P<id>\+?\d[\d ().-]{6,16}\d)(?![\w-])",
    re.IGNORECASE,
)


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum that card numbers carry."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _card(match: re.Match) -> bool:
    digits = _digits(match.group(0))
    # Issuer prefixes 2-6 cover Visa, Mastercard, Amex, Discover, JCB, UnionPay and Diners.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _phone(match: re.Match) -> bool:
    return 8 <= len(_digits(match.group(0))) <= 15


@dataclass
class Redaction:
    """The redacted text, how many items of each kind were replaced, and the original values."""

    text: str
    counts: Counter = field(default_factory=Counter)
    found: dict[str, str] = field(default_factory=dict)  # original value -> placeholder


def _sub(text: str, pattern: re.Pattern, kind: str, out: Redaction, group: str | int = 0, check=None) -> str:
    def replace(match: re.Match) -> str:
        if check is not None and not check(match):
            return match.group(0)
        value = match.group(group)
        out.counts[kind] += 1
        out.found[value.strip()] = f"[{kind}]"
        start, end = match.start(group) - match.start(0), match.end(group) - match.start(0)
        whole = match.group(0)
        return whole[:start] + f"[{kind}]" + whole[end:]

    return pattern.sub(replace, text)


def redact(text: str) -> Redaction:
    """Replace every PII item in ``text`` with a typed placeholder, counting each kind."""
    out = Redaction(text)
    t = _sub(text, _EMAIL, "EMAIL", out, "id")
    t = _sub(t, _MRN, "MRN", out, "id")
    t = _sub(t, _NATIONAL_KEYWORD, "NATIONAL_ID", out, "id")
    t = _sub(t, _SSN, "NATIONAL_ID", out)
    t = _sub(t, _NINO, "NATIONAL_ID", out)
    t = _sub(t, _CARD, "CARD", out, check=_card)
    t = _sub(t, _PHONE_KEYWORD, "PHONE", out, "id", check=lambda m: 8 <= len(_digits(m.group("id"))) <= 15)
    for pattern in _PHONE_PATTERNS:
        t = _sub(t, pattern, "PHONE", out, check=_phone)
    out.text = t
    return out


def replace_known(text: str, found: dict[str, str]) -> str:
    """Replace values already identified as PII elsewhere (e.g. a key fact cut from a redacted answer)."""
    for value in sorted(found, key=len, reverse=True):
        if value:
            text = text.replace(value, found[value])
    return text
