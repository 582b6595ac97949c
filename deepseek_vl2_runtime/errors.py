"""The two kinds of failure the runtime reports to its callers.

`InputError` is something the person sending the request can fix (a bad image, an over-long
prompt, a parameter out of range); its message is shown to them verbatim, so it says what was
wrong and what to do. `CheckpointError` is a problem with the weights directory (missing,
corrupt, unsupported configuration); it names the file, key or value at fault.
"""


class InputError(ValueError):
    """A request the user can fix. The message is user-facing."""


class CheckpointError(RuntimeError):
    """The checkpoint directory cannot be loaded. The message names the file/key/value at fault."""
