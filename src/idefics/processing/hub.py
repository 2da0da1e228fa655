"""Finding processor files: a local folder, or a hub repo (downloaded, or read offline from the local hub cache)."""

import os
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import snapshot_download


def resolve_folder(path_or_hub_id: str | os.PathLike, *, filenames: Sequence[str], revision: str | None = None) -> Path:
    """A local folder as it is; otherwise a snapshot of the hub repo restricted to `filenames`."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(str(path_or_hub_id), revision=revision, allow_patterns=list(filenames)))
    except (OSError, ValueError) as err:  # not found, offline with an empty cache, invalid repo id, HTTP errors
        raise FileNotFoundError(
            f"{str(path_or_hub_id)!r} is not a local folder, and the Hugging Face Hub and its local cache do not have"
            f" it ({type(err).__name__})"
        ) from None
