"""FederatedWorkspace: the objects one run shares across its stages, and one method per stage the agents' tools call.

It holds the base model (loaded once), each client's private data, the current global adapter and the history.
Each method only calls down into a stage package (reddit, preprocessing, training, aggregation, evaluation)
and records what happened. Client updates travel between trainer and aggregator as safetensors files.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import torch

from fl_crew_reddit.aggregation import make_server_optimizer
from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.evaluation.evaluator import EvalMetrics, evaluate, image_text_scores, split_perplexities
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
from fl_crew_reddit.preprocessing.media import MediaSettings
from fl_crew_reddit.preprocessing.pipeline import PreprocessReport, QualityRules, preprocess, read_jsonl
from fl_crew_reddit.reddit.collector import CollectionReport, collect, load_collected
from fl_crew_reddit.runs import (
    RunPaths,
    load_client_update,
    load_round_state,
    point_latest,
    save_adapter,
    save_client_update,
    save_round_state,
    update_file,
    write_json_atomic,
)
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings
from fl_crew_reddit.training.batching import tokenize_all
from fl_crew_reddit.training.device_pool import TrainerPool, TrainingJob, trainer_devices
from fl_crew_reddit.training.model_loading import load_base_model, pick_device
from fl_crew_reddit.training.peft_setup import build_peft_model
from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter

log = logging.getLogger(__name__)


class FederatedWorkspace:
    def __init__(self, config: FLCrewRedditConfig, paths: RunPaths):
        self.config = config
        self.paths = paths
        self.device = pick_device(config.device)
        self.collection: CollectionReport | None = None
        self.data: PreprocessReport | None = None
        self.base_metrics: EvalMetrics | None = None
        self.rounds: list[RoundRecord] = []
        self.baselines: dict[str, BaselineRecord] = {}
        self.agent_steps: list[AgentStep] = []
        self.global_adapter: dict[str, torch.Tensor] | None = None
        # The server side (sampling, fit config, screening, aggregation, server-optimizer state): server/strategy.py
        self.strategy = FederatedStrategy(StrategySettings.from_config(config))
        self._federation = None  # FEDERATION=local-flower: the SuperLink + SuperNodes, started at the first round
        self._flower_round = None  # FEDERATION=local-flower: the outcome of the round the ServerApp ran
        self._model = None
        self._tokenizer = None
        self._train_rows: dict[str, list[dict]] = {}
        self._test_rows: dict[str, list[dict]] = {}
        self._validation_rows: dict[str, list[dict]] = {}
        self._scalars: RunScalars | None = None
        self._sample: list[dict] = []
        self._image_examples: list[dict] = []  # held-out replies to image posts, for the CLIP score
        self._pending: dict[str, ClientRoundResult] = {}
        # TRAINER_DEVICES: trainer processes, one per device (checked here, at start), or None: train in-process.
        devices = trainer_devices(config.trainer_devices, config.device)
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
        base, tokenizer = load_base_model(self.config, self.device)
        torch.manual_seed(self.config.seed)  # LoRA A init: the same starting adapter for the same SEED
        self._model = build_peft_model(base, self.config)
        self._tokenizer = tokenizer
        self.global_adapter = snapshot_adapter(self._model)
        self.initial_adapter = {k: v.clone() for k, v in self.global_adapter.items()}
        log.info("Loaded base model %s on %s in %.1fs", self.config.base_llm_model, self.device,
                 time.perf_counter() - started)

    @property
    def client_names(self) -> list[str]:
        return [shard.name for shard in self.data.clients] if self.data else []

    # --- Data Collector ----------------------------------------------------------------------------------------
    def collect(self, subreddits: list[str] | None = None, posts_per_subreddit: int | None = None,
                queries: list[str] | None = None) -> CollectionReport:
        from fl_crew_reddit.data_source import open_mcp_client

        with open_mcp_client(self.config) as client:
            self.collection = collect(client, subreddits if subreddits is not None else self.config.subreddits,
                                      posts_per_subreddit or self.config.posts_per_subreddit, self.paths.collected,
                                      queries=queries)
        return self.collection

    # --- Data Preprocessor -------------------------------------------------------------------------------------
    def preprocess(self) -> PreprocessReport:
        if self.collection is None:
            raise RuntimeError("preprocess needs collected data: run the collector first")
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

    def _load_client_data(self) -> None:
        """Tokenize each client's shard once (read back from its files, so a resumed run sees the same rows in the
        same order); the union of test splits is the evaluation set, the union of validation splits chooses rounds."""
        test_examples = []
        for shard in self.data.clients:
            self._train_rows[shard.name] = tokenize_all(self.tokenizer, read_jsonl(Path(shard.train_path)),
                                                        self.config.max_seq_length)
            client_test = read_jsonl(Path(shard.test_path))
            self._test_rows[shard.name] = tokenize_all(self.tokenizer, client_test, self.config.max_seq_length)
            self._validation_rows[shard.name] = (  # none in runs made before validation splits
                tokenize_all(self.tokenizer, read_jsonl(Path(shard.validation_path)), self.config.max_seq_length)
                if shard.validation_path else [])
            test_examples.extend(client_test)
        rng = random.Random(self.config.seed)
        self._sample = rng.sample(test_examples, min(self.config.eval_samples, len(test_examples)))
        self._image_examples = [e for e in test_examples if e.get("image_paths")][:self.config.eval_samples]

    # --- Model Trainer -----------------------------------------------------------------------------------------
    def fit_config(self, round_number: int) -> dict:
        """What the server sends each trainer with the global adapter (Flower's `config` of a fit instruction)."""
        return self.strategy.fit_config(round_number)

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

    def site(self, client: str):
        """Client `client` as a site on the shared model, with its already tokenized rows."""
        from fl_crew_reddit.site import Site, SiteData

        rows = {"train": self._train_rows[client], "validation": self._validation_rows.get(client, []),
                "test": self._test_rows.get(client, [])}
        return Site(client, SiteData(None, self.tokenizer, self.config.max_seq_length, rows=rows), self.model,
                    self.tokenizer, self.device, mixed_precision=self.config.mixed_precision)

    def train_client(self, client: str, round_number: int) -> ClientRoundResult:
        if client not in self._train_rows:
            raise KeyError(f"unknown client {client!r}; clients are {', '.join(self._train_rows)}")
        if self._flower_round is not None:
            return self._train_on_flower(client, round_number)
        if self._trainer_pool is not None:
            return self._train_in_worker(client, round_number)
        result = self.site(client).fit(self.global_adapter, self.fit_config(round_number))
        folder = save_client_update(self.model, self.global_adapter, result.state,
                                    self.paths.local_adapter(client, round_number))
        result.metrics["update_bytes"] = update_file(folder).stat().st_size
        record = ClientRoundResult(name=client, num_examples=result.num_examples,
                                   train_loss=result.metrics["train_loss"], metrics=result.metrics,
                                   adapter_path=str(folder))
        self._pending[client] = record
        return record

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
        folder = save_client_update(self.model, self.global_adapter, result.state,
                                    self.paths.local_adapter(client, round_number))
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
        if self.config.federation == "local-flower":
            self._run_flower_round(round_number, clients)
            return
        if self._trainer_pool is None:
            return
        from safetensors.torch import save_file

        sent = self.paths.global_adapter(round_number).parent / f"sent-round-{round_number}.safetensors"
        sent.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.global_adapter.items()}, str(sent))
        train_paths = {shard.name: shard.train_path for shard in self.data.clients}
        self._trainer_pool.submit_round([
            TrainingJob(client=name, round=round_number, train_path=str(train_paths[name]),
                        global_adapter_path=str(sent), output_dir=str(self.paths.local_adapter(name, round_number)),
                        fit_config=self.fit_config(round_number)) for name in clients])

    def _train_in_worker(self, client: str, round_number: int) -> ClientRoundResult:
        """A client's result from its trainer process (a worker that raised or died raises TrainerJobFailed)."""
        if not self._trainer_pool.has_job(client, round_number):
            self.dispatch_training(round_number, [client])
        outcome = self._trainer_pool.result(client, round_number)
        record = ClientRoundResult(name=client, num_examples=outcome.num_examples,
                                   train_loss=outcome.metrics["train_loss"], metrics=outcome.metrics,
                                   adapter_path=outcome.adapter_path)
        self._pending[client] = record
        return record

    def _run_flower_round(self, round_number: int, clients: list[str]) -> None:
        from fl_crew_reddit.federation.flower import LocalFlowerFederation, model_settings

        if self._federation is None:
            sites = {shard.name: Path(shard.train_path).parent for shard in self.data.clients}
            self._federation = LocalFlowerFederation(sites, self.paths.results / "flower")
            self._federation.start()
        outcome = self._federation.run_round(round_number, self.strategy, self.global_adapter,
                                             model_settings(self.config))
        if outcome.selected != list(clients):
            log.warning("Round %d: the ServerApp sampled %s, the Flow %s", round_number, outcome.selected, clients)
        self._flower_round = outcome

    def record_client_failure(self, client: str, reason: str) -> None:
        self._current_round().skipped[client] = [reason]

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
                                              method=method)
        for name, reasons in outcome.rejected.items():
            log.warning("Round %d: update of %s rejected: %s", round_number, name, "; ".join(reasons))
            record.skipped[name] = reasons
        self.global_adapter = outcome.new_global
        folder = save_adapter(self.model, self.global_adapter, self.paths.global_adapter(round_number))
        record.clients = clients
        record.aggregation = RoundAggregate(method=outcome.method, accepted=outcome.accepted,
                                            rejected=outcome.rejected, adapter_path=str(folder),
                                            update_norms=outcome.update_norms)
        self._pending = {}
        return record.aggregation

    def _aggregation_options(self, method: str, global_state: dict) -> dict:
        return self.strategy.aggregation_options(method, global_state)

    # --- Evaluator ---------------------------------------------------------------------------------------------
    def evaluate_base(self) -> EvalMetrics:
        self.base_metrics = evaluate(self.model, self.tokenizer, self._test_rows, self._sample, self.device,
                                     use_adapter=False, mixed_precision=self.config.mixed_precision)
        self.base_metrics.validation_perplexity, self.base_metrics.validation_per_client = self._validation(
            use_adapter=False)
        self._score_images(self.base_metrics, use_adapter=False)
        return self.base_metrics

    def evaluate_round(self, round_number: int) -> EvalMetrics:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, self.global_adapter)
        if self._flower_round is not None:  # FEDERATION=local-flower: perplexities from the sites' NLL sums
            metrics = self._flower_metrics(self._flower_round.evaluation)
        else:
            metrics = evaluate(self.model, self.tokenizer, self._test_rows, self._sample, self.device,
                               mixed_precision=self.config.mixed_precision)
            metrics.validation_perplexity, metrics.validation_per_client = self._validation()
        self._score_images(metrics)
        self._current_round(round_number).global_ = metrics
        return metrics

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
                      if name in evaluation.get("validation", {}) and self._validation_rows.get(name)}
        validation_ppl, validation_per_client, _ = combine_split(validation)
        prompts = [example["prompt"] for example in self._sample]
        references = [example["messages"][-1]["content"] for example in self._sample]
        hypotheses = generate_replies(self.model, self.tokenizer, prompts, self.device) if prompts else []
        return EvalMetrics(perplexity=perplexity, num_tokens=count, per_client=per_client,
                           bleu=bleu(hypotheses, references), chrf=chrf(hypotheses, references),
                           distinct_1=distinct_n(hypotheses, 1), distinct_2=distinct_n(hypotheses, 2),
                           samples=[{"id": e["id"], "reference": r, "generated": h}
                                    for e, r, h in zip(self._sample, references, hypotheses)],
                           validation_perplexity=validation_ppl, validation_per_client=validation_per_client,
                           **rouge(hypotheses, references))

    def _score_images(self, metrics: EvalMetrics, use_adapter: bool = True) -> None:
        """CLIP score of the replies to held-out image posts, or the reason it is not computed, into `metrics`."""
        scores = image_text_scores(
            self.model, self.tokenizer, self._image_examples, self.device,
            self.config.image_processor if self.config.support_multimodal else None, use_adapter=use_adapter,
            known_replies={sample["id"]: sample["generated"] for sample in metrics.samples})
        for name, value in scores.items():
            setattr(metrics, name, value)

    def _validation(self, rows: dict[str, list[dict]] | None = None,
                    use_adapter: bool = True) -> tuple[float | None, dict[str, float]]:
        """Perplexity on the validation splits (default: all clients'), overall and per client."""
        return split_perplexities(self.model, self._validation_rows if rows is None else rows,
                                  self.tokenizer.pad_token_id, self.device, use_adapter=use_adapter,
                                  mixed_precision=self.config.mixed_precision)

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
            per_client, unions = {}, []
            for client, rows in self._train_rows.items():
                fits = [{**self.fit_config(r.round), "proximal_mu": 0.0} for r in trained]
                run = self._train_in_chunks(f"{client}-alone", rows, fits, {client: self._validation_rows[client]})
                metrics = self._test_metrics(run["state"])
                per_client[client] = {"own": metrics.per_client.get(client, metrics.perplexity),
                                      "union": metrics.perplexity, "steps": run["steps"],
                                      "best_round": run["best_round"],
                                      "validation_per_round": run["validation_per_round"]}
                unions.append(metrics.perplexity)
            steps = per_client[next(iter(per_client))]["steps"]
            entry = {"perplexity": sum(unions) / len(unions), "per_client": per_client,
                     "description": f"each client alone, {steps} steps in {len(trained)} round-equivalent chunks, "
                                    "read at its best chunk on its own validation split; perplexity = mean over "
                                    "clients on all held-out test replies"}
        elif kind == "centralized":
            pooled = [row for rows in self._train_rows.values() for row in rows]
            epochs = self.config.local_epochs * len(self._train_rows) + 1  # enough batches; the step cap binds
            fits = [{**self.fit_config(r.round), "proximal_mu": 0.0, "local_epochs": epochs,
                     "max_steps": sum(c.metrics["steps"] for c in r.clients)} for r in trained]
            run = self._train_in_chunks("centralized", pooled, fits, self._validation_rows)
            metrics = self._test_metrics(run["state"])
            entry = {"perplexity": metrics.perplexity,
                     "per_client": {k: {"own": v} for k, v in metrics.per_client.items()},
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
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, self.global_adapter)
        return entry

    def _train_in_chunks(self, name: str, rows: list[dict], fits: list[dict],
                         validation_rows: dict[str, list[dict]]) -> dict:
        """Fit chunk after chunk from the initial adapter, scoring validation after each; keep the best chunk's
        adapter (lowest validation perplexity; the last one where there is no validation split)."""
        state, steps, scores = self.initial_adapter, 0, []
        best_state, best_round = None, None
        for fit in fits:
            result = LocalTrainer(name, self.model, self.tokenizer, rows, self.device,
                                  mixed_precision=self.config.mixed_precision).fit(state, fit)
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
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)
        return evaluate(self.model, self.tokenizer, self._test_rows, [], self.device,
                        mixed_precision=self.config.mixed_precision)

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
            agent_steps=self.agent_steps)

    def history(self) -> dict:
        """`run_history()` in its history.json form (plain dicts and lists)."""
        return self.run_history().as_json()

    # --- crash-safe state ----------------------------------------------------------------------------------------
    def save_state(self, round_number: int, total_rounds: int) -> Path:
        """After a completed round: everything `restore` needs to continue exactly where this left off."""
        state = {"round": round_number, "total_rounds": total_rounds, "history": self.history(),
                 "settings": self.config.public_settings()}
        optimizer = self.server_optimizer.state_dict() if self.server_optimizer is not None else None
        return save_round_state(self.paths, round_number, state, self.global_adapter, optimizer)

    def restore(self) -> dict:
        """Reload the newest saved round: data shards, history, global adapter, server-optimizer state."""
        state, global_adapter, optimizer = load_round_state(self.paths)
        history = parse_run_history(state["history"], f"the saved state of run {self.paths.run_id}")
        self.collection, self.data, self.base_metrics = history.collection, history.data, history.base
        self.rounds, self.agent_steps = history.rounds, history.agent_steps
        _ = self.model  # load the base model and build the adapter before overwriting its weights
        self._load_client_data()
        self.global_adapter = global_adapter
        if optimizer is not None:
            self.server_optimizer = make_server_optimizer(optimizer["name"])
            self.server_optimizer.load_state_dict(optimizer)
        log.info("Resumed run %s after round %d of %d", self.paths.run_id, state["round"], state["total_rounds"])
        self._scalars = None  # a new writer (purge_step=0) replaces whatever the stopped session wrote
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
