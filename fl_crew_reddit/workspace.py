"""FederatedWorkspace: the objects one run shares across its stages, and one method per stage the agents' tools call.

It holds the base model (loaded once), each client's private data, the current global adapter and the history.
Each method only calls down into a stage package (reddit, preprocessing, training, aggregation, evaluation)
and records what happened. Client updates travel between trainer and aggregator as safetensors files.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import random
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from fl_crew_reddit.aggregation import make_server_optimizer
from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.evaluation.evaluator import (
    EvalMetrics,
    add_preferences,
    evaluate,
    image_text_scores,
    preference_scores,
    split_perplexities,
)
from fl_crew_reddit.evaluation.selection import argmin_round, best_round_record
from fl_crew_reddit.evaluation.tensorboard_scalars import RunScalars, baseline_scalars, metrics_scalars, round_scalars
from fl_crew_reddit.history import (
    AgentStep,
    BaselineRecord,
    ClientRoundResult,
    RoundAggregate,
    RoundRecord,
    RunHistory,
    parse_run_history,
)
from fl_crew_reddit.preprocessing.data_paths import read_resolved
from fl_crew_reddit.preprocessing.media import MediaSettings
from fl_crew_reddit.preprocessing.pipeline import ClientShard, PreprocessReport, QualityRules, preprocess, read_jsonl
from fl_crew_reddit.reddit.collector import CollectionReport, collect, load_collected
from fl_crew_reddit.run_state import SavedState, load_error_feedback, load_state, save_state
from fl_crew_reddit.runs import RunPaths, point_latest, write_json_atomic
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings
from fl_crew_reddit.site import Site, SiteData
from fl_crew_reddit.training.adapter_files import load_client_update, save_adapter, save_client_update, update_file
from fl_crew_reddit.training.device_pool import TrainerPool, TrainingJob, trainer_devices
from fl_crew_reddit.training.model_loading import load_base_model, pick_device
from fl_crew_reddit.training.peft_setup import build_peft_model
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter
from fl_crew_reddit.training.vlm import build_vlm_peft_model, vision_language_model_type, vlm_unsupported_settings

log = logging.getLogger(__name__)

CACHED_SITES = 8  # clients whose tokenized rows stay in memory (least recently used go first)


class ClientRows(Mapping):
    """{client: tokenized rows of one split}, each client's rows read from its files when looked up and not kept
    here: a pass over all clients (`items()`) holds one client's rows at a time, so memory does not grow with the
    number of clients."""

    def __init__(self, names: list[str], rows_of: Callable[[str], list[dict]]):
        self._names = list(names)
        self._known = set(self._names)
        self._rows_of = rows_of

    def __getitem__(self, name: str) -> list[dict]:
        if name not in self._known:
            raise KeyError(name)
        return self._rows_of(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._known


class FederatedWorkspace:
    def __init__(self, config: FLCrewRedditConfig, paths: RunPaths):
        self.config = config
        self.paths = paths
        self.device = pick_device(config.device)
        self.collection: CollectionReport | None = None
        self._partial_collection: CollectionReport | None = None  # the subreddits collected before a stop
        self.planned_rounds = config.federation_rounds  # the Flow sets its own; saved with each stage's state
        self.data: PreprocessReport | None = None
        self.base_metrics: EvalMetrics | None = None
        self.rounds: list[RoundRecord] = []
        self.baselines: dict[str, BaselineRecord] = {}
        self.agent_steps: list[AgentStep] = []
        self.global_adapter: dict[str, torch.Tensor] | None = None
        # The server side (sampling, fit config, screening, aggregation, server-optimizer state): server/strategy.py.
        # DP noise is seeded from a secret of this run (kept with its state, so a resume adds the same noise).
        self.strategy = FederatedStrategy(StrategySettings.from_config(config), noise_secret=secrets.randbits(63))
        self.privacy_plan = None  # DP_MODE central / local: set by plan_privacy at the start of the run
        self._site_summaries: dict[str, dict] = {}  # FEDERATION=flower: what each site reported of its data
        self._federation = None  # FEDERATION=local-flower: the SuperLink + SuperNodes, started at the first round
        self._flower_round = None  # FEDERATION=local-flower: the outcome of the round the ServerApp ran
        self._model = None
        self._tokenizer = None
        # multimodal training (SUPPORT_MULTIMODAL with CLIP weights): the image projector trained with the adapter,
        # its tensors under `mm_projector.` in the global state; the CLIP encoder whose stored features it reads.
        # None: text only, and nothing below changes.
        self._projector = None
        self._clip = None
        self._blank_features = None  # a blank white image's CLIP embedding: the image contribution's reference
        # Client data stays on disk: each client's shard files, and the tokenized rows of the CACHED_SITES clients
        # used last (`_site_data`); a client never sampled is never tokenized for training.
        self._shards: dict[str, ClientShard] = {}
        self._site_cache: OrderedDict[str, SiteData] = OrderedDict()
        # preference pairs (DPO): client -> split -> kind -> pairs in its files, and pairs left out when tokenized
        self._pair_counts: dict[str, dict[str, dict[str, int]]] = {}
        self._pairs_left_out: dict[str, dict[str, int]] = {}
        self._base_pair_logprobs: dict[str, dict] = {}  # split -> client -> the base model's log-probs (fixed)
        self._scalars: RunScalars | None = None
        self._sample: list[dict] = []
        self._image_examples: list[dict] = []  # held-out replies to image posts, for the CLIP score
        self._pending: dict[str, ClientRoundResult] = {}
        # UPDATE_COMPRESSION=topk: each client's error-feedback residual ({client: {key: tensor}}), for clients that
        # train here or in trainer processes; saved with each round's state, so a resume continues it exactly
        self._error_feedback: dict[str, dict[str, torch.Tensor]] = {}
        # TRAINER_DEVICES: trainer processes, one per device (checked here, at start), or None: train in-process.
        devices = trainer_devices(config.trainer_devices, config.device)
        if config.self_improve and devices:
            from fl_crew_reddit.config import ConfigError

            raise ConfigError("SELF_IMPROVE=true generates with the model of this process: it needs the clients to "
                              f"train here, not in trainer processes on {', '.join(devices)}; set DEVICE=cpu or "
                              "leave SELF_IMPROVE off")
        # a vision-language BASE_LLM_MODEL (training/vlm.py): its type and, once loaded, its processor; None: a text
        # LM. Settings it cannot run with are refused here, at start.
        self._vlm_type = self._vision_language_base(devices)
        self._processor = None
        self._vlm_sample: list[dict] = []  # the BLEU sample, generated through the processor (with its images)
        self._vlm_contribution: tuple[list[dict], list[dict], dict] | None = None  # test image rows: real, blank
        self._trainer_pool = TrainerPool(config, devices) if devices else None

    # --- shared model -------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load_model()
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            self._load_model()
        return self._model

    def _load_model(self) -> None:
        started = time.perf_counter()
        if self._vlm_type is not None:
            base, tokenizer = self._load_vision_language_base()
        else:
            base, tokenizer = load_base_model(self.config, self.device)
        torch.manual_seed(self.config.seed)  # LoRA A init: the same starting adapter for the same SEED
        self._model = build_vlm_peft_model(base, self.config) if self._vlm_type else build_peft_model(base, self.config)
        self._tokenizer = tokenizer
        self._projector = None if self._vlm_type else self._image_projector(self._model)
        self.global_adapter = snapshot_adapter(self._model)
        if self._projector is not None:
            from fl_crew_reddit.training.multimodal import with_projector

            self.global_adapter = with_projector(self.global_adapter, self._projector)
        self.initial_adapter = {k: v.clone() for k, v in self.global_adapter.items()}
        log.info("Loaded base model %s on %s in %.1fs", self.config.base_llm_model, self.device,
                 time.perf_counter() - started)

    def _image_projector(self, model):
        """The image projector (seeded from SEED, so a resumed run starts from the same one) when SUPPORT_MULTIMODAL
        is on and the CLIP model of IMAGE_PROCESSOR loads (preprocessing then stores its features); else None. A
        folder that is not CLIP is refused. Flower sites and trainer processes build the same projector from its spec
        (`site.app.image_settings`) and receive its tensors with the adapter."""
        cfg = self.config
        if not cfg.support_multimodal:
            return None
        from fl_crew_reddit.preprocessing.image_features import clip_encoder, resolve_clip_source
        from fl_crew_reddit.training.multimodal import check_clip_folder, projector_from_config

        source = Path(resolve_clip_source(cfg.image_processor))
        if source.exists():
            check_clip_folder(source)  # NotAClipModel: one clear error before anything trains
        encoder, reason = clip_encoder(cfg.image_processor)
        if encoder is None:
            log.info("Multimodal training is off (text only): %s", reason)
            return None
        self._clip = encoder
        projector = projector_from_config(cfg, model, int(encoder.model.config.projection_dim))
        log.info("Multimodal training: a %s projector, %d soft tokens per image, from %s features",
                 cfg.multimodal_projector, cfg.multimodal_tokens, encoder.source)
        return projector

    def _hold(self, state: dict[str, torch.Tensor]) -> None:
        """Load `state` into the shared model (and its projector keys into the projector, when multimodal)."""
        from peft import set_peft_model_state_dict

        from fl_crew_reddit.training.multimodal import load_projector_state, split_projector

        adapter, projector = split_projector(state)
        set_peft_model_state_dict(self.model, adapter)
        if self._projector is not None and projector:
            load_projector_state(self._projector, projector)

    @property
    def client_names(self) -> list[str]:
        return [shard.name for shard in self.data.clients] if self.data else []

    # --- Data Collector ----------------------------------------------------------------------------------------
    def collect(self, subreddits: list[str] | None = None, posts_per_subreddit: int | None = None,
                queries: list[str] | None = None) -> CollectionReport:
        if self.config.federation == "flower":
            return self._collect_on_sites(subreddits, posts_per_subreddit, queries)
        from fl_crew_reddit.data_source import open_mcp_client

        with open_mcp_client(self.config) as client:
            names = list(subreddits if subreddits is not None else self.config.subreddits) or client.list_subreddits()
            done = self._collected_before_stop(names)
            server = None
            for index, name in enumerate(names[len(done):], start=len(done)):
                report = collect(client, [name], posts_per_subreddit or self.config.posts_per_subreddit,
                                 self.paths.collected, queries=queries)
                done.extend(report.subreddits)
                server = report.server
                if index + 1 < len(names):  # a stop from here on keeps the subreddits collected so far
                    self._partial_collection = CollectionReport(subreddits=done, server=server)
                    self.save_state(0, stage="collecting", subreddits_done=index + 1)
        self._partial_collection = None
        self.collection = CollectionReport(subreddits=done, server=server or "mcp")
        return self.collection

    def _collected_before_stop(self, names: list[str]) -> list:
        """The subreddits a stopped run already collected, when it asked for the same ones first (else none)."""
        partial = self._partial_collection
        if partial is None:
            return []
        def key(name: str) -> str:
            return name.strip().lower().removeprefix("/").removeprefix("r/")

        kept = partial.subreddits
        if [key(n) for n in names[:len(kept)]] != [key(s.subreddit) for s in kept] or \
                not all(Path(s.path).is_file() for s in kept):
            log.warning("Collection starts over: the stopped run collected %s, this one asks for %s",
                        [s.subreddit for s in kept], names)
            return []
        logging.getLogger("fl_crew_reddit.progress").info(
            "Collection continues after %d subreddits collected before the stop: %s", len(kept),
            ", ".join(f"r/{s.subreddit}" for s in kept))
        return list(kept)

    # --- Data Preprocessor -------------------------------------------------------------------------------------
    def preprocess(self) -> PreprocessReport:
        if self.collection is None:
            raise RuntimeError("preprocess needs collected data: run the collector first")
        if self.config.federation == "flower":
            return self._preprocessed_on_sites()
        cfg = self.config
        cap, why = cfg.training_cap(self.device.type)
        logging.getLogger("fl_crew_reddit.progress").info("Training examples per client: %s", why)
        self.data = preprocess(
            load_collected(self.collection), self.tokenizer, run_id=self.paths.run_id, data_dir=self.paths.data,
            num_clients=cfg.clients_count, partition=cfg.partition, max_examples_per_client=cap,
            max_seq_length=cfg.max_seq_length, test_fraction=cfg.test_fraction, seed=cfg.seed,
            support_multimodal=cfg.support_multimodal, max_image_size=cfg.max_image_size,
            validation_fraction=cfg.validation_fraction, quality=QualityRules.from_settings(cfg),
            dirichlet_alpha=cfg.dirichlet_alpha, media=MediaSettings.from_settings(cfg),
            image_processor=cfg.image_processor)
        self._load_client_data()
        return self.data

    # --- FEDERATION=flower: the sites collect and preprocess; the server learns counts only -------------------------
    def _collect_on_sites(self, subreddits, posts_per_subreddit, queries) -> CollectionReport:
        """Ask every connected site to prepare its data (a site without any runs its own `prepare-site`, with its own
        data source and these non-secret choices) and keep what they report: counts, no text."""
        from fl_crew_reddit.reddit.collector import SubredditCollection

        cfg = self.config
        if self._federation is None:
            self._federation = self._start_federation()
        request = {"subreddits": list(subreddits if subreddits is not None else cfg.subreddits),
                   "posts_per_subreddit": int(posts_per_subreddit or cfg.posts_per_subreddit),
                   "queries": list(queries or [])}
        self._site_summaries = self._federation.prepare(request, min_sites=min(cfg.min_fit_clients,
                                                                                cfg.clients_count))
        totals: dict[str, dict] = {}
        for summary in self._site_summaries.values():
            for name, counts in (summary.get("collected") or {}).items():
                entry = totals.setdefault(name, {"posts": 0, "comments": 0, "skipped": {}})
                entry["posts"] += int(counts.get("posts", 0))
                entry["comments"] += int(counts.get("comments", 0))
                for reason, count in (counts.get("skipped") or {}).items():
                    entry["skipped"][reason] = entry["skipped"].get(reason, 0) + int(count)
        self.collection = CollectionReport(
            subreddits=[SubredditCollection(subreddit=name, num_posts=t["posts"], num_comments=t["comments"],
                                            path="(kept on the sites)", skipped=t["skipped"])
                        for name, t in sorted(totals.items())],
            server=f"{len(self._site_summaries)} Flower sites: {', '.join(self._site_summaries)}")
        return self.collection

    def _preprocessed_on_sites(self) -> PreprocessReport:
        """The sites' splits as client shards with counts and no paths (their files never leave the sites)."""
        clients, dropped = [], {}
        for name, summary in self._site_summaries.items():
            examples = summary.get("examples", {})
            clients.append(ClientShard(name=name, subreddits=summary.get("subreddits") or {},
                                       num_train=int(examples.get("train", 0)), num_test=int(examples.get("test", 0)),
                                       num_validation=int(examples.get("validation", 0)), train_path="",
                                       test_path="", train_tokens=int(summary.get("train_tokens") or 0)))
            for reason, count in (summary.get("dropped") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + int(count)
        # preference pairs: each site counts its pair files (kinds stay on the site)
        reported = {name: summary.get("pairs") or {} for name, summary in self._site_summaries.items()}
        self._pair_counts = {name: {split: {"all kinds": int(n)} for split, n in splits.items() if int(n or 0)}
                             for name, splits in reported.items() if any(splits.values())}
        self.data = PreprocessReport(num_comments=sum(c.num_comments for c in self.collection.subreddits),
                                     num_examples=sum(c.num_train + c.num_test + c.num_validation for c in clients),
                                     dropped=dropped, clients=clients, examples_path="(kept on the sites)",
                                     partition="one client per site")
        self._index_remote_sites()
        return self.data

    def _index_remote_sites(self) -> None:
        self._shards = {shard.name: shard for shard in self.data.clients}
        self._sample, self._image_examples = [], []  # generated replies need text the server does not have

    def use_data(self, report: PreprocessReport) -> None:
        """Train on client shards already on disk (`report.clients`: their files), as `preprocess` would leave them."""
        self.data = report
        self._load_client_data()

    def _load_client_data(self) -> None:
        """Index the clients' shard files; nothing is tokenized here. A client's rows are read back from its files
        (so a resumed run sees the same rows in the same order) and tokenized when they are used: train rows when
        the client is sampled, test and validation rows by each held-out evaluation, which streams over the clients
        (`_client_split`), keeping only NLL sums and token counts per client. Memory therefore does not grow with
        NUM_CLIENTS; the price is tokenizing the held-out splits again at each evaluation.

        The union of the test splits is the evaluation set and the union of the validation splits chooses rounds.
        The BLEU sample (EVAL_SAMPLES test examples drawn with SEED from that union, in client order) and the image
        examples are picked in two passes over the test files, keeping only the picked examples: the same examples
        as drawing from the whole list, since `random.sample` draws positions from the length alone."""
        self._shards = {shard.name: shard for shard in self.data.clients}
        self._site_cache.clear()
        wanted_images = self.config.clip_score_examples
        counts, self._image_examples = [], []
        outside: Counter = Counter()  # images whose path leads out of the run: left out, never opened
        for shard in self.data.clients:
            path = Path(shard.test_path)
            if len(self._image_examples) < wanted_images:
                examples = read_resolved(path, read_jsonl(path), outside)
                self._image_examples.extend(e for e in examples if e.get("image_paths"))
                counts.append(len(examples))
            else:  # rows only counted, as read_jsonl reads them (blank lines skipped)
                with path.open(encoding="utf-8") as handle:
                    counts.append(sum(1 for line in handle if line.strip()))
        del self._image_examples[wanted_images:]
        rng = random.Random(self.config.seed)
        positions = rng.sample(range(sum(counts)), min(self.config.eval_samples, sum(counts)))
        starts = list(itertools.accumulate(counts, initial=0))  # the first position of each client's test rows
        by_client: dict[int, list[int]] = {}
        for position in positions:
            by_client.setdefault(bisect.bisect_right(starts, position) - 1, []).append(position)
        picked: dict[int, dict] = {}
        for index, mine in by_client.items():
            path = Path(self.data.clients[index].test_path)
            examples = read_resolved(path, read_jsonl(path), outside)
            picked.update((p, examples[p - starts[index]]) for p in mine)
        if outside:
            log.warning("Held-out images left out of the image scores and the sample: %s", dict(outside))
        self._sample = [picked[p] for p in positions]
        if self._vlm_type is not None:  # a VLM generates the sample's replies through its processor, with images
            self._vlm_sample, self._sample = self._sample, []
        self._pair_counts = count_pair_kinds(self.data.clients)
        self._base_pair_logprobs = {}

    def _client_pairs(self, split: str) -> ClientRows:
        """{client: tokenized preference pairs of `split`} over all clients, streamed like `_client_split`; pairs
        whose rows could not be built are counted for the history."""
        def pairs_of(name: str) -> list[dict]:
            data = self._site_data(name)
            rows = data.pair_rows(split)
            if data.pairs_left_out.get(split):
                self._pairs_left_out.setdefault(name, {})[split] = data.pairs_left_out[split]
            return rows

        return ClientRows(self.client_names, pairs_of)

    def _add_preferences(self, metrics: EvalMetrics, splits: tuple[str, ...] = ("test", "validation")) -> EvalMetrics:
        """Preference accuracy and reward margin of the adapter the model holds now, on the clients' held-out pairs
        (beside perplexity); nothing where no client has pairs."""
        if not self._pair_counts or not self.config.scores_preferences:
            return metrics
        scores = {split: preference_scores(self.model, self._client_pairs(split), self.device,
                                           self.tokenizer.pad_token_id, self.config.dpo_beta,
                                           base_logprobs=self._base_pair_logprobs.setdefault(split, {}))
                  if split in splits else {} for split in ("test", "validation")}
        return add_preferences(metrics, scores["test"], scores["validation"])

    def _site_data(self, client: str) -> SiteData:
        """Client `client`'s rows, tokenized on first use of each split; the CACHED_SITES clients used last are kept."""
        data = self._site_cache.pop(client, None)
        if data is None:
            shard = self._shards[client]
            images = None
            if self._projector is not None:
                from fl_crew_reddit.site.data import ImageRowSettings
                from fl_crew_reddit.training.multimodal import stored_features

                images = ImageRowSettings(stored_features(self._clip.source), self.config.multimodal_tokens,
                                          self.config.max_images_per_example)
            data = SiteData(None, self.tokenizer, self.config.max_seq_length,
                            files={"train": shard.train_path, "test": shard.test_path,
                                   "validation": shard.validation_path},  # none in runs made before validation
                            images=images, vlm=self._vlm_row_settings())
        self._site_cache[client] = data
        while len(self._site_cache) > CACHED_SITES:
            self._site_cache.popitem(last=False)
        return data

    def _client_split(self, split: str) -> ClientRows:
        """{client: tokenized rows of `split`} over all clients, in client order, tokenized as it is read."""
        return ClientRows(self.client_names, lambda name: self._site_data(name).rows(split))

    def _has_validation(self, client: str) -> bool:
        shard = self._shards[client]
        return (bool(shard.validation_path) or self.config.federation == "flower") and shard.num_validation > 0

    # --- privacy ------------------------------------------------------------------------------------------------
    def plan_privacy(self, rounds: int):
        """DP_MODE central / local: the accountant's plan for `rounds` rounds (noise from DP_TARGET_EPSILON when
        set), logged with the ε it will spend; ConfigError when the accountant cannot cover it."""
        import dataclasses

        from fl_crew_reddit.config import ConfigError
        from fl_crew_reddit.server.privacy import PrivacyPlanError, make_plan

        cfg = self.config
        if cfg.dp_mode == "off":
            return None
        clients = cfg.clients_count
        per_round = self.strategy.clients_per_round(clients)
        try:
            plan = make_plan(mode=cfg.dp_mode, clip_norm=cfg.dp_clip_norm, noise_multiplier=cfg.dp_noise_multiplier or
                             None, target_epsilon=cfg.dp_target_epsilon, delta=cfg.dp_delta, num_clients=clients,
                             clients_per_round=per_round, rounds=rounds)
        except PrivacyPlanError as error:
            raise ConfigError(str(error)) from None
        self.privacy_plan = plan
        self.strategy.settings = dataclasses.replace(self.strategy.settings, dp_noise_multiplier=plan.noise_multiplier)
        logging.getLogger("fl_crew_reddit.progress").info("Privacy: %s", plan.describe())
        return plan

    def _record_privacy(self, record: RoundRecord, clipped: list[str]) -> None:
        from fl_crew_reddit.history import RoundPrivacy

        plan = self.privacy_plan
        sigmas = [r.privacy.noise_multiplier for r in self.rounds if r.privacy is not None and r is not record]
        record.privacy = RoundPrivacy(mode=plan.mode, epsilon=plan.spent([*sigmas, plan.noise_multiplier]),
                                      delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                                      clip_norm=plan.clip_norm, clipped=clipped)

    # --- Model Trainer -----------------------------------------------------------------------------------------
    def fit_config(self, round_number: int) -> dict:
        """What the server sends each trainer with the global adapter (Flower's `config` of a fit instruction); a
        simulated client's local DP noise is seeded from the run's secret (a real site uses its own randomness)."""
        config = self.strategy.fit_config(round_number, self.client_names)  # ATTACK: attackers among all clients
        if config.get("dp_mode") == "local" and self.config.federation == "inprocess":
            config["dp_noise_seed"] = self.strategy.noise_secret
        return config

    def select_clients(self, round_number: int) -> list[str]:
        """FRACTION_FIT of the clients, at least MIN_FIT_CLIENTS, drawn from (SEED, round): the same on resume."""
        return self.strategy.sample_clients(round_number, self.client_names)

    @property
    def server_optimizer(self):
        """The server optimizer's state lives in the strategy (saved with each round's state, restored on resume)."""
        return self.strategy.server_optimizer

    @server_optimizer.setter
    def server_optimizer(self, optimizer) -> None:
        self.strategy.server_optimizer = optimizer

    def site(self, client: str) -> Site:
        """Client `client` as a site on the shared model; its rows are read from its files when first used."""
        return Site(client, self._site_data(client), self.model, self.tokenizer, self.device,
                    mixed_precision=self.config.mixed_precision, projector=self._projector)

    def train_client(self, client: str, round_number: int) -> ClientRoundResult:
        if client not in self._shards:
            raise KeyError(f"unknown client {client!r}; clients are {', '.join(self._shards)}")
        if self._flower_round is not None:
            return self._train_on_flower(client, round_number)
        if self._trainer_pool is not None:
            return self._train_in_worker(client, round_number)
        received = self.strategy.adapter_for(client, self.global_adapter)  # CLIENT_LORA_RANKS: at its rank
        site = self.site(client)
        improved = self._self_improve(site, received, round_number)  # SELF_IMPROVE: + its synthetic train rows
        result = site.fit(received, self.fit_config(round_number), error_feedback=self._feedback_of(client))
        if self._vlm_type is not None:
            result.metrics.update(vlm_image_counts(site.data))
        result.metrics.update(improved)
        if result.metrics.get("objective_used") != "dpo":  # a DPO fit weighs by its pairs, synthetic rows unused
            result.num_examples -= int(improved.get("self_improve_examples", 0))  # FedAvg weighs real examples only
        if site.data.pairs_left_out.get("train"):  # DPO: train pairs whose rows could not be built
            self._pairs_left_out.setdefault(client, {})["train"] = site.data.pairs_left_out["train"]
        folder = save_client_update(self.model, received, result.state,
                                    self.paths.local_adapter(client, round_number), projector=self._projector)
        result.metrics["update_bytes"] = update_file(folder).stat().st_size
        record = ClientRoundResult(name=client, num_examples=result.num_examples,
                                   train_loss=result.metrics["train_loss"], metrics=result.metrics,
                                   adapter_path=str(folder))
        self._pending[client] = record
        return record

    def _self_improve(self, site: Site, received: dict[str, torch.Tensor], round_number: int) -> dict:
        """SELF_IMPROVE (site/self_improve.py), from round 2 on: the client's best replies generated with the global
        adapter it received join its train rows this round; returns their counts for its round metrics."""
        if not self.config.self_improve or round_number < 2:
            return {}
        from fl_crew_reddit.site.self_improve import SelfImproveSettings, improve_site

        earlier = [(r.round, r.global_) for r in self.rounds if r.round < round_number]
        return improve_site(site, received, round_number, SelfImproveSettings.from_settings(self.config),
                            read_jsonl(Path(self._shards[site.name].train_path)), [(0, self.base_metrics), *earlier])

    def _feedback_of(self, client: str) -> dict[str, torch.Tensor] | None:
        """UPDATE_COMPRESSION topk / sign: `client`'s residual, which its compression stage replaces in place; else
        None."""
        if self.config.update_compression not in ("topk", "sign"):  # compression.ERROR_FEEDBACK_KINDS
            return None
        return self._error_feedback.setdefault(client, {})

    def _feedback_bytes(self, client: str) -> bytes:
        """`client`'s residual as safetensors bytes for a trainer process (b"": none)."""
        feedback = self._feedback_of(client)
        if not feedback:
            return b""
        from safetensors.torch import save as save_tensors

        return save_tensors({k: v.contiguous() for k, v in feedback.items()})

    def _train_on_flower(self, client: str, round_number: int) -> ClientRoundResult:
        """FEDERATION=local-flower: the client's result from the round the ServerApp ran (its update arrived as an
        ArrayRecord and is kept as the client's adapter folder, as in-process)."""
        outcome = self._flower_round
        if outcome.round != round_number:
            raise RuntimeError(f"the Flower federation ran round {outcome.round}, not {round_number}")
        if client in outcome.failed:
            from fl_crew_reddit.federation.flower import SiteFailed

            raise SiteFailed(outcome.failed[client])
        if client not in outcome.results:
            raise RuntimeError(f"{client} was not sampled by the ServerApp in round {round_number}")
        result = outcome.results[client]
        if result.state is None:  # SECURE_AGGREGATION: the server had only the SecAgg+ sum, never this update
            record = ClientRoundResult(name=client, num_examples=result.num_examples,
                                       train_loss=result.metrics["train_loss"], metrics=dict(result.metrics),
                                       adapter_path="(secure aggregation: the update stayed masked)")
            self._pending[client] = record
            return record
        folder = save_client_update(self.model, self.strategy.adapter_for(client, self.global_adapter), result.state,
                                    self.paths.local_adapter(client, round_number), projector=self._projector)
        metrics = {**result.metrics, "update_bytes": update_file(folder).stat().st_size}
        record = ClientRoundResult(name=client, num_examples=result.num_examples, train_loss=metrics["train_loss"],
                                   metrics=metrics, adapter_path=str(folder))
        self._pending[client] = record
        return record

    def dispatch_training(self, round_number: int, clients: list[str]) -> None:
        """With trainer processes (TRAINER_DEVICES), start all of the round's clients at once, spread over the
        devices; `train_client` then collects each one's result. In-process training waits for `train_client`.
        FEDERATION=local-flower: the ServerApp runs the whole round on the SuperNodes now (train, screen and
        aggregate, evaluate); the next steps read its outcome."""
        self._flower_round = None
        if self.config.federation != "inprocess":
            self._run_flower_round(round_number, clients)
            return
        if self._trainer_pool is None:
            return
        from safetensors.torch import save_file

        from fl_crew_reddit.site.app import image_settings

        sent_files: dict[int, str] = {}  # one file per rank sent (CLIENT_LORA_RANKS: the truncated global adapter)
        for name in clients:
            rank = self.strategy.client_rank(name)
            if rank not in sent_files:
                suffix = "" if rank >= self.config.lora_r else f"-rank-{rank}"
                sent = self.paths.global_adapter(round_number).parent / f"sent-round-{round_number}{suffix}.safetensors"
                sent.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in self.strategy.adapter_for(name, self.global_adapter).items()},
                          str(sent))
                sent_files[rank] = str(sent)
        train_paths = {shard.name: shard.train_path for shard in self.data.clients}
        self._trainer_pool.submit_round([
            TrainingJob(client=name, round=round_number, train_path=str(train_paths[name]),
                        global_adapter_path=sent_files[self.strategy.client_rank(name)],
                        output_dir=str(self.paths.local_adapter(name, round_number)),
                        fit_config=self.fit_config(round_number), error_feedback=self._feedback_bytes(name),
                        image_settings=image_settings(self.config, self._projector))
            for name in clients])

    def _train_in_worker(self, client: str, round_number: int) -> ClientRoundResult:
        """A client's result from its trainer process (a worker that raised or died raises TrainerJobFailed)."""
        if not self._trainer_pool.has_job(client, round_number):
            self.dispatch_training(round_number, [client])
        outcome = self._trainer_pool.result(client, round_number)
        if outcome.error_feedback:
            from safetensors.torch import load as load_tensors

            self._error_feedback[client] = load_tensors(outcome.error_feedback)
        record = ClientRoundResult(name=client, num_examples=outcome.num_examples,
                                   train_loss=outcome.metrics["train_loss"], metrics=outcome.metrics,
                                   adapter_path=outcome.adapter_path)
        self._pending[client] = record
        return record

    def _run_flower_round(self, round_number: int, clients: list[str]) -> None:
        from fl_crew_reddit.federation.flower import model_settings

        if self._federation is None:
            self._federation = self._start_federation()
        outcome = self._federation.run_round(round_number, self.strategy, self.global_adapter,
                                             model_settings(self.config, self._projector))
        if outcome.selected != list(clients):
            log.warning("Round %d: the ServerApp sampled %s, the Flow %s", round_number, outcome.selected, clients)
        for name, reason in outcome.evaluation_failed.items():
            log.warning("Round %d: %s is left out of the held-out evaluation: %s", round_number, name, reason)
        if outcome.lora_ranks:  # sites of lower rank (theirs or CLIENT_LORA_RANKS): their adapters are kept at it
            self.strategy.declare_site_ranks(outcome.lora_ranks)
        self._flower_round = outcome

    def _start_federation(self):
        """FEDERATION=local-flower: a SuperLink and one SuperNode per client here (TLS + node authentication unless
        FLOWER_INSECURE); flower: the SuperLink at SUPERLINK_ADDRESS, verified with FLOWER_CERTS/ca.crt."""
        from fl_crew_reddit.federation.flower import FlowerFederation, LocalFlowerFederation

        cfg = self.config
        timeouts = dict(round_timeout_s=cfg.round_timeout, connect_timeout_s=cfg.site_connect_timeout)
        if cfg.federation == "local-flower":
            sites = {shard.name: Path(shard.train_path).parent for shard in self.data.clients}
            return LocalFlowerFederation(sites, self.paths.results / "flower", insecure=cfg.flower_insecure,
                                         **timeouts).start()
        from fl_crew_reddit.federation.certs import CA_CERT, check_certs

        if cfg.flower_certs is not None:
            check_certs(cfg.flower_certs)
        return FlowerFederation(self.client_names, self.paths.results / "flower",
                                control_address=cfg.superlink_address,
                                root_certificates=None if cfg.flower_insecure else cfg.flower_certs / CA_CERT,
                                **timeouts).connect()

    def record_client_failure(self, client: str, reason: str) -> None:
        from fl_crew_reddit.redact import mask_url_credentials

        self._current_round().skipped[client] = [mask_url_credentials(reason)]  # history keeps no URL secret

    # --- Aggregator --------------------------------------------------------------------------------------------
    def aggregate(self, round_number: int, method: str | None = None) -> RoundAggregate:
        """Read the round's client adapters (safetensors), screen them, combine them into the new global adapter."""
        method = method or self.config.aggregation_method
        record = self._current_round(round_number)
        clients = [self._pending[name] for name in sorted(self._pending)]
        if self._flower_round is not None:  # FEDERATION=local-flower: the ServerApp screened and aggregated
            outcome = self._flower_round.take_aggregation(method)
            self.strategy.load_state_dict(self._flower_round.strategy_state)
        else:
            updates = [ClientUpdate(c.name, load_client_update(Path(c.adapter_path)), c.num_examples)
                       for c in clients]
            outcome = self.strategy.aggregate(self.global_adapter, updates, num_failed=len(record.skipped),
                                              method=method, round_number=round_number)
        for name, reasons in outcome.rejected.items():
            log.warning("Round %d: update of %s rejected: %s", round_number, name, "; ".join(reasons))
            record.skipped[name] = reasons
        self.global_adapter = outcome.new_global
        folder = save_adapter(self.model, self.global_adapter, self.paths.global_adapter(round_number),
                              projector=self._projector)
        record.clients = clients
        record.aggregation = RoundAggregate(method=outcome.method, accepted=outcome.accepted,
                                            rejected=outcome.rejected, adapter_path=str(folder),
                                            update_norms=outcome.update_norms, lora_ranks=outcome.lora_ranks,
                                            discarded_energy=outcome.discarded_energy,
                                            secure_aggregation=outcome.secure_aggregation)
        if self.privacy_plan is not None:
            clipped = outcome.dp_clipped if self.privacy_plan.mode == "central" else \
                [c.name for c in clients if c.metrics.get("dp_clipped")]
            self._record_privacy(record, clipped)
        if self.config.attack != "none":  # the simulated attackers of this round (site/attacks.py)
            from fl_crew_reddit.history import RoundAttack

            record.attack = RoundAttack(attack=self.config.attack,
                                        attackers=[n for n in self.strategy.attackers(self.client_names)
                                                   if any(c.name == n for c in clients)])
        self._pending = {}
        return record.aggregation

    def _aggregation_options(self, method: str, global_state: dict) -> dict:
        return self.strategy.aggregation_options(method, global_state)

    # --- Evaluator ---------------------------------------------------------------------------------------------
    def evaluate_base(self) -> EvalMetrics:
        if self.config.federation == "flower":  # on the sites: the starting adapter (LoRA B = 0) is the base model
            from fl_crew_reddit.federation.flower import model_settings

            _ = self.model
            if self._federation is None:  # resumed after preprocessing: the sites kept their data
                self._federation = self._start_federation()
            evaluation, failed = self._federation.evaluate(self.initial_adapter,
                                                           model_settings(self.config, self._projector))
            for name, reason in failed.items():
                log.warning("Base model: %s is left out of the held-out evaluation: %s", name, reason)
            self.base_metrics = self._flower_metrics(evaluation)
            return self.base_metrics
        if self._projector is not None:  # the starting state: LoRA B = 0 (the base model) and the seeded projector
            self._hold(self.initial_adapter)
        self.base_metrics = evaluate(self.model, self.tokenizer, self._client_split("test"), self._sample, self.device,
                                     use_adapter=False, mixed_precision=self.config.mixed_precision,
                                     projector=self._projector)
        self.base_metrics.validation_perplexity, self.base_metrics.validation_per_client = self._validation(
            use_adapter=False)
        if self._vlm_type is not None:  # a vision-language base: replies, CLIP score and image contribution its way
            self._score_vision_language(self.base_metrics, use_adapter=False)
        else:
            self._score_images(self.base_metrics, use_adapter=False)
        if self._projector is not None:
            self._score_image_contribution(self.base_metrics)
            self._hold(self.global_adapter)
        if self._pair_counts:  # the starting adapter (LoRA B = 0) is the base model: its implicit rewards are 0
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, self.initial_adapter)
            self._add_preferences(self.base_metrics)
            set_peft_model_state_dict(self.model, self.global_adapter)
        return self.base_metrics

    def evaluate_round(self, round_number: int) -> EvalMetrics:
        self._hold(self.global_adapter)
        if self._flower_round is not None:  # FEDERATION=local-flower: perplexities from the sites' NLL sums
            metrics = self._flower_metrics(self._flower_round.evaluation)
        else:
            metrics = evaluate(self.model, self.tokenizer, self._client_split("test"), self._sample, self.device,
                               mixed_precision=self.config.mixed_precision, projector=self._projector)
            metrics.validation_perplexity, metrics.validation_per_client = self._validation()
            self._add_preferences(metrics)
        if self._vlm_type is not None:
            self._score_vision_language(metrics)
        else:
            self._score_images(metrics)
        if self._projector is not None:
            self._score_image_contribution(metrics)
        self._current_round(round_number).global_ = metrics
        if self.config.attack == "backdoor":
            self._score_backdoor(self._current_round(round_number))
        return metrics

    def _score_backdoor(self, record: RoundRecord) -> None:
        """ATTACK=backdoor: how often the trigger makes the new global model answer with the target reply, on the
        clients' held-out test examples (evaluation/backdoor.py); FEDERATION=flower keeps them on the sites."""
        from fl_crew_reddit.evaluation.backdoor import backdoor_success
        from fl_crew_reddit.history import RoundAttack

        paths = [Path(shard.test_path) for shard in self.data.clients if shard.test_path]
        if self.config.federation == "flower" or not all(path.is_file() for path in paths):
            return
        examples = [example for path in paths for example in read_jsonl(path)]
        random.Random(f"{self.config.seed}-backdoor").shuffle(examples)
        cfg = self.config
        if record.attack is None:
            record.attack = RoundAttack(attack=cfg.attack)
        record.attack.backdoor = backdoor_success(self.model, self.tokenizer, examples, cfg.backdoor_trigger,
                                                  cfg.backdoor_target, self.device, max_seq_length=cfg.max_seq_length,
                                                  mixed_precision=cfg.mixed_precision)

    def _flower_metrics(self, evaluation: dict[str, dict[str, tuple[float, int]]]) -> EvalMetrics:
        """EvalMetrics from the sites' (NLL sum, token count) per split, combined by token counts exactly as the
        in-process evaluator combines its per-client sums. Generated-reply metrics (BLEU, ROUGE, ...) are still
        computed here, on the server's held-out sample: data preparation is server-side for now."""
        from fl_crew_reddit.evaluation.evaluator import generate_replies
        from fl_crew_reddit.evaluation.metrics import bleu, chrf, distinct_n, rouge
        from fl_crew_reddit.server.evaluation import combine_split

        order = self.client_names
        test = {name: evaluation["test"][name] for name in order if name in evaluation["test"]}
        perplexity, per_client, count = combine_split(test, per_client_from=2)
        if perplexity is None:
            raise ValueError("the sites returned no held-out reply tokens: perplexity needs at least one")
        validation = {name: evaluation["validation"][name] for name in order
                      if name in evaluation.get("validation", {}) and self._has_validation(name)}
        validation_ppl, validation_per_client, _ = combine_split(validation)
        prompts = [example["prompt"] for example in self._sample]
        references = [example["messages"][-1]["content"] for example in self._sample]
        hypotheses = generate_replies(self.model, self.tokenizer, prompts, self.device) if prompts else []
        metrics = EvalMetrics(perplexity=perplexity, num_tokens=count, per_client=per_client,
                              bleu=bleu(hypotheses, references), chrf=chrf(hypotheses, references),
                              distinct_1=distinct_n(hypotheses, 1), distinct_2=distinct_n(hypotheses, 2),
                              samples=[{"id": e["id"], "reference": r, "generated": h}
                                       for e, r, h in zip(self._sample, references, hypotheses)],
                              validation_perplexity=validation_ppl, validation_per_client=validation_per_client,
                              **rouge(hypotheses, references))
        preferences = evaluation.get("preferences", {})  # the sites' preference_metrics, where they have pairs
        if preferences:
            add_preferences(metrics, {n: preferences.get("test", {})[n] for n in order
                                      if n in preferences.get("test", {})},
                            {n: preferences.get("validation", {})[n] for n in order
                             if n in preferences.get("validation", {})})
        return metrics

    def _score_images(self, metrics: EvalMetrics, use_adapter: bool = True) -> None:
        """CLIP score of the replies to held-out image posts, or the reason it is not computed, into `metrics`;
        multimodal (the projector): replies generated with the post's images and with a blank image."""
        if self._projector is not None:
            from fl_crew_reddit.evaluation.evaluator import conditioned_clip_scores
            from fl_crew_reddit.training.multimodal import blank_image_features, stored_features

            if self._blank_features is None:
                self._blank_features = blank_image_features(self._clip)
            cfg = self.config
            scores = conditioned_clip_scores(
                self.model, self.tokenizer, self._projector, self._clip, self._image_examples,
                stored_features(self._clip.source), self._blank_features, max_length=cfg.max_seq_length,
                tokens_per_image=cfg.multimodal_tokens, max_images=cfg.max_images_per_example,
                use_adapter=use_adapter) if cfg.clip_score_examples else {"clip_note": "CLIP_SCORE_EXAMPLES=0"}
            for name, value in scores.items():
                setattr(metrics, name, value)
            return
        scores = image_text_scores(
            self.model, self.tokenizer, self._image_examples, self.device,
            self.config.image_processor if self.config.support_multimodal else None, use_adapter=use_adapter,
            known_replies={sample["id"]: sample["generated"] for sample in metrics.samples})
        for name, value in scores.items():
            setattr(metrics, name, value)

    def _score_image_contribution(self, metrics: EvalMetrics) -> None:
        """Multimodal: reply perplexity of the held-out test replies to image posts with their real images and with
        a blank white image (`multimodal.image_contribution`), the held-out rows that carried images (test and
        validation, as the perplexities saw them) and the images left out by reason, into `metrics`; `image_note`
        says why not where no test row carries an image."""
        from collections import Counter

        from fl_crew_reddit.training.multimodal import blank_image_features, image_contribution

        rows, left_out, validation_rows, validation_left_out = [], Counter(), 0, Counter()
        for name in self.client_names:
            data = self._site_data(name)
            rows.extend(data.image_rows("test"))
            left_out.update(data.images_left_out.get("test", {}))
            if self._has_validation(name):
                validation_rows += len(data.image_rows("validation"))
                validation_left_out.update(data.images_left_out.get("validation", {}))
        metrics.image_left_out = dict(sorted(left_out.items()))
        metrics.test_image_rows, metrics.validation_image_rows = len(rows), validation_rows
        metrics.validation_image_left_out = dict(sorted(validation_left_out.items()))
        if not rows:
            metrics.image_note = "no held-out test reply answers a post with an image that has stored CLIP features"
            return
        if self._blank_features is None:
            self._blank_features = blank_image_features(self._clip)
        result = image_contribution(self.model, self._projector, rows, self._blank_features,
                                    pad_id=self.tokenizer.pad_token_id, blank=f"clip:{self._clip.source}")
        metrics.image_perplexity_real, metrics.image_perplexity_blank = result.perplexity_real, result.perplexity_blank
        metrics.image_examples, metrics.image_reply_tokens = result.rows, result.reply_tokens

    # --- a vision-language base (training/vlm.py) -----------------------------------------------------------------
    def _vision_language_base(self, trainer_processes: list[str]) -> str | None:
        """The model type when BASE_LLM_MODEL is a vision-language model (read from its config.json), else None;
        ConfigError naming every setting the VLM path cannot run with yet."""
        cfg = self.config
        model_type = vision_language_model_type(cfg.base_llm_model)
        if model_type is None:
            return None
        refused = vlm_unsupported_settings(cfg, trainer_processes)
        if refused:
            from fl_crew_reddit.config import ConfigError

            raise ConfigError(f"BASE_LLM_MODEL={cfg.base_llm_model} is a vision-language model ({model_type}), "
                              f"trained in this process with its own processor; these settings cannot go with it "
                              f"yet: {'; '.join(refused)}. Change them, or use a text LM as BASE_LLM_MODEL")
        return model_type

    def _load_vision_language_base(self):
        """(the VLM, its tokenizer as the text stages see it); the processor is kept for rows and generation."""
        from fl_crew_reddit.training.vlm import VlmTextTokenizer, load_vlm

        cfg = self.config
        model, self._processor = load_vlm(cfg, self.device)
        if cfg.support_multimodal:
            log.info("BASE_LLM_MODEL is a vision-language model (%s): its own processor reads the images; the "
                     "LLaVA-style projector (IMAGE_PROCESSOR=%s, MULTIMODAL_PROJECTOR) is not used with it",
                     self._vlm_type, cfg.image_processor)
        else:
            log.info("BASE_LLM_MODEL is a vision-language model (%s); SUPPORT_MULTIMODAL=false: it trains on text "
                     "rows only", self._vlm_type)
        return model, VlmTextTokenizer(self._processor)

    def _vlm_row_settings(self):
        """How a site's examples become the VLM's rows (None: a text LM)."""
        if self._vlm_type is None:
            return None
        from fl_crew_reddit.training.vlm import VlmRowSettings

        _ = self.model  # the processor comes with the model
        return VlmRowSettings(self._processor, self.config.max_images_per_example, self.config.max_image_size)

    def _score_vision_language(self, metrics: EvalMetrics, use_adapter: bool = True) -> None:
        """A VLM base: the BLEU / ROUGE sample's replies generated through its processor with the posts' images,
        the CLIP score of replies to held-out image posts (generated the same way) or why not, and the image's
        contribution (real vs blank white images), into `metrics`."""
        from contextlib import nullcontext

        from fl_crew_reddit.evaluation.metrics import bleu, chrf, distinct_n, rouge
        from fl_crew_reddit.preprocessing.image_features import clip_encoder
        from fl_crew_reddit.training.vlm import generate_vlm_replies

        cfg = self.config

        def generate(examples: list[dict]) -> list[str]:
            return generate_vlm_replies(self.model, self._processor, examples, self.device,
                                        max_images=cfg.max_images_per_example, max_image_size=cfg.max_image_size)

        with nullcontext() if use_adapter else self.model.disable_adapter():
            hypotheses = generate(self._vlm_sample) if self._vlm_sample else []
            references = [example["messages"][-1]["content"] for example in self._vlm_sample]
            metrics.bleu, metrics.chrf = bleu(hypotheses, references), chrf(hypotheses, references)
            for name, value in rouge(hypotheses, references).items():
                setattr(metrics, name, value)
            metrics.distinct_1, metrics.distinct_2 = distinct_n(hypotheses, 1), distinct_n(hypotheses, 2)
            metrics.samples = [{"id": e["id"], "reference": r, "generated": h}
                               for e, r, h in zip(self._vlm_sample, references, hypotheses)]
            known = {sample["id"]: sample["generated"] for sample in metrics.samples}
            clip_model = cfg.image_processor if cfg.support_multimodal else None
            if clip_model and self._image_examples and clip_encoder(clip_model)[0] is not None:
                missing = [e for e in self._image_examples if e["id"] not in known]
                known.update(zip((e["id"] for e in missing), generate(missing)))
            scores = image_text_scores(self.model, self.tokenizer, self._image_examples, self.device, clip_model,
                                       use_adapter=use_adapter, known_replies=known)
            for name, value in scores.items():
                setattr(metrics, name, value)
            self._score_vlm_image_contribution(metrics)

    def _score_vlm_image_contribution(self, metrics: EvalMetrics) -> None:
        """A VLM base: reply perplexity of the held-out test replies to image posts with their images and with
        blank white images of the same sizes (`vlm.vlm_image_contribution`), and the test images left out by reason;
        `image_note` says why not where no test row carries an image."""
        from collections import Counter

        from fl_crew_reddit.training.vlm import vlm_image_contribution, vlm_rows

        if self._vlm_contribution is None:
            real, blank, left_out = [], [], Counter()
            settings = dict(max_length=self.config.max_seq_length, max_images=self.config.max_images_per_example,
                            max_image_size=self.config.max_image_size)
            for shard in self.data.clients:
                path = Path(shard.test_path)
                examples = [e for e in read_resolved(path, read_jsonl(path), left_out) if e.get("image_paths")] \
                    if path.is_file() else []
                built = vlm_rows(self._processor, examples, **settings)
                real.extend(built.rows)
                left_out.update(built.skipped)
                blank.extend(vlm_rows(self._processor, examples, blank=True, **settings).rows)
            self._vlm_contribution = (real, blank, dict(sorted(left_out.items())))
        real, blank, left_out = self._vlm_contribution
        metrics.image_left_out = dict(left_out)
        if not any(row["images"] for row in real):
            metrics.image_note = "no held-out test reply answers a post with an image that loads"
            return
        result = vlm_image_contribution(self.model, real, blank, self.tokenizer.pad_token_id, self.device)
        metrics.image_perplexity_real, metrics.image_perplexity_blank = result.perplexity_real, result.perplexity_blank
        metrics.image_examples, metrics.image_reply_tokens = result.rows, result.reply_tokens

    def _validation(self, rows: Mapping[str, list[dict]] | None = None,
                    use_adapter: bool = True) -> tuple[float | None, dict[str, float]]:
        """Perplexity on the validation splits (default: all clients', streamed), overall and per client."""
        return split_perplexities(self.model, self._client_split("validation") if rows is None else rows,
                                  self.tokenizer.pad_token_id, self.device, use_adapter=use_adapter,
                                  mixed_precision=self.config.mixed_precision, projector=self._projector)

    # --- baselines (same budget as the federated run) ---------------------------------------------------------
    def train_baseline(self, kind: str) -> dict:
        """Train a comparison on the federated run's step budget, in round-equivalent chunks, and read it at its best
        chunk on validation (the test split never chooses); report the test perplexity of that checkpoint.

        local_only: each client alone from the initial adapter, each chunk the fit a federated round sends it (same
        steps), chosen on its own validation split (all a client alone has). centralized: all clients' training
        data pooled, each chunk as many steps as all clients took in that round, chosen on the union of the
        validation splits. Each chunk starts a fresh optimizer and schedule, as a federated round does."""
        trained = [r for r in self.rounds if r.clients]
        if not trained:
            raise ValueError(f"baseline {kind!r} needs a completed federated round: its step budget is the run's")
        if kind == "local_only":
            per_client, unions, union_preferences = {}, [], []
            for client in self.client_names:  # one client's rows in memory at a time
                data = self._site_data(client)
                fits = [{**self.fit_config(r.round), "proximal_mu": 0.0} for r in trained]
                run = self._train_in_chunks(f"{client}-alone", data.rows("train"), fits,
                                            {client: data.rows("validation")}, pair_rows=self._train_pairs([client]))
                metrics = self._test_metrics(run["state"])
                own = metrics.preference_per_client.get(client, {})
                per_client[client] = {"own": metrics.per_client.get(client, metrics.perplexity),
                                      "union": metrics.perplexity, "steps": run["steps"],
                                      "best_round": run["best_round"],
                                      "validation_per_round": run["validation_per_round"],
                                      "preference_accuracy": own.get("preference_accuracy"),
                                      "reward_margin": own.get("reward_margin")}
                unions.append(metrics.perplexity)
                union_preferences.append((metrics.preference_accuracy, metrics.reward_margin))
            steps = per_client[next(iter(per_client))]["steps"]
            entry = {"perplexity": sum(unions) / len(unions), "per_client": per_client,
                     **_mean_preferences(union_preferences),
                     "description": f"each client alone, {steps} steps in {len(trained)} round-equivalent chunks, "
                                    "read at its best chunk on its own validation split; perplexity = mean over "
                                    "clients on all held-out test replies"}
        elif kind == "centralized":
            pooled = [row for rows in self._client_split("train").values() for row in rows]  # all data, by design
            epochs = self.config.local_epochs * len(self.client_names) + 1  # enough batches; the step cap binds
            fits = [{**self.fit_config(r.round), "proximal_mu": 0.0, "local_epochs": epochs,
                     "max_steps": sum(c.metrics["steps"] for c in r.clients)} for r in trained]
            run = self._train_in_chunks("centralized", pooled, fits, self._client_split("validation"),
                                        pair_rows=self._train_pairs(self.client_names))
            metrics = self._test_metrics(run["state"])
            own = metrics.preference_per_client
            entry = {"perplexity": metrics.perplexity,
                     "per_client": {k: {"own": v, "preference_accuracy": own.get(k, {}).get("preference_accuracy"),
                                        "reward_margin": own.get(k, {}).get("reward_margin")}
                                    for k, v in metrics.per_client.items()},
                     "preference_accuracy": metrics.preference_accuracy, "reward_margin": metrics.reward_margin,
                     "best_round": run["best_round"], "validation_per_round": run["validation_per_round"],
                     "steps": run["steps"],
                     "description": f"all clients' data pooled, {run['steps']} steps in {len(trained)} "
                                    f"round-equivalent chunks, read at chunk {run['best_round']} (best on the union "
                                    "of validation splits)"}
        else:
            raise ValueError(f"unknown baseline {kind!r}: use local_only or centralized")
        self.baselines[kind] = BaselineRecord.model_validate(entry)
        scalars = self._scalar_log()
        if scalars is not None:
            scalars.write_points(baseline_scalars(kind, self.baselines[kind], last_round=trained[-1].round))
        # Leave the shared model holding the global adapter, as the rounds left it.
        self._hold(self.global_adapter)
        return entry

    def _train_pairs(self, clients: list[str]) -> dict:
        """LocalTrainer's `pair_rows` keyword for a baseline: the named clients' train pairs pooled, when the
        objective uses them (DPO); nothing for SFT."""
        if self.config.training_objective == "sft":
            return {}
        pairs = self._client_pairs("train")
        return {"pair_rows": [row for name in clients for row in pairs[name]]}

    def _train_in_chunks(self, name: str, rows: list[dict], fits: list[dict],
                         validation_rows: Mapping[str, list[dict]], pair_rows: dict | None = None) -> dict:
        """Fit chunk after chunk from the initial adapter, scoring validation after each; keep the best chunk's
        adapter (lowest validation perplexity; the last one where there is no validation split). `pair_rows`:
        LocalTrainer's keyword for DPO (`_train_pairs`)."""
        state, steps, scores = self.initial_adapter, 0, []
        best_state, best_round = None, None
        for fit in fits:
            result = LocalTrainer(name, self.model, self.tokenizer, rows, self.device,
                                  mixed_precision=self.config.mixed_precision, projector=self._projector,
                                  **(pair_rows or {})).fit(state, fit)
            state, steps = result.state, steps + result.metrics["steps"]
            ppl, _ = self._validation(validation_rows)  # the model holds the state the fit just returned
            scores.append((fit["round"], ppl))
            best_round = argmin_round(scores) or fit["round"]  # no validation split: the latest chunk
            if best_round == fit["round"]:
                best_state = state
        log.info("%s: validation perplexity per chunk %s; best chunk %d", name,
                 ", ".join(f"{n}: {p:.3f}" for n, p in scores if p is not None) or "(no validation split)", best_round)
        return {"state": best_state, "best_round": best_round, "steps": steps,
                "validation_per_round": [{"round": n, "perplexity": p} for n, p in scores if p is not None]}

    def _test_metrics(self, state: dict[str, torch.Tensor]) -> EvalMetrics:
        self._hold(state)
        metrics = evaluate(self.model, self.tokenizer, self._client_split("test"), [], self.device,
                           mixed_precision=self.config.mixed_precision, projector=self._projector)
        return self._add_preferences(metrics, splits=("test",))

    # --- history -----------------------------------------------------------------------------------------------
    def _current_round(self, round_number: int | None = None) -> RoundRecord:
        if not self.rounds or (round_number is not None and self.rounds[-1].round != round_number):
            self.rounds.append(RoundRecord(round=round_number if round_number is not None else len(self.rounds) + 1))
        return self.rounds[-1]

    def start_round(self, round_number: int) -> RoundRecord:
        self._pending = {}
        return self._current_round(round_number)

    def record_agent_step(self, step: AgentStep) -> None:
        """An agent step of the Flow (direct, llm, or fallback and why), kept in the run's history."""
        self.agent_steps.append(step)

    def run_history(self) -> RunHistory:
        """The run so far, as history.json holds it; the best round is chosen on validation, never on test."""
        best = best_round_record(self.rounds)
        return RunHistory(
            run_id=self.paths.run_id, settings=self.config.public_settings(), collection=self.collection,
            data=self.data, base=self.base_metrics, rounds=self.rounds, best_round=best.round if best else None,
            best_adapter=best.aggregation.adapter_path if best else None, baselines=self.baselines,
            agent_steps=self.agent_steps, preference_pairs=self._pair_counts,
            preference_pairs_left_out=self._pairs_left_out)

    def history(self) -> dict:
        """`run_history()` in its history.json form (plain dicts and lists)."""
        return self.run_history().as_json()

    # --- crash-safe state ----------------------------------------------------------------------------------------
    def save_state(self, round_number: int, total_rounds: int | None = None, *, stage: str = "round",
                   subreddits_done: int = 0) -> Path:
        """After a stage or a round: everything `restore` needs to continue exactly where this left off."""
        total = total_rounds or self.planned_rounds
        history = self.history()
        if stage == "collecting":
            history["collection"] = self._partial_collection.model_dump(mode="json")
        state = SavedState(stage=stage, round=round_number, total_rounds=total, subreddits_done=subreddits_done,
                           history=history, settings=self.config.public_settings(),
                           noise_secret=self.strategy.noise_secret)
        optimizer = self.server_optimizer.state_dict() if self.server_optimizer is not None else None
        return save_state(self.paths, state, self.global_adapter, optimizer,
                          error_feedback={c: r for c, r in self._error_feedback.items() if r})

    def restore(self) -> SavedState:
        """Reload the newest usable saved state (see run_state.py for the checks): data shards, history, global
        adapter, server-optimizer state."""
        from fl_crew_reddit.aggregation import SERVER_OPTIMIZERS

        _ = self.model  # load the base model and build the adapter: the reference the saved one is checked against
        method = self.config.aggregation_method
        state, global_adapter, optimizer = load_state(
            self.paths, self.initial_adapter, max_norm=None if method in SERVER_OPTIMIZERS else
            self.config.max_update_norm, optimizer_name=method if method in SERVER_OPTIMIZERS else None)
        history = parse_run_history(state.history, f"the saved state of run {self.paths.run_id}")
        check_same_objective(state.settings, self.config, self.paths.run_id)
        self._pairs_left_out = {name: dict(splits) for name, splits in history.preference_pairs_left_out.items()}
        self._pair_counts = history.preference_pairs  # FEDERATION=flower: as the sites reported them; else recounted
        if state.stage == "collecting":
            self._partial_collection, self.collection = history.collection, None
        else:
            self.collection = history.collection
        self.data, self.base_metrics = history.data, history.base
        self.rounds, self.agent_steps, self.baselines = history.rounds, history.agent_steps, history.baselines
        self.planned_rounds = state.total_rounds
        if self.data is not None:
            if self.config.federation == "flower":
                self._index_remote_sites()
            else:
                self._load_client_data()
        self.global_adapter = global_adapter
        self._error_feedback = load_error_feedback(self.paths, state, self.initial_adapter)
        if state.noise_secret is not None:  # the same DP noise as the stopped run would have drawn
            self.strategy.noise_secret = state.noise_secret
        if optimizer is not None:
            self.server_optimizer = make_server_optimizer(optimizer["name"])
            self.server_optimizer.load_state_dict(optimizer)
        log.info("Resumed run %s %s", self.paths.run_id, state.describe())
        self._scalars = None  # a new writer (purge_step=0) replaces whatever the stopped session wrote
        if self.base_metrics is not None:
            self.write_scalars(0)
        for record in self.rounds:
            self.write_scalars(record.round)
        return state

    def save_history(self) -> Path:
        write_json_atomic(self.paths.history, self.history())
        point_latest(self.paths.results.parent, self.paths.run_id)
        return self.paths.history

    # --- TensorBoard ---------------------------------------------------------------------------------------------
    def _scalar_log(self) -> RunScalars | None:
        if self._scalars is None and self.config.tensorboard:
            self._scalars = RunScalars(self.paths.log_file.parent / "tensorboard" / self.paths.run_id)
        return self._scalars

    def write_scalars(self, round_number: int) -> None:
        """TensorBoard scalars of round `round_number` (0: the base model); call it for a round only after that
        round's state is saved, so a resumed run never shows a round twice."""
        scalars = self._scalar_log()
        if scalars is None:
            return
        if round_number == 0:
            scalars.write(metrics_scalars(self.base_metrics), 0)
            return
        record = next(r for r in self.rounds if r.round == round_number)
        scalars.write(round_scalars(record), round_number)

    def close(self) -> None:
        if self._trainer_pool is not None:
            self._trainer_pool.close()
        if self._federation is not None:
            self._federation.stop()
            self._federation = None
        if self._scalars is not None:
            self._scalars.close()
            self._scalars = None


# --- preference learning helpers ------------------------------------------------------------------------------------
OBJECTIVE_SETTINGS = ("training_objective", "dpo_beta", "dpo_sft_weight", "dpo_reference", "dpo_learning_rate",
                      "dpo_epochs", "dpo_loss_type", "min_preference_pairs")


def check_same_objective(saved: dict, config: FLCrewRedditConfig, run_id: str) -> None:
    """A resumed run continues with the local objective it started with: a changed TRAINING_OBJECTIVE, DPO_BETA,
    DPO_SFT_WEIGHT, DPO_REFERENCE, DPO_LEARNING_RATE, DPO_EPOCHS, DPO_LOSS_TYPE or MIN_PREFERENCE_PAIRS would
    silently mix two objectives in one run's rounds, so it is refused (ConfigError naming the settings). A run saved
    before these settings existed trained SFT with the defaults; a DPO run saved before DPO_SFT_WEIGHT existed trained
    plain DPO (0), one saved before DPO_REFERENCE / DPO_LEARNING_RATE / DPO_EPOCHS / DPO_LOSS_TYPE existed global / 0
    / 0 / sigmoid."""
    from fl_crew_reddit.config import ConfigError

    defaults = {name: FLCrewRedditConfig.model_fields[name].default for name in OBJECTIVE_SETTINGS}
    if saved.get("training_objective", "sft") != "sft":
        defaults["dpo_sft_weight"] = 0.0
    changed = [f"{name.upper()}={getattr(config, name)} (the run started with {saved.get(name, defaults[name])})"
               for name in OBJECTIVE_SETTINGS if saved.get(name, defaults[name]) != getattr(config, name)]
    if changed:
        raise ConfigError(f"Run {run_id} cannot resume with {', '.join(changed)}: a resumed run continues with the "
                          "local objective it started with; set these back, or start a new run")


def vlm_image_counts(data: SiteData) -> dict:
    """A VLM client's train images for its round metrics (the projector path's names): images that condition a
    row, rows with images, images left out by reason."""
    rows = data.rows("train")
    return {"images_used": data.images_used.get("train", 0), "image_rows": sum(1 for row in rows if row["images"]),
            **{f"images_left_out_{reason}": count
               for reason, count in sorted(data.images_left_out.get("train", {}).items())}}


def count_pair_kinds(clients: list[ClientShard]) -> dict[str, dict[str, dict[str, int]]]:
    """client -> split -> kind -> preference pairs in its `<split>_pairs.jsonl` (beside its train shard); only the
    clients and splits that have pairs (so a run without any records nothing)."""
    import json

    counts: dict[str, dict[str, dict[str, int]]] = {}
    for shard in clients:
        if not shard.train_path:
            continue
        for split in ("train", "validation", "test"):
            path = Path(shard.train_path).parent / f"{split}_pairs.jsonl"
            if not path.is_file():
                continue
            kinds: dict[str, int] = {}
            with path.open(encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        kind = str(json.loads(line).get("kind", "unknown"))
                    except (ValueError, AttributeError):
                        raise ValueError(f"{path}, line {number}: not a JSON object of a preference pair") from None
                    kinds[kind] = kinds.get(kind, 0) + 1
            if kinds:
                counts.setdefault(shard.name, {})[split] = kinds
    return counts


def _mean_preferences(points: list[tuple[float | None, float | None]]) -> dict:
    """local_only: the mean over clients of the preference accuracy and margin on all test pairs (None: no pairs)."""
    accuracies = [a for a, _ in points if a is not None]
    margins = [m for _, m in points if m is not None]
    return {"preference_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "reward_margin": sum(margins) / len(margins) if margins else None}
