"""Preference pairs (issue 13): votes pairs from score gaps among replies to one parent, relevance pairs against a
reply to another thread, both per client and per split, every candidate left out counted by reason; the pipeline
writes `{train,validation,test}_pairs.jsonl` beside each client's SFT splits."""
from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import REDDIT_2015

from fl_crew_reddit.preprocessing.preferences import (
    PreferenceRules,
    client_pairs,
    relevance_pairs,
    reply_fits,
    scores_are_placeholders,
    split_pairs,
    vote_pairs,
)

PAIR_KEYS = {"id", "post_id", "subreddit", "kind", "prompt", "chosen", "rejected", "chosen_id", "rejected_id",
             "chosen_score", "rejected_score"}
SPLITS = ("train", "validation", "test")


def _example(cid: str, score: int | None, post: str = "p1", parent: str | None = None,
             subreddit: str = "books") -> dict:
    return {"id": cid, "post_id": post, "subreddit": subreddit, "score": score,
            "parent_id": parent or f"t3_{post}",
            "messages": [{"role": "user", "content": f"r/{subreddit}: question of {post} (parent {parent})"},
                         {"role": "assistant", "content": f"reply {cid} with a few words"}]}


def _thread() -> list[dict]:
    """Post p1: five top-level replies and two replies to comment a; post p2: one reply scoring far above all."""
    return [_example("a", 40), _example("b", 12), _example("c", 12), _example("d", 9), _example("e", 25),
            _example("f", 10, parent="t1_a"), _example("g", -3, parent="t1_a"),
            _example("x", 500, post="p2")]


# ---------------------------------------------------------------------------------------------- votes
def test_vote_pairs_keep_gap_and_ratio_drop_ties_and_cap_per_parent_largest_gaps_first():
    dropped: Counter = Counter()
    pairs = vote_pairs(_thread(), PreferenceRules(min_score_gap=5, min_score_ratio=2.0, max_pairs_per_parent=3),
                       dropped)
    # p1's top level: a>d (31), a>b, a>c (28) kept; e>d (16), e>b, e>c (13) over the cap; a-e ratio 1.6; b-c tie;
    # b-d and c-d gap 3. Under comment a (its key sorts first): f>g (-3 clipped to 1: ratio 10). p2 has one reply.
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [("f", "g"), ("a", "d"), ("a", "b"), ("a", "c")]
    assert dropped == Counter(votes_tie=1, votes_gap_too_small=2, votes_ratio_too_small=1, votes_over_parent_cap=3)
    for pair in pairs:
        assert set(pair) == PAIR_KEYS and pair["kind"] == "votes"
        assert pair["chosen_score"] > pair["rejected_score"], "the higher score is chosen"
        assert pair["chosen_score"] - pair["rejected_score"] >= 5
        assert max(pair["chosen_score"], 1) / max(pair["rejected_score"], 1) >= 2
        assert pair["chosen"] == f"reply {pair['chosen_id']} with a few words"
        assert pair["rejected"] == f"reply {pair['rejected_id']} with a few words"
    by_id = {e["id"]: e for e in _thread()}
    assert all(p["prompt"] == [by_id[p["chosen_id"]]["messages"][0]] for p in pairs), "the SFT example's prompt"


def test_vote_pairs_follow_the_settings_and_the_input_order_does_not_matter():
    loose = vote_pairs(_thread(), PreferenceRules(min_score_gap=1, min_score_ratio=1.0, max_pairs_per_parent=100),
                       Counter())
    assert len(loose) == 10 + 1 - 1, "every top-level pair but the tie, and f>g"
    shuffled = _thread()
    random.Random(3).shuffle(shuffled)
    assert vote_pairs(shuffled, PreferenceRules(), Counter()) == vote_pairs(_thread(), PreferenceRules(), Counter())
    strict = Counter()
    assert vote_pairs(_thread(), PreferenceRules(min_score_gap=100), strict) == []
    assert strict["votes_gap_too_small"] == 9 + 1 and strict["votes_tie"] == 1


def test_examples_without_a_score_are_counted_not_paired():
    dropped: Counter = Counter()
    assert vote_pairs([_example("a", None), _example("b", 50)], PreferenceRules(), dropped) == []
    assert dropped == Counter(votes_no_score=1)


def test_placeholder_scores_give_no_votes_pairs_and_null_scores():
    examples = [_example(f"c{i}", 1, post=f"p{i % 3}") for i in range(9)]
    assert scores_are_placeholders(examples)
    assert not scores_are_placeholders(_thread())
    assert not scores_are_placeholders(examples[:1]), "one reply says nothing about the source"
    built, dropped = Counter(), Counter()
    pairs = split_pairs(examples, PreferenceRules(), seed=1, scores_placeholder=True, fits=None, dropped=dropped,
                        built=built)
    assert built == Counter(relevance=9) and not any(reason.startswith("votes") for reason in dropped)
    assert all(p["kind"] == "relevance" and p["chosen_score"] is None is p["rejected_score"] for p in pairs)


# ---------------------------------------------------------------------------------------------- relevance
def _subreddits() -> list[dict]:
    return ([_example(f"b{t}{i}", i, post=f"bp{t}", subreddit="books") for t in range(4) for i in range(3)]
            + [_example(f"h{t}{i}", i, post=f"hp{t}", subreddit="history") for t in range(3) for i in range(2)]
            + [_example("lonely0", 1, post="lp0", subreddit="lonely"),
               _example("lonely1", 2, post="lp0", subreddit="lonely")])


def test_relevance_pairs_are_seeded_and_stay_in_their_subreddit_on_another_thread():
    examples = _subreddits()
    dropped: Counter = Counter()
    pairs = relevance_pairs(examples, seed=11, dropped=dropped)
    assert dropped == Counter(relevance_no_other_thread=2), "r/lonely has one thread: nothing to draw from"
    assert len(pairs) == len(examples) - 2
    by_id = {e["id"]: e for e in examples}
    for pair in pairs:
        chosen, rejected = by_id[pair["chosen_id"]], by_id[pair["rejected_id"]]
        assert set(pair) == PAIR_KEYS and pair["kind"] == "relevance"
        assert chosen["subreddit"] == rejected["subreddit"] == pair["subreddit"]
        assert chosen["post_id"] == pair["post_id"] != rejected["post_id"]
        assert pair["prompt"] == [chosen["messages"][0]] and pair["rejected"] == rejected["messages"][-1]["content"]
    shuffled = list(examples)
    random.Random(5).shuffle(shuffled)
    assert relevance_pairs(shuffled, seed=11, dropped=Counter()) == pairs, "the same pairs whatever the order"
    assert relevance_pairs(examples, seed=12, dropped=Counter()) != pairs, "another SEED draws other replies"


def test_client_pairs_never_cross_splits():
    examples = _subreddits()
    splits = {"train": [e for e in examples if e["post_id"] in {"bp0", "bp1", "hp0", "hp1"}],
              "validation": [e for e in examples if e["post_id"] in {"bp2"}],
              "test": [e for e in examples if e["post_id"] in {"bp3", "hp2", "lp0"}]}
    built, dropped = Counter(), Counter()
    pairs = client_pairs(splits, PreferenceRules(min_score_gap=1, min_score_ratio=1.0), seed=0,
                         scores_placeholder=False, fits=None, dropped=dropped, built=built)
    for split, rows in pairs.items():
        ids = {e["id"] for e in splits[split]}
        assert all(p["chosen_id"] in ids and p["rejected_id"] in ids for p in rows), split
    # validation holds one thread only: its replies find no other thread; test's r/history and r/lonely neither.
    assert not [p for p in pairs["validation"] if p["kind"] == "relevance"]
    assert dropped["relevance_no_other_thread"] == 3 + 3 + 2 + 2
    assert sum(built.values()) == sum(len(rows) for rows in pairs.values())


# ---------------------------------------------------------------------------------------------- too long
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_pairs_whose_reply_would_be_cut_are_counted_and_left_out(tokenizer):
    long_reply = " ".join(["a long reply about books and reading"] * 20)
    examples = [_example("short1", 30, post="p1"), _example("short2", 1, post="p1"), _example("other", 1, post="p2")]
    examples[1]["messages"][1]["content"] = long_reply
    fits = reply_fits(tokenizer, 64)
    assert fits(examples[0]["messages"][:1], examples[0]["messages"][1]["content"])
    assert not fits(examples[1]["messages"][:1], long_reply)
    built, dropped = Counter(), Counter()
    pairs = split_pairs(examples, PreferenceRules(), seed=0, scores_placeholder=False, fits=fits, dropped=dropped,
                        built=built)
    assert all(long_reply not in (p["chosen"], p["rejected"]) for p in pairs)
    assert dropped["votes_over_max_seq_length"] == 1  # short1 > short2 (gap 29), but short2 does not fit
    assert dropped["relevance_over_max_seq_length"] >= 1
    assert sum(built.values()) == len(pairs)


# ---------------------------------------------------------------------------------------------- the pipeline
def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _preprocess(collected, tokenizer, tmp_path, **overrides):
    from fl_crew_reddit.preprocessing.pipeline import QualityRules, preprocess

    settings = dict(run_id="run", data_dir=tmp_path, num_clients=3, partition="subreddit",
                    max_examples_per_client=None, max_seq_length=128, test_fraction=0.2, seed=7,
                    support_multimodal=False, validation_fraction=0.1, quality=QualityRules(languages=frozenset()))
    return preprocess(collected, tokenizer, **{**settings, **overrides})


def _check_client_files(report) -> Counter:
    """Every client's pair files: the counts of its shard, each pair inside one split of that client, made of that
    split's examples with their exact prompt and reply texts; returns the pairs per kind."""
    kinds: Counter = Counter()
    for shard in report.clients:
        folder = Path(shard.train_path).parent
        split_examples = {split: {e["id"]: e for e in _read(folder / f"{split}.jsonl")} for split in SPLITS}
        threads = {split: {e["post_id"] for e in rows.values()} for split, rows in split_examples.items()}
        assert not (threads["train"] & threads["test"] or threads["train"] & threads["validation"]
                    or threads["validation"] & threads["test"]), "a thread in two splits"
        for split in SPLITS:
            pairs = _read(folder / f"{split}_pairs.jsonl")
            assert len(pairs) == getattr(shard, f"num_{split}_pairs"), (shard.name, split)
            examples = split_examples[split]
            for pair in pairs:
                assert set(pair) == PAIR_KEYS
                chosen, rejected = examples[pair["chosen_id"]], examples[pair["rejected_id"]]
                assert pair["prompt"] == [chosen["messages"][0]]
                assert (pair["chosen"], pair["rejected"]) == (chosen["messages"][1]["content"],
                                                              rejected["messages"][1]["content"])
                assert pair["post_id"] == chosen["post_id"] and pair["subreddit"] == chosen["subreddit"]
                assert rejected["subreddit"] == chosen["subreddit"]
                if pair["kind"] == "votes":
                    assert rejected["parent_id"] == chosen["parent_id"] and chosen["score"] > rejected["score"]
                else:
                    assert rejected["post_id"] != chosen["post_id"]
                kinds[pair["kind"]] += 1
    return kinds


@pytest.mark.parametrize("partition", ["subreddit", "author"])
def test_the_pipeline_writes_pair_files_for_every_client_from_the_snapshot(tokenizer, tmp_path, partition):
    from fl_crew_reddit.reddit.backends import SnapshotBackend

    backend = SnapshotBackend()
    collected = backend.threads(backend.list_subreddits(), posts_per_subreddit=40)
    report = _preprocess(collected, tokenizer, tmp_path, partition=partition)
    kinds = _check_client_files(report)
    summary = report.preference_pairs
    assert summary["scores_placeholder"] is False
    assert kinds["votes"] > 0 and kinds["relevance"] > 0, "the snapshot has real scores and several threads"
    assert summary["built"] == dict(kinds)
    assert sum(summary["splits"].values()) == sum(kinds.values())
    assert all(summary["splits"][split] > 0 for split in SPLITS)
    assert summary["dropped"]["votes_gap_too_small"] > 0 and summary["dropped"]["votes_tie"] > 0
    assert set(summary["dropped"]) <= {"votes_tie", "votes_gap_too_small", "votes_ratio_too_small",
                                       "votes_over_parent_cap", "votes_over_max_seq_length", "votes_no_score",
                                       "relevance_no_other_thread", "relevance_over_max_seq_length"}
    json.loads(report.model_dump_json())  # the report (history.json) carries it


def test_the_pipeline_follows_pref_pair_kinds(tokenizer, tmp_path):
    from fl_crew_reddit.preprocessing.pipeline import QualityRules
    from fl_crew_reddit.reddit.backends import SnapshotBackend

    backend = SnapshotBackend()
    collected = backend.threads(backend.list_subreddits(), posts_per_subreddit=20)
    rules = QualityRules(languages=frozenset(), preferences=PreferenceRules(kinds=("votes",), min_score_gap=1,
                                                                            min_score_ratio=1.0))
    report = _preprocess(collected, tokenizer, tmp_path, quality=rules)
    kinds = _check_client_files(report)
    assert set(kinds) == {"votes"} and report.preference_pairs["built"] == {"votes": kinds["votes"]}
    assert "votes_ratio_too_small" not in report.preference_pairs["dropped"]
    none = _preprocess(collected, tokenizer, tmp_path / "none",
                       quality=QualityRules(languages=frozenset(), preferences=PreferenceRules(kinds=())))
    assert _check_client_files(none) == Counter() and none.preference_pairs["built"] == {}


def test_quality_rules_from_settings_pass_the_pref_settings_on(tiny_model_dir, tmp_path):
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.preprocessing.pipeline import QualityRules

    config = FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=tmp_path, pref_pair_kinds="relevance",
                                pref_min_score_gap=9, pref_min_score_ratio=1.5, pref_max_pairs_per_parent=2)
    assert QualityRules.from_settings(config).preferences == PreferenceRules(
        kinds=("relevance",), min_score_gap=9, min_score_ratio=1.5, max_pairs_per_parent=2)
    assert FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=tmp_path).pref_pair_kinds == ["votes", "relevance"]


@pytest.mark.skipif(not (REDDIT_2015 / "books" / "submissions.jsonl").is_file(),
                    reason=f"reddit-2015 sample not found at {REDDIT_2015}")
def test_reddit_2015_scores_are_placeholders_so_only_relevance_pairs(tokenizer, tmp_path, caplog):
    from fl_crew_reddit.reddit.backends import DumpBackend

    backend = DumpBackend(REDDIT_2015)
    collected = backend.threads(["books", "history", "programming"], posts_per_subreddit=30)
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.preprocessing.pipeline"):
        report = _preprocess(collected, tokenizer, tmp_path)
    assert report.preference_pairs["scores_placeholder"] is True
    assert any("placeholders" in record.getMessage() for record in caplog.records)
    kinds = _check_client_files(report)
    assert set(kinds) == {"relevance"} and report.preference_pairs["built"] == {"votes": 0,
                                                                                 "relevance": kinds["relevance"]}
    pairs = _read(Path(report.clients[0].train_path).parent / "train_pairs.jsonl")
    assert pairs and all(p["chosen_score"] is None and p["rejected_score"] is None for p in pairs)


@pytest.mark.e2e
def test_prepare_site_copies_the_pair_files_and_reports_their_counts(tiny_config, tmp_path, capsys):
    from fl_crew_reddit.federation.flower import site_data_summary
    from fl_crew_reddit.main import prepare_site_command

    site = tmp_path / "site-0"
    assert prepare_site_command(site, tiny_config, ["cooking", "gardening"], 20) == 0
    summary = json.loads((site / "prepared.json").read_text(encoding="utf-8"))
    assert summary["pairs"]["train"] > 0
    for split in SPLITS:  # 16 training examples and a 12-reply test split: held-out pairs may be few or none
        assert summary["pairs"][split] == len(_read(site / f"{split}_pairs.jsonl")), split
        ids = {e["id"] for e in _read(site / f"{split}.jsonl")}
        assert all(p["chosen_id"] in ids and p["rejected_id"] in ids for p in _read(site / f"{split}_pairs.jsonl"))
    assert summary["preference_pairs"]["scores_placeholder"] is False
    assert site_data_summary(site, {})["pairs"] == summary["pairs"], "what the site tells the server"
