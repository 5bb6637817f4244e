"""Errors of archive runs. Not FuscErrors: those are the HTTP API's catalogue (service.errors.ERROR_CODES);
these stop a run (a source that cannot be listed, a run folder that cannot be continued) or, for
``source_unreadable``, are one item's error code in the results.
"""

from __future__ import annotations


class ArchiveError(Exception):
    """A stable ``code`` and a sentence a person can act on; never a patient identifier or a file name."""

    code = "archive_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SourceError(ArchiveError):
    """The source cannot be listed at all (a missing folder, a list without a path column, a DICOMweb
    server that does not answer): nothing to run."""

    code = "source_invalid"


class SourceReadError(ArchiveError):
    """One item's bytes could not be read (a file that vanished, a permission, a failed fetch): recorded
    for that item, the run goes on."""

    code = "source_unreadable"


class LedgerError(ArchiveError):
    """The run folder holds something this command cannot continue, or parts that do not add up."""

    code = "run_inconsistent"


class RunLockedError(ArchiveError):
    code = "run_locked"


class SubjectKeyError(ArchiveError):
    code = "subject_key_invalid"


class EngineUnavailableError(ArchiveError):
    """The engine cannot start: Ray not installed, or no cluster at the address."""

    code = "engine_unavailable"
