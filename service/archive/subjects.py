"""Subject keys: a keyed hash (HMAC-SHA-256) of a patient or subject identifier, never the identifier.

A plain hash of a patient ID can be reversed by hashing every plausible ID; a keyed one cannot without the
secret. Where the secret comes from, in order: ``--subject-key-file``, ``FUSC_ARCHIVE_SUBJECT_KEY_FILE``,
``FUSC_ARCHIVE_SUBJECT_KEY`` (the secret itself), and otherwise a new random secret kept in the run folder
(``subject-key``, mode 0600). There is no built-in default secret: the run says which one it chose, and
only runs given the same secret have comparable subject keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from service.archive.errors import SubjectKeyError

ENV_SECRET = "FUSC_ARCHIVE_SUBJECT_KEY"
ENV_SECRET_FILE = "FUSC_ARCHIVE_SUBJECT_KEY_FILE"
RUN_SECRET_FILE = "subject-key"
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class SubjectHasher:
    secret: bytes = field(repr=False)
    origin: str  # where the secret came from, in words (never the secret)

    def hash(self, identity: str) -> str:
        return "s-" + hmac.new(self.secret, identity.encode(), hashlib.sha256).hexdigest()[:20]

    @property
    def fingerprint(self) -> str:
        """Identifies the secret without revealing it: a resumed run must use the same one."""
        return hmac.new(self.secret, b"fusc-archive-subject-key-fingerprint", hashlib.sha256).hexdigest()[:16]


def _read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise SubjectKeyError(f"the subject key file {path} could not be read: {exc.strerror}") from exc
    if len(secret) < MIN_SECRET_BYTES:
        raise SubjectKeyError(f"the subject key in {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def subject_hasher(
    run_dir: Path, key_file: Path | None = None, environ: dict[str, str] | None = None
) -> SubjectHasher:
    """The hasher of a run: from the key file or the environment, else the run folder's own secret (made
    once, on the first run, and read again on a resumed one)."""
    env = os.environ if environ is None else environ
    if key_file is not None:
        return SubjectHasher(_read_secret(Path(key_file)), f"the file {key_file}")
    if env.get(ENV_SECRET_FILE):
        path = Path(env[ENV_SECRET_FILE])
        return SubjectHasher(_read_secret(path), f"the file {path} (from {ENV_SECRET_FILE})")
    if env.get(ENV_SECRET):
        secret = env[ENV_SECRET].encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise SubjectKeyError(f"{ENV_SECRET} is shorter than {MIN_SECRET_BYTES} bytes")
        return SubjectHasher(secret, f"the environment variable {ENV_SECRET}")
    path = Path(run_dir) / RUN_SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    return SubjectHasher(
        _read_secret(path),
        f"a random secret made for this run, kept in {path} (mode 0600); subject keys are comparable "
        f"only within this run unless you pass the same secret to other runs ({ENV_SECRET_FILE})",
    )
