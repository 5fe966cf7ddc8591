"""The one exception type the user sees: a single line saying what is wrong and what to do."""


class FlashMoeError(Exception):
    """An error with a one-line message meant for the user (the CLI prints it without a traceback)."""
