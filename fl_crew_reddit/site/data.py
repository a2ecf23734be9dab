"""A site's data folder: the train / validation / test shards the preprocessor writes for one client
(data/training/<run>/<client>/{train,validation,test}.jsonl), tokenized on first use."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fl_crew_reddit.preprocessing.data_paths import read_resolved
from fl_crew_reddit.preprocessing.pipeline import read_jsonl
from fl_crew_reddit.site.attacks import data_attack_key, poison_examples
from fl_crew_reddit.training.batching import tokenize_all

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ImageRowSettings:
    """How a site's image examples become multimodal rows (`training.multimodal.multimodal_rows`): where an image's
    stored CLIP embedding comes from, soft tokens per image (MULTIMODAL_TOKENS), MAX_IMAGES_PER_EXAMPLE."""
    features_of: Callable
    tokens_per_image: int
    max_images: int


class SiteData:
    """Tokenized rows of one client's splits, read from its own files on first use of each split (or given,
    in-process, already tokenized).

    The files are `folder`/<split>.jsonl (a split without its file: no rows), or `files` ({split: path, or None
    for a split the client does not have; a named file that is missing is an error}) where they lie elsewhere.
    Nothing is read before a split is asked for: a site that only trains never tokenizes its held-out splits."""

    def __init__(self, folder: Path | None, tokenizer, max_seq_length: int,
                 rows: dict[str, list[dict]] | None = None, files: dict[str, Path | str | None] | None = None,
                 images: ImageRowSettings | None = None, vlm=None):
        self.folder = Path(folder) if folder is not None else None
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self._rows: dict[str, list[dict]] = dict(rows or {})
        self._poisoned: dict[str, list[dict]] = {}  # a simulated data attacker's train rows (ATTACK), by attack
        self._pair_rows: dict[str, list[dict]] = {}
        self.pairs_left_out: dict[str, int] = {}  # split -> pairs read whose rows could not be built (too long, ...)
        # multimodal training (None: text only): the train rows of image examples carry image slots and embeddings;
        # images left out (no stored features, too many, ...) are counted by reason per split
        self.images = images
        self.images_left_out: dict[str, Counter] = {}
        self.images_used: dict[str, int] = {}  # split -> images that condition a row
        self._paths_refused: dict[str, Counter] = {}  # split -> image paths outside the run, by reason
        # a vision-language base (`training.vlm.VlmRowSettings`; None: a text LM): every split's rows come from its
        # processor, image posts with their images; images left out are counted in `images_left_out` as above
        self.vlm = vlm
        unknown = set(files or {}) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown splits {sorted(unknown)}; splits are {', '.join(SPLITS)}")
        self._files: dict[str, Path | None] = {split: Path(path) if path else None
                                               for split, path in (files or {}).items()}
        if self.folder is not None and not (self.folder / "train.jsonl").is_file():
            raise FileNotFoundError(f"{self.folder} is not a site data folder: train.jsonl is missing")

    def path(self, split: str) -> Path | None:
        """The file `split` is read from (None: no such file)."""
        if split in self._files:
            return self._files[split]
        return self.folder / f"{split}.jsonl" if self.folder is not None else None

    def _examples(self, split: str) -> list[dict]:
        """The examples of `split`'s file ([] for a folder without it; a file named in `files` must be there), their
        image paths resolved against the run folder the file lies in now (`data_paths`): a path leading out of it
        is left out, counted in `_paths_refused[split]`, and never opened."""
        path = self.path(split)
        if path is None or not (split in self._files or path.is_file()):
            return []
        self._paths_refused[split] = Counter()
        return read_resolved(path, read_jsonl(path), self._paths_refused[split])

    def rows(self, split: str) -> list[dict]:
        """Tokenized rows of `split`; [] for a split the site does not have (a run made before validation)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        if self.vlm is not None and split not in self._rows:
            self._rows[split] = self._vision_language(split)
        if split not in self._rows:
            examples = self._examples(split)
            # multimodal: every split's image examples carry their images, so held-out perplexity sees them too
            self._rows[split] = (self._multimodal(split, examples) if self.images is not None
                                 else tokenize_all(self.tokenizer, examples, self.max_seq_length))
        return self._rows[split]

    def _multimodal(self, split: str, examples: list[dict]) -> list[dict]:
        """Rows of `examples`, image examples with their slots and embeddings (text rows as `tokenize_all` makes
        them); what is left out is counted in `images_left_out[split]`."""
        from fl_crew_reddit.training.multimodal import multimodal_rows

        settings = self.images
        built = multimodal_rows(self.tokenizer, examples, settings.features_of, max_length=self.max_seq_length,
                                tokens_per_image=settings.tokens_per_image, max_images=settings.max_images)
        self.images_left_out[split] = built.skipped + self._paths_refused.get(split, Counter())
        self.images_used[split] = built.images
        return built.rows

    def _vision_language(self, split: str) -> list[dict]:
        """A VLM base's rows of `split` (`training.vlm.vlm_rows`); images left out counted by reason."""
        from fl_crew_reddit.training.vlm import vlm_rows

        examples = self._examples(split)
        built = vlm_rows(self.vlm.processor, examples, max_length=self.max_seq_length,
                         max_images=self.vlm.max_images, max_image_size=self.vlm.max_image_size)
        self.images_left_out[split] = built.skipped + self._paths_refused.get(split, Counter())
        self.images_used[split] = built.images
        return built.rows

    def image_rows(self, split: str) -> list[dict]:
        """Only the rows of `split` that carry images (held-out replies to image posts, for the image's
        contribution); [] without image settings or image examples."""
        if self.images is None:
            return []
        return [row for row in self.rows(split) if row["image_slots"]]

    def train_rows(self, client: str, fit_config: Mapping) -> list[dict]:
        """The rows `client` trains on this round: its train split, or, when the fit config makes it a data
        attacker (ATTACK=label_flip / backdoor, `site.attacks`), its train examples poisoned before tokenizing."""
        key = data_attack_key(client, fit_config)
        if key is None:
            return self.rows("train")
        if key not in self._poisoned:
            path = self.path("train")
            if path is None:
                raise ValueError(f"{client} has no train file to poison (ATTACK needs the examples, not only rows)")
            examples = read_jsonl(path) if (path.is_file() or "train" in self._files) else []
            self._poisoned = {key: tokenize_all(self.tokenizer, poison_examples(client, examples, fit_config),
                                                self.max_seq_length)}
        return self._poisoned[key]

    def pairs_path(self, split: str) -> Path | None:
        """The preference pair file of `split`: `<split>_pairs.jsonl` beside the split's SFT file (None: no folder)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        path = self.path(split)
        if path is None and split != "train":  # a split without its SFT file may still sit beside train's
            train = self.path("train")
            path = train.parent / f"{split}.jsonl" if train is not None else None
        return path.parent / f"{split}_pairs.jsonl" if path is not None else None

    def pair_rows(self, split: str) -> list[dict]:
        """Tokenized preference pairs of `split` (`training.dpo.tokenize_pairs`: {"id", "kind", "chosen": row,
        "rejected": row}); [] where the site has no pair file (a run made before preference pairs, or none built).
        Pairs whose rows cannot be built are left out and counted in `pairs_left_out[split]`."""
        if split not in self._pair_rows:
            path = self.pairs_path(split)
            pairs = read_jsonl(path) if path is not None and path.is_file() else []
            rows: list[dict] = []
            if pairs:
                from fl_crew_reddit.training.dpo import tokenize_pairs  # loaded only where pairs exist

                rows = tokenize_pairs(self.tokenizer, pairs, self.max_seq_length)
            self.pairs_left_out[split] = len(pairs) - len(rows)
            self._pair_rows[split] = rows
        return self._pair_rows[split]
