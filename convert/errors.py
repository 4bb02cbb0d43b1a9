"""The converter's one exception type: every failure names the file and, where there is one, the tensor."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint could not be converted. `.file` and `.tensor` name what was wrong."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.file, self.tensor = file, tensor
        where = []
        if file:
            where.append(f"file {file}")
        if tensor:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)
