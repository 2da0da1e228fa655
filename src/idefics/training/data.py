"""Fine-tuning data: rows of a JSONL file or a `datasets` table to examples, and examples to right-padded batches
that `IdeficsForVisionText2Text.forward(**batch)` takes as they are (labels included).

Row styles, one JSON object per line or one dataset row:

    {"messages": [...], "images": [...]}                chat, as `idefics.processing.chat` formats it
    {"prompt": "..." or [items], "completion": "..."}   a prompt and the text that should follow it
    {"texts": [...], "images": [...]}                   interleaved (OBELICS): position i holds a text or an image

Chat content is a string or a list of parts: {"type": "text", "text": ...}, {"type": "image", "image": ...},
{"type": "image_url", "image_url": {"url": ...}}; an image part with no image takes the next one of the row's
"images" list (the TRL / llava-instruct convention). Prompt items are strings (always text) or such parts. An image
is a file path (relative to the JSONL file's folder, or to the dataset's folder), a `data:` URL, an http(s) URL (only
with `allow_remote_images`, fetched once under the processor's `UrlPolicy`), or in a dataset a PIL image.

Labels, with loss_on="completion":
- chat: each assistant turn's reply and its closing `<end_of_utterance>` (so the model learns to stop); not
  "Assistant:", user or system text.
- prompt/completion: the completion and the token that ends it, `</s>` by default (completion_end="eos": a completion
  ends the document, as in pretraining, and generation stops at EOS) or `<end_of_utterance>`
  (completion_end="end_of_utterance", for instruct-tuned models). The completion is appended to the prompt's last
  text as is: put a space or a newline in front of it yourself.
- interleaved: every text token; the row ends with the same end token.
With loss_on="all", every text token of every row. BOS, padding, `<image>` and `<fake_token_around_image>` are never
labelled. The text and its `input_ids` are exactly what `IdeficsProcessor` gives for the same prompt.

A row over `max_length` tokens is cut on the right when no `<image>` token is cut and a label token remains, and
skipped otherwise. Rows that cannot be used (bad JSON, wrong keys or types, a missing, unreadable or too large image,
a remote image without `allow_remote_images`) are skipped and listed in `report.skipped` with their line number and
the reason (for a dataset, row n is `dataset[n - 1]`); `strict=True` raises `DataError` at the first. Blank lines
are not rows.

Every row and image is checked when the dataset is built, so bad data shows up before training starts. Pixel values
are computed in `__getitem__` from each image's source (the file, data URL or dataset cell is read again; a fetched
remote image is kept, resized): a few thousand 224 px images would take 600 KB each as float32, too much to hold.
Nothing is random here: shuffling and augmentation belong to the loader.

Legend: b batch, t text length, n images, r image size.
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..processing.processor import IdeficsProcessor, image_attention_mask
from .row_images import DatasetImage, open_image
from .rows import BadRow, Row, RowReader

SHOWN_REASONS = 5  # skipped rows listed by `DataReport.summary`


class DataError(ValueError):
    """Unusable training data: a bad row under `strict=True`, no usable row at all, or a dataset that won't load."""


@dataclass
class Example:
    """One training row, unpadded."""

    input_ids: torch.Tensor  # (t,) int64
    labels: torch.Tensor  # (t,) int64, -100 where no loss
    pixel_values: torch.Tensor  # (n, 3, r, r) float32, n may be 0
    image_attention_mask: torch.Tensor  # (t, n) int64
    source_line: int  # the row's line in the JSONL file (from 1), or n for dataset[n - 1]


@dataclass
class DataReport:
    """What reading the data kept and skipped."""

    path: str
    rows: int  # rows read (blank lines are not rows)
    kept: int
    skipped: list[tuple[int, str]]  # (line, reason)
    truncated: list[int] = field(default_factory=list)  # lines whose text was cut to max_length
    unit: str = "line"  # "line" in a JSONL file, "row" in a dataset

    def where(self, line: int) -> str:
        """`path:line` for a JSONL file, `path row n` for a dataset."""
        return f"{self.path}:{line}" if self.unit == "line" else f"{self.path} row {line}"

    def summary(self) -> str:
        """One line of counts, then the first few reasons for skipping, one per line."""
        text = f"{self.path}: kept {self.kept} of {self.rows} rows"
        if self.truncated:
            text += f", cut {len(self.truncated)} to max_length"
        if self.skipped:
            text += f", skipped {len(self.skipped)}:"
            text += "".join(f"\n  {self.unit} {line}: {reason}" for line, reason in self.skipped[:SHOWN_REASONS])
            if len(self.skipped) > SHOWN_REASONS:
                text += f"\n  ... and {len(self.skipped) - SHOWN_REASONS} more"
        return text


class SFTDataset(torch.utils.data.Dataset):
    """Supervised fine-tuning rows from a JSONL file, a `datasets` folder or a hub dataset name (see the module
    docstring). `split` picks the split of a dataset (a JSONL file has none); `completion_end` ("eos" or
    "end_of_utterance") is the labelled token after a completion or an interleaved row."""

    def __init__(
        self,
        source: str | os.PathLike,
        processor: IdeficsProcessor,
        *,
        max_length: int,
        loss_on: str = "completion",
        allow_remote_images: bool = False,
        strict: bool = False,
        split: str = "train",
        completion_end: str = "eos",
    ):
        path = Path(source).expanduser()
        reader = RowReader(
            processor,
            max_length=max_length,
            loss_on=loss_on,
            completion_end=completion_end,
            allow_remote_images=allow_remote_images,
            folder=path.parent if path.is_file() else path if path.is_dir() else Path("."),
        )
        self.processor = processor
        self._table = None if path.is_file() else _load_dataset(source, split=split)
        self.report = DataReport(path=str(source), rows=0, kept=0, skipped=[], unit="line" if path.is_file() else "row")
        rows = _jsonl(path) if self._table is None else ((i + 1, row) for i, row in enumerate(self._table))
        total = None if self._table is None else len(self._table)
        self._rows: list[tuple[int, Row]] = []
        for line, row in tqdm(rows, total=total, desc=f"reading {path.name or source}", unit=" rows", disable=None):
            self.report.rows += 1
            try:
                read = reader.read(_parse(row) if isinstance(row, bytes) else row)
            except BadRow as err:
                if strict:
                    raise DataError(f"{self.report.where(line)}: {err}") from err
                self.report.skipped.append((line, str(err)))
                continue
            if read.cut_from is not None:
                self.report.truncated.append(line)
            self._rows.append((line, read))
        self.report.kept = len(self._rows)
        if not self._rows:
            raise DataError(f"{source}: no usable rows\n{self.report.summary()}")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Example:
        line, row = self._rows[i]
        where = self.report.where(line)
        labels = [f"{where}, image {k}" for k in range(len(row.images))]
        max_bytes = self.processor.image_processor.url_policy.max_bytes
        cells = any(isinstance(source, DatasetImage) for source in row.images)
        table_row = self._table[line - 1] if cells else None
        try:  # the images were checked when the dataset was built; a file may have changed since
            images = [open_image(source, max_bytes=max_bytes, row=table_row) for source in row.images]
        except (OSError, ValueError) as err:
            raise DataError(f"{where}: {err}") from err
        pixel_values = self.processor.image_processor.pixel_values(images, labels=labels)  # (n, 3, r, r)
        mask = image_attention_mask(
            row.input_ids[None],
            image_token_id=self.processor.image_token_id,
            eos_token_id=self.processor.tokenizer.eos_token_id,
            num_images=max(1, len(images)),
        )[0, :, : len(images)]  # (t, n)
        return Example(row.input_ids, row.labels, pixel_values, mask, source_line=line)


def collate(examples: list[Example], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (b, t), labels (b, t) (-100 on pad), pixel_values
    (b, n_max>=1, 3, r, r) zero-padded, image_attention_mask (b, t, n_max) zero-padded."""
    if not examples:
        raise ValueError("collate needs at least one example")
    image_shapes = {tuple(e.pixel_values.shape[1:]) for e in examples}
    if len(image_shapes) > 1:
        raise ValueError(f"the examples' images differ in shape: {sorted(image_shapes)}")
    b, t = len(examples), max(len(e.input_ids) for e in examples)
    n = max(1, *(len(e.pixel_values) for e in examples))
    input_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    pixel_values = torch.zeros(b, n, *image_shapes.pop())  # (b, n, 3, r, r)
    image_mask = torch.zeros(b, t, n, dtype=torch.long)
    for i, e in enumerate(examples):
        length, images = len(e.input_ids), len(e.pixel_values)
        input_ids[i, :length] = e.input_ids
        attention_mask[i, :length] = 1
        labels[i, :length] = e.labels
        pixel_values[i, :images] = e.pixel_values
        image_mask[i, :length, :images] = e.image_attention_mask
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "image_attention_mask": image_mask,
    }


def _jsonl(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) for the non-blank lines; read as bytes so one bad line can't stop the rest."""
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                yield line, raw


def _parse(raw: bytes) -> object:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRow(f"not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise BadRow(f"not valid JSON: {err}") from err


def _load_dataset(source: str | os.PathLike, *, split: str):
    """A saved dataset folder (`save_to_disk`), a folder of data files, or a hub dataset name (the local cache
    serves it offline), as one split."""
    path = Path(source).expanduser()
    if not path.exists() and (str(source).endswith((".jsonl", ".json")) or str(source).startswith((".", "/", "~"))):
        raise FileNotFoundError(f"{source}: no such file or folder")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"reading {source} needs the optional 'datasets' package: pip install 'idefics[train]'"
        ) from err
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(path))
        else:
            table = datasets.load_dataset(str(path) if path.is_dir() else str(source), split=split)
    except (OSError, ValueError) as err:  # not found, no such split, unreadable files
        raise DataError(f"could not load the dataset {source} (split {split!r}): {err}") from err
    if isinstance(table, datasets.DatasetDict):  # a folder saved from a DatasetDict
        if split not in table:
            raise DataError(f"{source} has no split {split!r}; it has {sorted(table)}")
        table = table[split]
    return table
