"""Typed media errors.

Every error carries a stable ``code`` (what the API and the admin show and filter by), a
sentence a person can read, whether an automatic retry could change the outcome
(``retryable``: the stage tasks retry exactly those, see ``tasks/retry.py``), and whether the
fault is the file's own (``about_the_file``: then no retry of any kind, by a person either, can
help, and the page offers none).
"""

from __future__ import annotations


class MediaError(Exception):
    """Base of all errors the pipeline raises on purpose."""

    code = "internal"
    retryable = False
    about_the_file = False
    default_message = "Something went wrong while processing this file."

    def __init__(self, message: str | None = None, *, detail: str = "") -> None:
        self.message = message or self.default_message
        # ``detail`` holds the technical part (ffmpeg's stderr lines, a decoder's words) for
        # admins; ``message`` is for the person who uploaded the file.
        self.detail = detail
        super().__init__(self.message)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Picklable with its keyword argument, so it survives a trip through a child process.
        return (_rebuild, (type(self), self.message, self.detail))


def _rebuild(cls: type[MediaError], message: str, detail: str) -> MediaError:
    return cls(message, detail=detail)


class InvalidInput(MediaError):
    about_the_file = True
    code = "invalid_input"
    default_message = "The file is not a video, audio or image file we can read."


class UnsupportedCodec(MediaError):
    about_the_file = True
    code = "unsupported_codec"
    default_message = "The file uses a format or codec we do not support."


class TooLarge(MediaError):
    about_the_file = True
    code = "too_large"
    default_message = "The file is larger than we accept."


class ProcessingTimeout(MediaError):
    code = "timeout"
    # A timeout may come from a loaded machine rather than the file: worth another try.
    retryable = True
    default_message = "Processing took longer than allowed."


class Cancelled(MediaError):
    code = "cancelled"
    default_message = "Processing was cancelled."


class TransientError(MediaError):
    """A failure outside the file (storage hiccup, killed helper process): retry it."""

    code = "internal"
    retryable = True
    default_message = "A temporary problem interrupted processing."


def _subclasses(cls: type[MediaError]) -> list[type[MediaError]]:
    return [cls, *(sub for direct in cls.__subclasses__() for sub in _subclasses(direct))]


def retryable_errors() -> tuple[type[MediaError], ...]:
    """The error classes a stage task retries by itself."""
    return tuple(cls for cls in _subclasses(MediaError) if cls.retryable)


def file_error_codes() -> frozenset[str]:
    """Codes of failures caused by the file itself: retrying it cannot change the outcome."""
    return frozenset(cls.code for cls in _subclasses(MediaError) if cls.about_the_file)
