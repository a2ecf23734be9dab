"""A site's data folder: the train / validation / test shards the preprocessor writes for one client
(data/training/<run>/<client>/{train,validation,test}.jsonl), tokenized on first use."""
from __future__ import annotations

from pathlib import Path

from fl_crew_reddit.preprocessing.pipeline import read_jsonl
from fl_crew_reddit.training.batching import tokenize_all

SPLITS = ("train", "validation", "test")


class SiteData:
    """Tokenized rows of one client's splits, read from its own folder (or given, in-process, already tokenized)."""

    def __init__(self, folder: Path | None, tokenizer, max_seq_length: int,
                 rows: dict[str, list[dict]] | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._rows: dict[str, list[dict]] = dict(rows or {})
        if self.folder is not None and not (self.folder / "train.jsonl").is_file():
            raise FileNotFoundError(f"{self.folder} is not a site data folder: train.jsonl is missing")

    def rows(self, split: str) -> list[dict]:
        """Tokenized rows of `split`; [] for a split the folder does not have (a run made before validation)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if split not in self._rows:
            path = self.folder / f"{split}.jsonl" if self.folder is not None else None
            self._rows[split] = (tokenize_all(self.tokenizer, read_jsonl(path), self.max_seq_length)
                                 if path is not None and path.is_file() else [])
        return self._rows[split]
