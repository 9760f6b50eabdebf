"""Typed media errors.

Every error carries a stable ``code`` (what the API and the admin show and filter by), a
sentence a person can read, and whether a retry could change the outcome. Tasks retry only
errors whose ``retryable`` is true; everything else fails the item at once.
"""

from __future__ import annotations


class MediaError(Exception):
    """Base of all errors the pipeline raises on purpose."""

    code = "internal"
    retryable = False
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
    code = "invalid_input"
    default_message = "The file is not a video, audio or image file we can read."


class UnsupportedCodec(MediaError):
    code = "unsupported_codec"
    default_message = "The file uses a format or codec we do not support."


class TooLarge(MediaError):
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


ERROR_CODES = ("invalid_input", "unsupported_codec", "too_large", "timeout", "internal", "cancelled", "stalled")
