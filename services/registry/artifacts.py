"""Where versions' files live: <root>/<model>/<version>/<file>, uploads staged in <root>/.incoming.

An upload is written to its own temporary directory, verified, validated, then renamed into place
in one step (same filesystem), so a version directory is either complete or absent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from modelgrid.errors import InvalidArgument
from services.registry.records import FileEntry, FilePart

log = logging.getLogger(__name__)

INCOMING = ".incoming"
STALE_INCOMING_S = 24 * 3600  # an upload directory older than this was left by a crash


class ArtifactStore:
    """The artifact tree under root; the only code that creates, moves or deletes version files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.incoming = self.root / INCOMING
        self.incoming.mkdir(parents=True, exist_ok=True)

    def clean_stale_uploads(self, older_than_s: float = STALE_INCOMING_S) -> int:
        """Remove upload directories left by a crashed process (old enough not to be in flight
        on another registry sharing this directory); returns how many."""
        removed = 0
        now = time.time()
        for path in self.incoming.iterdir():
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        if removed:
            log.info("removed %d stale upload directories from %s", removed, self.incoming)
        return removed

    def new_upload_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="upload-", dir=self.incoming))

    def version_dir(self, model: str, version: str) -> Path:
        return self.root / model / version

    def file_path(self, model: str, version: str, path: str) -> Path:
        return self.version_dir(model, version) / path

    def install(self, upload_dir: Path, model: str, version: str) -> None:
        """Move a validated upload into place as <model>/<version> (one rename)."""
        target = self.version_dir(model, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # left by a registration interrupted between rename and commit: no row owns it
            log.warning("replacing %s, left by an interrupted registration", target)
            aside = Path(tempfile.mkdtemp(prefix="stale-", dir=self.incoming))
            os.rename(target, aside / "v")
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(upload_dir, target)

    def uninstall(self, upload_dir: Path, model: str, version: str) -> None:
        """Undo install (when the database refused the version): move the files back to upload_dir."""
        os.rename(self.version_dir(model, version), upload_dir)


class UploadReceiver:
    """Writes an upload's chunks into a directory and checks them against the header."""

    def __init__(self, directory: Path, files: list[FileEntry]) -> None:
        self.directory = directory
        self.files = {f.path: f for f in files}
        self.written = {f.path: 0 for f in files}
        self.hashes = {f.path: hashlib.sha256() for f in files}
        for f in files:
            (directory / f.path).touch()

    def write(self, part: FilePart) -> None:
        """Append one chunk; chunks of a file arrive in order (offset = bytes received so far)."""
        entry = self.files.get(part.path)
        if entry is None:
            raise InvalidArgument(f"the upload sent bytes for {part.path!r}, which the header does not list")
        done = self.written[part.path]
        if part.offset != done:
            raise InvalidArgument(
                f"chunk of {part.path!r} at offset {part.offset}, expected {done}: send each file's chunks in order"
            )
        if done + len(part.data) > entry.size:
            raise InvalidArgument(f"file {part.path!r} is longer than the {entry.size} bytes the header declares")
        with open(self.directory / part.path, "ab") as f:
            f.write(part.data)
        self.hashes[part.path].update(part.data)
        self.written[part.path] = done + len(part.data)

    def finish(self) -> None:
        """Every file complete and matching its sha256; flushed to disk."""
        for path, entry in self.files.items():
            if self.written[path] != entry.size:
                raise InvalidArgument(
                    f"file {path!r} is incomplete: received {self.written[path]} of {entry.size} bytes"
                )
            got = self.hashes[path].hexdigest()
            if got != entry.sha256:
                raise InvalidArgument(f"file {path!r}: sha256 mismatch (header says {entry.sha256}, received {got})")
        for path in self.files:
            fd = os.open(self.directory / path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
