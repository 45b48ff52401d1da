"""``spotex policy keygen|sign|verify`` (the signed policy bundle, docs/policy.md) and the drills
``spotex drill policy-signature`` / ``spotex drill policy-tamper`` (seed §4.10, §4.11).

Exit codes: 0 ok, 1 the bundle failed verification (one line on stderr naming the file and why),
2 bad usage.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

__all__ = ["register"]


def _bundle_dir(cfg: object, bundle: str | None) -> Path:
    from spotex.cli import fail

    if bundle:
        return Path(bundle)
    path = getattr(getattr(cfg, "jobs", None), "budgets_file", None)
    if not path:
        fail("no bundle: pass --dir, or set [jobs] budgets_file (the bundle is its directory)", 2)
    return Path(path).resolve().parent


def register(main: click.Group) -> None:
    from spotex.cli import stack_options

    @main.group("policy")
    def policy() -> None:
        """The signed operational policy (the safety budgets file): sign and verify its bundle."""

    @policy.command("keygen")
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="File for the hex private key (0600).")
    def keygen(out: str) -> None:
        """A new Ed25519 policy signing key; prints its key id and public key (for policy_signer_keys)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from jobs.policy import key_id
        from spotex.cli import fail

        if Path(out).exists():
            fail(f"{out} exists; not overwriting a key", 2)
        k = Ed25519PrivateKey.generate()
        raw = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(raw.hex() + "\n")
        pub = k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        click.echo(f"policy_key_id={key_id(k.public_key())}")
        click.echo(f"policy_public_key={pub}")

    @policy.command("sign")
    @stack_options
    @click.option("--key", "key_file", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="File with the signer's hex Ed25519 private key.")
    @click.option("--dir", "bundle", default=None, type=click.Path(file_okay=False),
                  help="The bundle directory (default: the directory of [jobs] budgets_file).")
    @click.option("--file", "files", multiple=True,
                  help="A policy file in the bundle, relative to it (repeatable; default: [jobs] budgets_file "
                       "when --dir is not given, else every *.json in the bundle).")
    @click.option("--out", default=None, type=click.Path(dir_okay=False),
                  help="Where the detached signature goes (default: <bundle>/policy.sig).")
    def sign(data_dir: str | None, config: str | None, key_file: str, bundle: str | None, files: tuple[str, ...],
             out: str | None) -> None:
        """Write the bundle's manifest (each file's sha256) and sign it."""
        from jobs.policy import MANIFEST, PolicyError, load_private_key, sign_bundle
        from spotex.cli import _load, fail

        cfg = _load(data_dir, config).cfg
        root = _bundle_dir(cfg, bundle)
        names = list(files)
        if not names:
            if bundle is None:
                names = [Path(str(cfg.jobs.budgets_file)).name]
            else:
                names = sorted(p.name for p in root.glob("*.json") if p.name != MANIFEST)
        try:
            key = load_private_key(key_file)
            rec = sign_bundle(root, names, key, out)
        except (PolicyError, ValueError) as exc:
            fail(f"policy sign: {exc}")
        click.echo(f"policy_signer={rec['key_id']}")
        click.echo(f"policy_manifest={rec['manifest']}")
        click.echo(f"policy_signature={rec['signature_file']}")
        click.echo(f"policy_files={','.join(e['path'] for e in rec['files'])}")
        click.echo("policy_sign_ok=true")

    @policy.command("verify")
    @stack_options
    @click.option("--dir", "bundle", default=None, type=click.Path(file_okay=False),
                  help="The bundle directory (default: the directory of [jobs] budgets_file).")
    @click.option("--sig", "sig_file", default=None, type=click.Path(dir_okay=False),
                  help="The detached signature (default: <bundle>/policy.sig).")
    def verify(data_dir: str | None, config: str | None, bundle: str | None, sig_file: str | None) -> None:
        """Check the bundle against [security] policy_signer_keys: signer, signature, every file's hash
        (and that [jobs] budgets_file is in it when the bundle is its directory)."""
        from jobs.policy import PolicyError, trusted_keys, verify_bundle
        from spotex.cli import _load, fail

        cfg = _load(data_dir, config).cfg
        root = _bundle_dir(cfg, bundle)
        require = []
        if cfg.jobs.budgets_file and Path(cfg.jobs.budgets_file).resolve().parent == root.resolve():
            require.append(Path(cfg.jobs.budgets_file).name)
        try:
            keys = trusted_keys(cfg)
        except ValueError as exc:
            fail(f"policy verify: [security] policy_signer_keys: {exc}")
        try:
            res = verify_bundle(root, keys, require=require, sig_file=sig_file)
        except PolicyError as exc:
            click.echo(f"spotex: policy verify failed: {exc.line()}", err=True)
            sys.exit(1)
        click.echo(f"policy_signer={res['key_id']}")
        click.echo(f"policy_files={','.join(f['path'] for f in res['files'])}")
        click.echo(f"policy_manifest_sha256={res['manifest_sha256']}")
        click.echo("policy_verify_ok=true")

    drill = main.commands.get("drill")
    if not isinstance(drill, click.Group):
        return
    from spotex.cli_drill import _common, _run

    @drill.command("policy-signature")
    @_common
    def policy_signature(data_dir: str | None, out: str | None) -> None:
        """Seed §4.10: sign the policy with a drill key, verify it, load it in the safety_budget job
        (RUNBOOK_ALLOW_POLICY_FAIL=true: a failure is recorded, not fatal)."""
        from runbooks.policy_drills import policy_signature as fn

        _run("policy-signature", data_dir, out, fn)

    @drill.command("policy-tamper")
    @_common
    def policy_tamper(data_dir: str | None, out: str | None) -> None:
        """Seed §4.11: a changed limit, a removed file, a manifest edit and an untrusted signature are each
        detected by verify and refused by the jobs' loader (RUNBOOK_ALLOW_POLICY_TAMPER_FAIL=true: not fatal)."""
        from runbooks.policy_drills import policy_tamper as fn

        _run("policy-tamper", data_dir, out, fn)
