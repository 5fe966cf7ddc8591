"""The one exception type the user sees: a single line saying what is wrong and what to do."""


class FlashMoeError(Exception):
    """An error with a one-line message meant for the user (the CLI prints it without a traceback)."""


def one_line(error, limit: int = 300) -> str:
    """An exception's message (or any text) as one line: lines joined, cut at ``limit`` characters.

    Library messages often run over several lines ("Received 29 parameters not in model: " and then one
    name per line); their first line alone can end mid-sentence.
    """
    text = str(error)
    if not text.strip() and isinstance(error, BaseException):
        text = type(error).__name__
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
