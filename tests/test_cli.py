"""The command line: default command, collect, clear errors with exit code 2, the end-of-run summary table."""
import json

from fl_crew_reddit.main import _print_summary, main


def test_collect_writes_one_file_per_subreddit(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(tmp_path))
    assert main(["collect", "--subreddits", "cooking,r/learnpython", "--posts", "3"]) == 0
    files = sorted((tmp_path / "data" / "collected").glob("run-*/*.json"))
    assert [f.name for f in files] == ["cooking.json", "learnpython.json"]
    assert len(json.loads(files[0].read_text())["posts"]) == 3
    assert "r/cooking: 3 posts" in capsys.readouterr().out


def test_invalid_setting_stops_with_exit_code_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AGGREGATION_METHOD", "nope")
    assert main(["--rounds", "1"]) == 2
    assert "AGGREGATION_METHOD='nope' is invalid" in capsys.readouterr().err


def test_resume_without_saved_state_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(tmp_path))
    assert main(["--resume"]) == 2
    assert "no unfinished run with saved state" in capsys.readouterr().err


def test_summary_table_lists_base_rounds_and_baselines(capsys):
    from pathlib import Path

    from fl_crew_reddit.history import load_run_history

    _print_summary(load_run_history(Path(__file__).parent / "fixtures" / "run_history" / "history.json"))
    out = capsys.readouterr().out
    assert "38.42" in out and "29.89" in out and "2 (best)" in out and "client-1" in out
    assert "local_only" in out and "33.67" in out and "centralized" in out and "29.11" in out


def test_collect_with_a_query_takes_the_matching_posts_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(tmp_path))
    assert main(["collect", "--subreddits", "cooking", "--posts", "3", "--query", "garlic"]) == 0
    collected = json.loads(next((tmp_path / "data" / "collected").glob("run-*/cooking.json")).read_text())
    matched = collected["queries"]["garlic"]
    assert matched and set(matched) <= {post["id"] for post in collected["posts"]}
    assert all("garlic" in (p["title"] + " " + (p.get("selftext") or "")).lower()
               for p in collected["posts"] if p["id"] in matched)
    assert main(["collect", "--query", "x" * 101]) == 2
