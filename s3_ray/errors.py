"""Helpers for error messages shown to users."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), at most 300 characters."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
