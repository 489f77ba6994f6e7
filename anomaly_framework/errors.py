"""The framework's user-facing error and its one-line form, importable without torch (the ONNX runner shares it)."""


class FrameworkError(Exception):
    """A problem the user can fix (a bad config value, a missing file): reported as one line, no traceback."""


def one_line(error: BaseException) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else type(error).__name__
    return message.split("FrameworkError: ", 1)[-1]
