"""A local hub cache laid out as huggingface_hub lays it out, so hub ids resolve offline in tests."""

from pathlib import Path


def fake_hub_snapshot(cache_dir: Path, repo_id: str, files_from: Path, *, revision: str = "0" * 40) -> Path:
    """Copy the files of `files_from` into `cache_dir` as the `main` snapshot of model `repo_id`."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for path in files_from.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot
