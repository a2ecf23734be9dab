"""Many clients in-process: client data stays on disk, only sampled clients' training rows are ever tokenized, and
the held-out evaluation (streamed over the clients' files) gives exactly the numbers of the eager computation."""
import random
from pathlib import Path

import pytest
from conftest import _snapshot_text, tiny_run_config

NUM_CLIENTS = 50
SPLITS = {"train": 4, "validation": 2, "test": 2}


def _write_clients(folder: Path):
    """NUM_CLIENTS shards in the preprocessor's layout, real snapshot text; every 7th test example has an image."""
    from fl_crew_reddit.preprocessing.pipeline import ClientShard, PreprocessReport, write_jsonl

    texts = [t for t in _snapshot_text() if 20 < len(t) < 400]
    shards, n = [], 0
    for index in range(NUM_CLIENTS):
        name = f"client-{index}"
        for split, count in SPLITS.items():
            rows = []
            for _ in range(count):
                prompt, reply = texts[n % len(texts)], texts[(n + 1) % len(texts)]
                rows.append({"id": f"c{n}", "post_id": f"p{n // 2}", "subreddit": "test", "prompt": prompt,
                             "messages": [{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": reply}],
                             "image_paths": ["missing.png"] if split == "test" and n % 7 == 0 else []})
                n += 1
            write_jsonl(folder / name / f"{split}.jsonl", rows)
        shards.append(ClientShard(name=name, subreddits={"test": 8}, num_train=SPLITS["train"],
                                  num_test=SPLITS["test"], num_validation=SPLITS["validation"],
                                  train_path=str(folder / name / "train.jsonl"),
                                  test_path=str(folder / name / "test.jsonl"),
                                  validation_path=str(folder / name / "validation.jsonl"), train_tokens=0))
    return PreprocessReport(num_comments=0, num_examples=n, dropped={}, clients=shards, examples_path="")


def test_only_sampled_clients_are_tokenized_and_evaluation_is_exact(tiny_model_dir, tmp_path, monkeypatch):
    # Prepare: 50 clients on disk, 2 sampled per round; every file the sites read is recorded.
    from fl_crew_reddit.evaluation.evaluator import evaluate, split_perplexities
    from fl_crew_reddit.preprocessing.pipeline import read_jsonl
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.site import data as site_data
    from fl_crew_reddit.training.batching import tokenize_all
    from fl_crew_reddit.workspace import CACHED_SITES, FederatedWorkspace

    monkeypatch.chdir(tmp_path)
    report = _write_clients(tmp_path / "clients")
    config = tiny_run_config(tiny_model_dir, tmp_path, num_clients=NUM_CLIENTS, fraction_fit=0.04,
                             min_fit_clients=1, local_epochs=1, max_local_steps=1, eval_samples=5,
                             support_multimodal=False, tensorboard=False)
    read = []
    monkeypatch.setattr(site_data, "read_jsonl", lambda path: read.append(Path(path)) or read_jsonl(path))
    workspace = FederatedWorkspace(config, RunPaths(tmp_path, "run-scale").create())

    # Execute: index the clients, evaluate the base model, one round.
    workspace.use_data(report)
    assert read == []  # indexing tokenizes nothing
    base = workspace.evaluate_base()
    workspace.start_round(1)
    selected = workspace.select_clients(1)
    for client in selected:
        workspace.train_client(client, 1)
    workspace.aggregate(1)
    metrics = workspace.evaluate_round(1)

    # Assert: training rows were read for the sampled clients only, and few clients' rows stay in memory ...
    assert len(selected) == 2
    assert sorted(p.parent.name for p in read if p.name == "train.jsonl") == selected
    assert len(workspace._site_cache) <= CACHED_SITES
    # ... the BLEU sample and the image examples are those drawn from the whole test union ...
    all_test = [e for shard in report.clients for e in read_jsonl(Path(shard.test_path))]
    assert workspace._sample == random.Random(config.seed).sample(all_test, 5)
    expected = [e for e in all_test if e["image_paths"]][:config.clip_score_examples]
    assert [e["id"] for e in workspace._image_examples] == [e["id"] for e in expected]
    # their image paths resolved against the shard's own folder (preprocessing/data_paths.py), never left relative
    assert all(Path(p).is_absolute() and Path(p).name == "missing.png"
               for e in workspace._image_examples for p in e["image_paths"])
    # ... and the streamed perplexities equal the eager ones (everything tokenized up front), to the last bit.
    tokenizer, model = workspace.tokenizer, workspace.model

    def eager(split):
        return {s.name: tokenize_all(tokenizer, read_jsonl(Path(getattr(s, f"{split}_path"))), config.max_seq_length)
                for s in report.clients}

    expected = evaluate(model, tokenizer, eager("test"), workspace._sample, workspace.device, mixed_precision="no")
    validation, validation_per_client = split_perplexities(model, eager("validation"), tokenizer.pad_token_id,
                                                           workspace.device, mixed_precision="no")
    assert metrics.perplexity == expected.perplexity and metrics.num_tokens == expected.num_tokens
    assert metrics.per_client == expected.per_client and len(metrics.per_client) == NUM_CLIENTS
    assert [s["generated"] for s in metrics.samples] == [s["generated"] for s in expected.samples]
    assert metrics.validation_perplexity == validation
    assert metrics.validation_per_client == validation_per_client
    assert base.perplexity != pytest.approx(metrics.perplexity, rel=1e-9)  # the round's adapter was evaluated
    workspace.close()
