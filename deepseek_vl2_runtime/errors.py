"""The two kinds of failure the runtime reports to its callers.

`InputError` is something the person sending the request can fix (a bad image, an over-long
prompt, a parameter out of range); its message is shown to them verbatim, so it says what was
wrong and what to do. `CheckpointError` is a problem with the weights directory (missing,
corrupt, unsupported configuration); it names the file, key or value at fault.
"""

from __future__ import annotations


class InputError(ValueError):
    """A request the user can fix. The message is user-facing.

    `invalid(field, value, rule)` builds the error for one bad parameter and remembers which it
    was, so that a front door whose users call it differently can name it their way
    (`renamed`) without rewriting the message."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self._value: object = None
        self._rule = ""

    @classmethod
    def invalid(cls, field: str, value: object, rule: str) -> InputError:
        error = cls(f"{field}={value!r} is invalid: {rule}", field)
        error._value, error._rule = value, rule
        return error

    def renamed(self, names: dict[str, str]) -> InputError:
        """The same error with its field called `names[field]` (itself if not renamed)."""
        if self.field is None or self.field not in names:
            return self
        return InputError.invalid(names[self.field], self._value, self._rule)


class CheckpointError(RuntimeError):
    """The checkpoint directory cannot be loaded. The message names the file/key/value at fault."""
