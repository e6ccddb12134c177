"""Files (`/v1/files`): uploads and batch output, metadata in the database,
content in a directory under FlexServe's home."""

from flexserve.files.service import (
    BATCH_MAX_BYTES,
    BATCH_MAX_LINES,
    FileRecord,
    Files,
    UploadLimitError,
)

__all__ = ["BATCH_MAX_BYTES", "BATCH_MAX_LINES", "FileRecord", "Files", "UploadLimitError"]
