"""One exception hierarchy for folio: each class names what failed.

Library code raises these; the CLI maps them to messages and exit codes. Per-page
failures (``PageError`` and subclasses) become error rows, never crash a run.
"""

from __future__ import annotations


class FolioError(Exception):
    """Base class of every error folio raises on purpose."""


class ConfigError(FolioError):
    """A configuration value or file is invalid (CLI exit code 2)."""


class SourceError(FolioError):
    """A source (file, folder, shard) cannot be opened or enumerated at all."""


class NotAFolioDatabase(SourceError):
    """A database given to read (export, show) is missing or not one folio wrote."""


class PageError(FolioError):
    """One page failed; the run records it as an error row and goes on."""


class PageReadError(PageError):
    """The page's bytes could not be read or rendered (corrupt PDF, unreadable file)."""


class PageDecodeError(PageError):
    """The page's bytes are not a decodable image."""


class PixelLimitExceeded(PageError):
    """The page is larger than the configured pixel limit (decompression-bomb guard)."""


class ModelArtifactError(FolioError):
    """A model artifact is missing, or its checksum does not match its manifest."""


class LayoutError(FolioError):
    """The layout stage failed for a whole batch."""


class LayoutServerUnavailable(LayoutError):
    """The Triton layout server could not be reached within the configured time."""


class LayoutServerUnreachable(LayoutServerUnavailable, ConfigError):
    """Nothing answers at the configured Triton address at start (a wrong --triton-url, or
    no server started): a usage error, CLI exit code 2."""


class RecognitionError(FolioError):
    """Recognition of a region failed."""


class RecognitionRejected(RecognitionError):
    """The recogniser rejected a region's input (bad image, too long): not retried."""


class RecognizerUnavailable(RecognitionError):
    """The recognition server could not be reached within the configured time."""


class SinkError(FolioError):
    """The SQLite sink failed (disk full, locked, schema mismatch)."""


class EngineError(FolioError):
    """The distributed engine failed: the cluster is unreachable, or a stage failed for
    good after Ray's retries."""
