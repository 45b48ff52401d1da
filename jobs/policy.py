"""Signed operational policy (docs/policy.md): the safety budgets file that drives the
``safety_budget`` and ``freshness`` jobs, shipped as a bundle a trusted operator key signed.

A bundle is a directory holding the policy file(s), ``policy.manifest.json`` (each file's relative
path, byte size and sha256, written as canonical JSON) and ``policy.sig`` (a detached Ed25519
signature over the manifest's exact bytes, with the signer's key id). Trusted signers are the hex
Ed25519 public keys of ``[security] policy_signer_keys``; a key id is the first 16 hex characters of
the sha256 of the raw public key.

:func:`verify_bundle` says why a bundle is refused (:data:`REASONS`); :func:`load_policy` is what
the jobs use: a budgets file that fails verification is refused and the job keeps the last policy
that verified from that same path (``<data_dir>/policy/last-good-<id>.json``), else the built-in
defaults, and reports the refusal (``violation``, ``recommended_action=RESTORE_SIGNED_POLICY``).
An unsigned budgets file (no manifest beside it) is used in dev and refused in production; the
production start-up guardrail refuses it before that (spotex/guardrails.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core.keys import load_public_key, raw_public_key

__all__ = [
    "MANIFEST",
    "REASONS",
    "SIGNATURE",
    "LoadedPolicy",
    "PolicyError",
    "key_id",
    "load_policy",
    "load_private_key",
    "sign_bundle",
    "startup_problem",
    "trusted_keys",
    "validate_budgets",
    "verify_bundle",
]

MANIFEST = "policy.manifest.json"
SIGNATURE = "policy.sig"
KIND = "spotex-policy"
REFUSED_ACTION = "RESTORE_SIGNED_POLICY"

# reason code -> what the one line says
REASONS = {
    "UNSIGNED": "unsigned",
    "SIGNATURE_INVALID": "signature invalid",
    "FILE_HASH_MISMATCH": "file hash mismatch",
    "FILE_MISSING": "file missing",
    "UNKNOWN_SIGNER": "unknown signer",
    "NO_TRUSTED_KEYS": "no trusted policy signer keys configured",
    "MANIFEST_INVALID": "manifest invalid",
    "NOT_IN_MANIFEST": "file not covered by the signed manifest",
    "POLICY_INVALID": "policy content invalid",
}


class PolicyError(Exception):
    """A policy bundle failed verification: ``file`` and ``code`` (a key of :data:`REASONS`)."""

    def __init__(self, file: str | Path, code: str, detail: str = "") -> None:
        self.file, self.code, self.detail = str(file), code, detail
        super().__init__(self.line())

    @property
    def reason(self) -> str:
        return REASONS[self.code]

    def line(self) -> str:
        return f"{self.file}: {self.reason}" + (f" ({self.detail})" if self.detail else "")

    def as_dict(self) -> dict[str, str]:
        return {"file": self.file, "code": self.code, "reason": self.reason, "detail": self.detail}


def key_id(pub: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_key(pub)).hexdigest()[:16]


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """A hex Ed25519 private key (64 hex characters, the operator key format) from a file."""
    text = Path(path).read_text().strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: expected a hex Ed25519 private key (64 hex characters)") from None
    if len(raw) != 32:
        raise ValueError(f"{path}: expected a hex Ed25519 private key (64 hex characters)")
    return Ed25519PrivateKey.from_private_bytes(raw)


def trusted_keys(cfg: Any, extra: list[str] | tuple[str, ...] = ()) -> dict[str, Ed25519PublicKey]:
    """key id -> public key, from ``[security] policy_signer_keys`` (hex or PEM) plus ``extra``."""
    keys = list(getattr(cfg.security, "policy_signer_keys", []) or []) if cfg is not None else []
    out: dict[str, Ed25519PublicKey] = {}
    for k in [*keys, *extra]:
        try:
            pub = load_public_key(k)
        except ValueError as exc:
            raise ValueError(f"policy signer key {k.strip()[:20]!r}: {exc}") from None
        out[key_id(pub)] = pub
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_bundle(bundle: str | Path, files: list[str], key: Ed25519PrivateKey, sig_out: str | Path | None = None,
                now: float | None = None) -> dict[str, Any]:
    """Write ``policy.manifest.json`` for ``files`` (paths relative to ``bundle``) and the detached
    signature (``sig_out``, default ``bundle/policy.sig``). Returns the signature record."""
    root = Path(bundle)
    entries = []
    for name in sorted(set(files)):
        rel = _safe_rel(root / MANIFEST, name)
        p = root / rel
        if not p.is_file():
            raise PolicyError(p, "FILE_MISSING", "nothing to sign")
        if rel in (MANIFEST, SIGNATURE):
            raise PolicyError(p, "MANIFEST_INVALID", "the manifest and signature are not policy files")
        entries.append({"path": rel, "bytes": p.stat().st_size, "sha256": _sha256(p)})
    if not entries:
        raise PolicyError(root, "MANIFEST_INVALID", "no files to sign")
    manifest = {"kind": KIND, "version": 1, "files": entries,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))}
    body = _canonical(manifest)
    (root / MANIFEST).write_bytes(body)
    pub = key.public_key()
    sig = {"alg": "ed25519", "key_id": key_id(pub), "public_key": raw_public_key(pub).hex(),
           "signature": key.sign(body).hex()}
    out = Path(sig_out) if sig_out else root / SIGNATURE
    out.write_text(json.dumps(sig, indent=2, sort_keys=True) + "\n")
    return {**sig, "manifest": str(root / MANIFEST), "signature_file": str(out), "files": entries}


def _safe_rel(where: Path, name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or not p.parts or ".." in p.parts:
        raise PolicyError(where, "MANIFEST_INVALID", f"file path {name!r} must be relative, inside the bundle")
    return str(p)


def verify_bundle(bundle: str | Path, keys: dict[str, Ed25519PublicKey], require: list[str] | None = None,
                  sig_file: str | Path | None = None) -> dict[str, Any]:
    """Check the bundle: signature by a trusted key over the manifest's bytes, then every listed
    file's sha256, and that each of ``require`` (relative paths) is listed. Raises :class:`PolicyError`
    naming the first failure; returns the signer and the files."""
    root = Path(bundle)
    mpath, spath = root / MANIFEST, Path(sig_file) if sig_file else root / SIGNATURE
    if not mpath.exists():
        raise PolicyError(mpath, "UNSIGNED", "no manifest in the bundle")
    if not spath.exists():
        raise PolicyError(spath, "UNSIGNED", "no signature beside the manifest")
    if not keys:
        raise PolicyError(spath, "NO_TRUSTED_KEYS", "set [security] policy_signer_keys")
    body = mpath.read_bytes()
    try:
        sig = json.loads(spath.read_text())
        kid, sig_bytes = str(sig["key_id"]), bytes.fromhex(str(sig["signature"]))
        if sig.get("alg", "ed25519") != "ed25519":
            raise ValueError(f"algorithm {sig.get('alg')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise PolicyError(spath, "SIGNATURE_INVALID", f"unreadable signature file: {exc}") from None
    pub = keys.get(kid)
    if pub is None:
        raise PolicyError(spath, "UNKNOWN_SIGNER", f"key id {kid} is not in [security] policy_signer_keys")
    try:
        pub.verify(sig_bytes, body)
    except InvalidSignature:
        raise PolicyError(mpath, "SIGNATURE_INVALID", f"does not verify with key {kid}") from None
    try:
        manifest = json.loads(body)
        if manifest.get("kind") != KIND or not isinstance(manifest.get("files"), list) or not manifest["files"]:
            raise ValueError("not a spotex policy manifest with files")
        entries = [(str(e["path"]), str(e["sha256"])) for e in manifest["files"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PolicyError(mpath, "MANIFEST_INVALID", str(exc)) from None
    files = []
    for rel, want in entries:
        rel = _safe_rel(mpath, rel)
        p = root / rel
        if not p.is_file():
            raise PolicyError(p, "FILE_MISSING", "listed in the signed manifest")
        got = _sha256(p)
        if got != want:
            raise PolicyError(p, "FILE_HASH_MISMATCH", f"manifest sha256 {want[:12]}..., file {got[:12]}...")
        files.append({"path": rel, "sha256": got})
    listed = {rel for rel, _ in entries}
    for r in require or []:
        if r not in listed:
            raise PolicyError(root / r, "NOT_IN_MANIFEST")
    return {"key_id": kid, "manifest_sha256": hashlib.sha256(body).hexdigest(), "files": files,
            "created_at": manifest.get("created_at")}


def validate_budgets(data: Any, where: str | Path) -> list[dict[str, Any]]:
    """The budgets of a budgets file's JSON (``{"budgets": [...]}`` or a list), each with a name,
    an evidence glob and a field; else :class:`PolicyError` ``POLICY_INVALID``."""
    budgets = data.get("budgets") if isinstance(data, dict) else data
    if not isinstance(budgets, list):
        raise PolicyError(where, "POLICY_INVALID", 'expected {"budgets": [...]} or a list of budgets')
    for i, b in enumerate(budgets):
        missing = [k for k in ("name", "evidence", "field") if not isinstance(b, dict) or not isinstance(b.get(k), str)]
        if missing:
            raise PolicyError(where, "POLICY_INVALID", f"budget #{i} lacks {', '.join(missing)}")
    return [dict(b) for b in budgets]


def _verify_file(path: Path, keys: dict[str, Ed25519PublicKey]) -> dict[str, Any]:
    """Verify the bundle around ``path`` (its directory) and that it covers ``path``."""
    return verify_bundle(path.parent, keys, require=[path.name])


@dataclass
class LoadedPolicy:
    budgets: list[dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return bool(self.info.get("refused"))


def _last_good_path(data_dir: Path, policy_path: Path) -> Path:
    tag = hashlib.sha256(str(policy_path.resolve()).encode()).hexdigest()[:16]
    return data_dir / "policy" / f"last-good-{tag}.json"


def load_policy(path: str | None, cfg: Any, data_dir: Path | None, production: bool | None = None) -> LoadedPolicy:
    """The budgets the jobs evaluate, and how they were obtained (``info``: ``source`` one of
    ``defaults``, ``signed``, ``unsigned`` (dev only), ``last_good``, ``defaults_after_refusal``;
    ``refused`` with file, code, reason when the file was refused)."""
    from jobs.checks import DEFAULT_BUDGETS

    if not path:
        return LoadedPolicy(DEFAULT_BUDGETS, {"source": "defaults", "signed": False})
    prod = bool(getattr(cfg, "production", False)) if production is None else production
    p = Path(path).resolve()
    info: dict[str, Any] = {"path": str(p)}
    try:
        keys = trusted_keys(cfg)
        if not (p.parent / MANIFEST).exists() and not prod:
            if not p.is_file():
                raise PolicyError(p, "FILE_MISSING", "the configured budgets file")
            budgets = validate_budgets(json.loads(p.read_text()), p)
            return LoadedPolicy(budgets, {**info, "source": "unsigned", "signed": False,
                                          "note": "unsigned budgets file used (dev); production refuses it"})
        ver = _verify_file(p, keys)
        try:
            data = json.loads(p.read_text())
        except ValueError as exc:
            raise PolicyError(p, "POLICY_INVALID", f"not JSON: {exc}") from None
        budgets = validate_budgets(data, p)
    except PolicyError as exc:
        return _fallback(p, data_dir, {**info, "refused": exc.as_dict()})
    except ValueError as exc:  # a configured signer key that is not a key
        return _fallback(p, data_dir, {**info, "refused": PolicyError(p, "NO_TRUSTED_KEYS", str(exc)).as_dict()})
    info.update(source="signed", signed=True, key_id=ver["key_id"], manifest_sha256=ver["manifest_sha256"])
    if data_dir is not None:
        lg = _last_good_path(data_dir, p)
        lg.parent.mkdir(parents=True, exist_ok=True)
        tmp = lg.with_suffix(".tmp")
        tmp.write_text(json.dumps({"path": str(p), "verified_at": time.time(), "key_id": ver["key_id"],
                                   "manifest_sha256": ver["manifest_sha256"], "budgets": budgets}, sort_keys=True))
        os.replace(tmp, lg)
    return LoadedPolicy(budgets, info)


def _fallback(p: Path, data_dir: Path | None, info: dict[str, Any]) -> LoadedPolicy:
    from jobs.checks import DEFAULT_BUDGETS

    info.update(signed=False, recommended_action=REFUSED_ACTION)
    if data_dir is not None:
        lg = _last_good_path(data_dir, p)
        try:
            saved = json.loads(lg.read_text())
            budgets = validate_budgets(saved, lg)
        except (OSError, ValueError, PolicyError):
            pass
        else:
            info.update(source="last_good", last_good={"file": str(lg), "key_id": saved.get("key_id"),
                                                       "verified_at": saved.get("verified_at"),
                                                       "manifest_sha256": saved.get("manifest_sha256")})
            return LoadedPolicy(budgets, info)
    info["source"] = "defaults_after_refusal"
    return LoadedPolicy(DEFAULT_BUDGETS, info)


def startup_problem(cfg: Any) -> str | None:
    """For the production guardrail: why the configured budgets file may not be used, or None
    (no budgets file configured: the built-in defaults ship with the code)."""
    path = getattr(cfg.jobs, "budgets_file", None)
    if not path:
        return None
    p = Path(path).resolve()
    try:
        keys = trusted_keys(cfg)
        if not (p.parent / MANIFEST).exists():
            raise PolicyError(p, "UNSIGNED", f"no {MANIFEST} beside it")
        _verify_file(p, keys)
        validate_budgets(json.loads(p.read_text()), p)
    except PolicyError as exc:
        return f"policy {exc.line()}"
    except ValueError as exc:
        return f"policy {p}: {exc}"
    return None
