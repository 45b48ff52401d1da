"""PII / secrets log scan gate (seed §4.0 ``./scripts/pii_log_scan.sh``; ``spotex logs pii-scan``).

The services' logs are redacted at one point (``core.obs.redact``); this gate checks the result, and
the logs of the embedded third-party servers (NATS, PostgreSQL, the Kafka broker) that never pass
through it. Every line of every log file is matched against the policy below; a finding is reported
as ``file:line: kind: excerpt`` with the matched value itself masked, so the gate's own output does
not leak what it found.

Policy (what counts as a finding):

=================  ==============================================================================
kind               rule
=================  ==============================================================================
email              an e-mail address (``***@***``, the redactor's mask, is not one)
private_key        a PEM private key header (``-----BEGIN ... PRIVATE KEY-----``)
bearer_token       ``Bearer <16+ token chars>`` (HTTP Authorization)
jwt                three base64url segments starting ``eyJ``
url_credentials    ``scheme://user:password@host`` with a password other than ``***``
secret_assignment  a secret-looking key (secret, password, token, api_key, private_key, signature,
                   authorization, master_key) followed by ``=`` or ``:`` and an 8+ character value
                   that is not a mask (``***``) or a placeholder (``null``, ``none``, ``<...>``)
cloud_token        well-known token formats: AWS access key ids, GitHub, Slack, Stripe secret keys
card_number        13-19 digits (spaces or dashes allowed between groups) with a card brand's prefix
                   and length (Visa, Mastercard, Amex, Discover, JCB, Diners) that pass the Luhn check;
                   epoch timestamps (``17...``) and bare integers without a brand prefix do not match
phone              an international number: ``+`` then 8-15 digits (spaces/dashes allowed)
ip_address         a *public* (globally routable) IPv4 or IPv6 address: a client's address is personal
                   data. Loopback, private (RFC 1918), link-local, unspecified, documentation and
                   shared ranges are infrastructure and pass (every local stack logs 127.0.0.1)
=================  ==============================================================================

Not covered: names and postal addresses (no reliable pattern), national id numbers, base64 blobs.
Long hex strings are not findings by themselves: state hashes and audit hashes are 64 hex chars by
design (the redactor masks hex only where the key says it is a secret, and the ``secret_assignment``
rule catches the same).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Finding", "ScanResult", "log_files", "luhn_ok", "scan_line", "scan_paths"]


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str
    excerpt: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.excerpt}"

    def to_dict(self) -> dict[str, object]:
        return {"path": self.path, "line": self.line, "kind": self.kind, "excerpt": self.excerpt}


@dataclass
class ScanResult:
    files: int
    lines: int
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings


_MASKS = {"***", "***:***", "null", "none", "redacted", "[redacted]", "<redacted>", "-", "true", "false"}

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
    ("email", re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")),
    ("bearer_token", re.compile(r"\bBearer\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]{16,}=*", re.IGNORECASE)),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    ("url_credentials", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:(?!\*\*\*@)[^/\s@]+@", re.IGNORECASE)),
    ("cloud_token", re.compile(r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}"
                               r"|sk_live_[A-Za-z0-9]{16,})\b")),
)
# key = value / "key": "value" with a secret-looking key; group 1 the key, group 2 the value.
_SECRET_ASSIGN = re.compile(
    r"""(?<![A-Za-z0-9])["']?((?:[A-Za-z0-9]+[_-])*(?:secret|password|passwd|token|api[_-]?key|private[_-]?key"""
    r"""|signature|authorization|master[_-]?key)(?:[_-][A-Za-z0-9]+)*)["']?\s*[:=]\s*["']?([^\s"',;}\]]{8,})""",
    re.IGNORECASE)
# Keys that name a secret but whose values are not one (counters, hashes, ids).
_SECRET_KEY_PUBLIC = re.compile(r"(_total|_count|_seconds|_ms|_hash|_id|_ttl|_type|_len|_bytes|_file|_path)$"
                                r"|^fencing|^(old|new)_token$", re.IGNORECASE)
_CARD = re.compile(r"(?<![\w.])(\d(?:[ -]?\d){12,18})(?![\w.])")
_PHONE = re.compile(r"(?<![\w+])\+[1-9](?:[ -]?\d){7,14}(?![\w.])")
_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:.])((?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}|(?:[0-9A-Fa-f]{1,4}:){1,6}:"
                   r"(?:[0-9A-Fa-f]{1,4})?)(?![\w:.])")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_brand(d: str) -> bool:
    n = len(d)
    if d[0] == "4":
        return n in (13, 16, 19)
    if d[:2] in ("51", "52", "53", "54", "55") or 2221 <= int(d[:4]) <= 2720:
        return n == 16
    if d[:2] in ("34", "37"):
        return n == 15
    if d.startswith("6011") or d.startswith("65") or 644 <= int(d[:3]) <= 649:
        return 16 <= n <= 19
    if 3528 <= int(d[:4]) <= 3589:
        return 16 <= n <= 19
    if d[:2] in ("36", "38") or 300 <= int(d[:3]) <= 305:
        return 14 <= n <= 19
    return False


def _public_ip(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return bool(ip.is_global) and not ip.is_multicast


def _mask(value: str) -> str:
    if len(value) <= 8:
        return "***"
    return f"{value[:2]}***{value[-2:]}"


def scan_line(text: str) -> list[tuple[str, int, int]]:
    """The findings in one line: (kind, start, end) of each matched value."""
    out: list[tuple[str, int, int]] = []
    for kind, pat in _PATTERNS:
        out.extend((kind, m.start(), m.end()) for m in pat.finditer(text))
    for m in _SECRET_ASSIGN.finditer(text):
        key, value = m.group(1), m.group(2)
        if value.lower() in _MASKS or value.startswith("***") or value.startswith("<") or value.startswith("$"):
            continue
        if _SECRET_KEY_PUBLIC.search(key) or value.isdigit():
            continue
        if key.isupper() and "=" not in text[m.start(1):m.start(2)]:
            continue  # "FENCING_TOKEN: detail" is an error code followed by its message
        out.append(("secret_assignment", m.start(2), m.end(2)))
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group(1))
        if 13 <= len(digits) <= 19 and _card_brand(digits) and luhn_ok(digits):
            out.append(("card_number", m.start(1), m.end(1)))
    out.extend(("phone", m.start(), m.end()) for m in _PHONE.finditer(text))
    for pat in (_IPV4, _IPV6):
        out.extend(("ip_address", m.start(1), m.end(1)) for m in pat.finditer(text) if _public_ip(m.group(1)))
    # One finding per overlapping span (a JWT in a bearer header is one leak, reported once).
    out.sort(key=lambda f: (f[1], -f[2]))
    kept: list[tuple[str, int, int]] = []
    for f in out:
        if kept and f[1] < kept[-1][2]:
            continue
        kept.append(f)
    return kept


def _excerpt(text: str, spans: list[tuple[str, int, int]], start: int, end: int, width: int = 40) -> str:
    lo, hi = max(0, start - width), min(len(text), end + width)
    pieces, pos = [], lo
    for _k, s, e in spans:  # mask every finding inside the window, not only this one
        if e <= lo or s >= hi:
            continue
        s, e = max(s, lo), min(e, hi)
        pieces.append(text[pos:s])
        pieces.append(_mask(text[s:e]))
        pos = e
    pieces.append(text[pos:hi])
    return ("…" if lo else "") + "".join(pieces).replace("\t", " ") + ("…" if hi < len(text) else "")


def log_files(paths: Iterable[Path]) -> list[Path]:
    """Files to scan: each file given, and every ``*.log*`` / ``*.tail`` under each directory given."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and (".log" in f.name or f.suffix == ".tail")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    return out


def _scan_file(path: Path) -> Iterator[tuple[int, Finding | None]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for no, raw in enumerate(f, 1):
            text = raw.rstrip("\n")
            spans = scan_line(text)
            if not spans:
                yield no, None
                continue
            for kind, s, e in spans:
                yield no, Finding(str(path), no, kind, _excerpt(text, spans, s, e))


def scan_paths(paths: Iterable[Path]) -> ScanResult:
    files = log_files(paths)
    findings: list[Finding] = []
    lines = 0
    for path in files:
        last = 0
        for no, finding in _scan_file(path):
            last = no
            if finding is not None:
                findings.append(finding)
        lines += last
    return ScanResult(len(files), lines, findings)
