class MemfitError(Exception):
    """An error the user can fix: the message says what is wrong and what would work.

    The CLI prints it as one line, without a traceback, and exits with code 2.
    """
