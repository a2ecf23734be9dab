"""Command line: `python -m fl_crew_reddit.main [run] [--rounds N] [--resume [RUN]]`, `resume [RUN]`, `collect`,
`serve-mcp`, `prepare-model`, `report [RUN]`, and for a deployment on several machines `certs`, `superlink`,
`prepare-site`, `site` (fl_crew_reddit/federation/deploy.py).

Settings come from the environment and `.env` (see .env.example); an invalid value stops here with one message.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: serve-mcp and --help start fast
    from fl_crew_reddit.history import EvalMetrics, RunHistory


def _console_logging(verbose: bool) -> None:
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "fl_crew_reddit_console", False)]:
        root.removeHandler(old)  # an earlier command in this process (its stdout may be gone)
    handler = logging.StreamHandler(sys.stdout)
    handler.fl_crew_reddit_console = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: verbose or record.name == "fl_crew_reddit.progress"
                      or record.levelno >= logging.WARNING)
    from fl_crew_reddit.config import MaskUrlCredentials

    handler.addFilter(MaskUrlCredentials())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fl_crew_reddit").setLevel(logging.INFO)
    for noisy in ("httpx", "transformers", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # our own bars cover the long work; model loading takes a second


# The run's own log once a run has started: where `main` writes the trace of an error nothing else handled.
_run_log: Path | None = None


def _say(message) -> None:
    """One line on stderr, URL credentials masked: what went wrong and what to do (traces go to a log file)."""
    from fl_crew_reddit.config import mask_url_credentials

    text = " | ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(mask_url_credentials(text), file=sys.stderr, flush=True)


def _log_trace(error: BaseException, log_file: Path | None = None, config=None) -> Path | None:
    """Append `error`'s full trace (URL credentials masked) to `log_file`, else to logs/errors.log
    (`config.error_log_file`); return the file, or None if none could be written."""
    import time
    import traceback

    from fl_crew_reddit.config import error_log_file, mask_url_credentials

    target = log_file or error_log_file(config)
    if target is None:
        return None
    trace = "".join(traceback.format_exception(error))
    try:
        with open(target, "a", encoding="utf-8") as out:
            out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR python -m fl_crew_reddit.main "
                      f"{mask_url_credentials(' '.join(sys.argv[1:]))}\n{mask_url_credentials(trace)}\n")
    except OSError:
        return None
    return target


def _stop(error: BaseException, code: int = 2, log_file: Path | None = None, config=None) -> int:
    """A setting or input the user can fix: its one-line message on stderr, the trace in the log; exit `code`."""
    _log_trace(error, log_file, config)
    _say(error)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fl_crew_reddit.main",
                                     description="Federated LoRA fine-tuning on Reddit data, run by a CrewAI crew.")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run federated rounds (the default command)")
    run.add_argument("--rounds", type=int, help="number of rounds (overrides FEDERATION_ROUNDS)")
    run.add_argument("--resume", nargs="?", const="", metavar="RUN",
                     help="continue a stopped run after its last completed round (default: the newest)")
    run.add_argument("--verbose", action="store_true", help="also show the full log on the console")
    resume = commands.add_parser("resume", help="continue a stopped run (same as run --resume)")
    resume.add_argument("run", nargs="?", default="", help="run id under results/ (default: the newest)")
    resume.add_argument("--rounds", type=int, help="total rounds (default: the run's own)")
    resume.add_argument("--verbose", action="store_true")
    serve = commands.add_parser("serve-mcp", help="serve the read-only Reddit MCP server on stdio or streamable HTTP",
                                add_help=False)
    serve.add_argument("server_args", nargs=argparse.REMAINDER,
                       help="passed on (--backend, --dump-dir, --transport, --host, --port; see serve-mcp --help)")
    collect = commands.add_parser("collect",
                                  help="only collect Reddit data through the MCP server into data/collected/")
    collect.add_argument("--subreddits", help="comma-separated (default: SUBREDDITS, else all the backend has)")
    collect.add_argument("--posts", type=int, help="posts per subreddit (default: POSTS_PER_SUBREDDIT)")
    collect.add_argument("--query", action="append", default=[],
                         help="search query; its matching posts are collected first (repeatable, at most 5)")
    commands.add_parser("prepare-model", help="prepare the embedded base model once (set-up does this)")
    report = commands.add_parser("report", help="write report.md, report.html and convergence.png for a run")
    report.add_argument("run", nargs="?", help="a run id under results/ or a run folder (default: results/latest)")
    from pathlib import Path

    certs = commands.add_parser("certs", help="make a federation's CA, SuperLink certificate and site keys")
    certs.add_argument("--out", type=Path, required=True, help="folder to write (ca.key stays with the operator)")
    certs.add_argument("--sites", required=True, help="comma-separated site names, one key pair each")
    certs.add_argument("--hosts", default="", help="comma-separated names / IPs of the SuperLink (its certificate)")
    certs.add_argument("--overwrite", action="store_true", help="replace an existing CA (every site needs the new one)")
    superlink = commands.add_parser("superlink", help="run the federation's SuperLink (TLS + node authentication)")
    superlink.add_argument("--certs", type=Path, help="the `certs` folder; its <site>.pub files are registered")
    superlink.add_argument("--listen", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    superlink.add_argument("--fleet-port", type=int, default=9092, help="Fleet API, for the sites (default 9092)")
    superlink.add_argument("--control-port", type=int, default=9093, help="Control API, for `run` (default 9093)")
    superlink.add_argument("--state", type=Path, default=Path("flower-state"), help="its database and CLI config")
    superlink.add_argument("--insecure", action="store_true", help="no TLS, no node authentication: loopback only")
    site = commands.add_parser("site", help="run this machine's site: a SuperNode serving its own data folder")
    site.add_argument("--name", required=True, help="the site's name (its key is <certs>/<name>.key)")
    site.add_argument("--data-dir", type=Path, required=True, help="its prepared data (prepare-site)")
    site.add_argument("--superlink", required=True, help="host:port of the SuperLink's Fleet API (port 9092)")
    site.add_argument("--certs", type=Path, help="folder with ca.crt and this site's <name>.key")
    site.add_argument("--threads", type=int, default=0, help="CPU threads for training (0: torch's default)")
    site.add_argument("--port", type=int, default=9094,
                      help="the SuperNode's local API on 127.0.0.1 (default 9094; one per site on a machine)")
    site.add_argument("--insecure", action="store_true", help="no TLS: only with a loopback SuperLink")
    site.add_argument("--lora-r", type=int, default=0,
                      help="the LoRA rank this site can train (lower capacity; needs AGGREGATION_METHOD=svd_exact on "
                           "the server); default: the server's LORA_R")
    prepare = commands.add_parser("prepare-site", help="collect and preprocess this site's own data (its .env)")
    prepare.add_argument("--data-dir", type=Path, required=True, help="where the site's splits are written")
    prepare.add_argument("--subreddits", help="comma-separated (default: SUBREDDITS of this site's settings)")
    prepare.add_argument("--posts", type=int, help="posts per subreddit (default: POSTS_PER_SUBREDDIT)")
    prepare.add_argument("--query", action="append", default=[], help="search query collected first (repeatable)")
    return parser


def run_command(rounds: int | None, verbose: bool, resume: str | None = None) -> int:
    from fl_crew_reddit.config import ConfigError, check_writable_folder, load_config

    try:  # every setting is checked before anything heavy loads
        config = load_config()
        check_writable_folder(config)
        if resume is None:
            from fl_crew_reddit.data_source import check_subreddits

            check_subreddits(config)
    except ConfigError as error:
        return _stop(error)
    _console_logging(verbose)
    if rounds is not None and rounds < 1:
        print(f"--rounds={rounds} is invalid: use a whole number of at least 1", file=sys.stderr)
        return 2

    from fl_crew_reddit.aggregation import GlobalAdapterError, NotEnoughClientsError
    from fl_crew_reddit.crew.manager import FLCrewRedditManager
    from fl_crew_reddit.history import HistoryFileError
    from fl_crew_reddit.run_state import NothingSaved, find_run
    from fl_crew_reddit.runs import new_run_id
    from fl_crew_reddit.training.model_loading import BaseModelUnavailable

    manager = FLCrewRedditManager(config)
    try:
        run_id, why = find_run(config.fl_crew_reddit_dir.resolve(), resume or None, rounds) if resume is not None \
            else (new_run_id(), "")
    except (NothingSaved, ValueError) as error:
        print(f"Cannot resume: {error}", file=sys.stderr)
        return 2
    if why:
        logging.getLogger("fl_crew_reddit.progress").info("Resuming run %s: %s", run_id, why)
    global _run_log
    _run_log = config.fl_crew_reddit_dir.resolve() / "logs" / f"{run_id}.log"  # as RunPaths names it
    _stop_cleanly_on_ctrl_c(run_id)
    resume_hint = f"python -m fl_crew_reddit.main --resume {run_id}"
    try:
        if resume is not None:
            result = manager.resume(run_id, num_rounds=rounds)
        else:
            result = manager.run_federated_learning(num_rounds=rounds, run_id=run_id)
    except (BaseModelUnavailable, ConfigError) as error:  # e.g. LORA_TARGET_MODULES, checked on the loaded model
        return _stop(error, log_file=_run_log)
    except (NothingSaved, HistoryFileError) as error:
        print(f"Cannot resume: {error}", file=sys.stderr)
        return 2
    except NotEnoughClientsError as error:
        print(f"Run stopped: {error}. Completed rounds are saved; fix the clients and continue with: {resume_hint}",
              file=sys.stderr)
        return 1
    except GlobalAdapterError as error:
        print(f"Run stopped: {error}.", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in STORAGE_ERRORS:
            raise
        where = Path(error.filename).parent if error.filename else config.fl_crew_reddit_dir
        _log_trace(error, _run_log)
        if _has_saved_state(config.fl_crew_reddit_dir.resolve(), run_id):
            then = f"The last saved state is intact: free space or fix the folder's permissions, then continue " \
                   f"with: {resume_hint}"
        else:  # it stopped before its first stage was saved: --resume would find nothing
            then = f"nothing of run {run_id} was saved: free space or fix the folder's permissions, then start it again"
        _say(f"Run stopped: cannot write to {where}: {error.strerror}. {then}")
        return 1
    _write_report(result.history_path)
    _print_summary(result.history)
    base = _fixed(result.history.base.perplexity if result.history.base else None)
    final = _fixed(result.perplexities()[-1] if result.perplexities() else None)
    print(f"\nRun {result.run_id} finished in {result.seconds:.0f}s: held-out perplexity {base} → {final}")
    if result.best_round is not None:
        best = next(r for r in result.history.rounds if r.round == result.best_round).global_
        print(f"  best round:   {result.best_round} on validation (test perplexity {_fixed(best.perplexity)}): "
              f"{result.best_adapter}")
    print(f"  history:      {result.history_path}")
    print(f"  final adapter {result.final_adapter}")
    print(f"  log:          {result.log_path}")
    return 0


STORAGE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


def _has_saved_state(base: Path, run_id: str) -> bool:
    """Whether `run_id` has a readable saved state that --resume could continue from."""
    from fl_crew_reddit.run_state import newest_state
    from fl_crew_reddit.runs import RunPaths

    try:
        return newest_state(RunPaths(base, run_id)) is not None
    except OSError:
        return False


def _stop_cleanly_on_ctrl_c(run_id: str) -> None:
    """Ctrl+C: say how to resume and exit with 130 at once.

    The Flow runs each step in a worker thread that a KeyboardInterrupt cannot stop, and asyncio would only cancel
    the waiting task. The state on disk is always complete (written atomically after each round), so leaving now
    loses only the round in progress.
    """
    import signal

    def stop(signum, frame):
        print(f"\nStopped. Completed rounds are saved; continue with: python -m fl_crew_reddit.main --resume {run_id}",
              file=sys.stderr, flush=True)
        if "fl_crew_reddit.federation.flower" in sys.modules:  # FEDERATION=local-flower: its SuperLink and nodes
            sys.modules["fl_crew_reddit.federation.flower"].stop_all()
        logging.shutdown()
        sys.stdout.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, stop)


def _fixed(value: float | None, digits: int = 2) -> str:
    from fl_crew_reddit.history import finite

    return "—" if finite(value) is None else f"{value:.{digits}f}"


def _print_summary(history: RunHistory) -> None:
    """The run at a glance: one row per round, the base model first, baselines last."""
    from rich.console import Console
    from rich.table import Table

    def scores(metrics: EvalMetrics | None) -> list[str]:
        if metrics is None:
            return ["—"] * 4
        return [_fixed(metrics.perplexity), _fixed(metrics.validation_perplexity), _fixed(metrics.bleu),
                _fixed(metrics.rouge_l, 3)]

    table = Table(title="Held-out results", title_justify="left")
    for column in ("round", "perplexity", "validation", "BLEU", "ROUGE-L", "clients", "skipped", "seconds"):
        table.add_column(column, justify="right" if column not in ("clients", "skipped") else "left")
    table.add_row("base", *scores(history.base), "", "", "")
    for record in history.rounds:
        label = f"{record.round} (best)" if record.round == history.best_round else str(record.round)
        table.add_row(label, *scores(record.global_), ", ".join(c.name for c in record.clients),
                      ", ".join(record.skipped), f"{record.seconds:.0f}")
    for name, entry in history.baselines.items():
        table.add_row(name, _fixed(entry.perplexity), "", "", "", "", "", "")
    console = Console()
    console.width = max(console.width, 120)  # eight columns: do not squeeze numbers into ellipses
    console.print(table)


def collect_command(subreddits: str | None, posts: int | None, queries: list[str] | None = None) -> int:
    from fl_crew_reddit.config import ConfigError, check_writable_folder, load_config

    _console_logging(False)
    queries = [q.strip() for q in queries or [] if q.strip()]
    if len(queries) > 5 or any(len(q) > 100 for q in queries):
        print("collect: at most 5 --query values of at most 100 characters each", file=sys.stderr)
        return 2
    names = [s.strip().removeprefix("r/") for s in subreddits.split(",") if s.strip()] if subreddits else None
    try:
        config = load_config()
        check_writable_folder(config)
        from fl_crew_reddit.data_source import check_subreddits

        if names:
            check_subreddits(config, names, variable="--subreddits")
        else:
            check_subreddits(config)
    except ConfigError as error:
        return _stop(error)
    from fl_crew_reddit.data_source import open_mcp_client
    from fl_crew_reddit.reddit.client import RedditMCPError
    from fl_crew_reddit.reddit.collector import collect
    from fl_crew_reddit.runs import RunPaths, new_run_id

    paths = RunPaths(config.fl_crew_reddit_dir.resolve(), new_run_id()).create()
    try:
        with open_mcp_client(config) as client:
            report = collect(client, names if names is not None else config.subreddits,
                             posts or config.posts_per_subreddit, paths.collected, queries=queries)
    except RedditMCPError as error:
        _log_trace(error, config=config)
        _say(f"Collection failed: {error}")
        return 1
    for item in report.subreddits:
        print(f"r/{item.subreddit}: {item.num_posts} posts, {item.num_comments} comments -> {item.path}")
    return 0


def serve_mcp_command(argv: list[str]) -> int:
    """`serve-mcp`: our MCP server over the backend the settings name; --backend / --dump-dir override them.

    This is also the stdio server the collector starts (`data_source.server_command`), so the child reads its
    settings, secrets included, from the environment exactly as `run` does.
    """
    from fl_crew_reddit.reddit.server import (
        add_server_arguments,
        check_server_arguments,
        http_guard,
        log_to_stderr,
        serve,
    )

    parser = add_server_arguments(argparse.ArgumentParser(
        prog="python -m fl_crew_reddit.main serve-mcp",
        description="MCP server with read-only Reddit tools (snapshot, dump or live)."))
    args = parser.parse_args(argv)
    check_server_arguments(parser, args)
    log_to_stderr(args.log_level)
    from fl_crew_reddit.config import ConfigError, load_config
    from fl_crew_reddit.data_source import make_source_backend

    overrides: dict = {}
    if args.backend:
        overrides["reddit_backend"] = args.backend
    if args.dump_dir:
        overrides["reddit_dump_dir"] = args.dump_dir
    try:
        config = load_config(**overrides)
        guard = http_guard(parser, args, config.reddit_mcp_token)  # --allow-remote without a token: exit 2
        backend = make_source_backend(config)
    except (ConfigError, NotImplementedError, FileNotFoundError, ValueError) as error:
        print(f"serve-mcp: {error}", file=sys.stderr)
        return 2
    serve(backend, transport=args.transport, host=args.host, port=args.port,
          open_world=config.reddit_backend == "live", guard=guard)
    return 0


def _write_report(history_path: str) -> None:
    from pathlib import Path

    from fl_crew_reddit.evaluation.report import build_report

    paths = build_report(Path(history_path).parent)
    print(f"  report:       {paths.md} (and {paths.html.name}, {paths.png.name})")


def report_command(run: str | None) -> int:
    from pathlib import Path

    from fl_crew_reddit.evaluation.report import ReportError, build_report, resolve_run_dir

    try:
        if run and Path(run).expanduser().is_dir():
            run_dir = Path(run).expanduser()
        else:
            from fl_crew_reddit.config import ConfigError, load_config

            try:
                results_dir = load_config().results_dir
            except ConfigError as error:
                print(error, file=sys.stderr)
                return 2
            run_dir = resolve_run_dir(run, results_dir)
        paths = build_report(run_dir)
    except ReportError as error:
        print(f"Cannot write a report: {error}", file=sys.stderr)
        return 2
    for label, path in (("markdown", paths.md), ("html", paths.html), ("plot", paths.png)):
        print(f"  {label + ':':10}{path}")
    return 0


def deployment_command(args) -> int:
    from fl_crew_reddit.federation import deploy

    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    if args.command == "certs":
        return deploy.certs_command(args.out, names(args.sites), names(args.hosts), overwrite=args.overwrite)
    if args.command == "superlink":
        return deploy.superlink_command(args.certs, args.listen, args.fleet_port, args.control_port, args.state,
                                        insecure=args.insecure)
    if args.command == "site":
        return deploy.site_command(args.name, args.data_dir, args.superlink, args.certs, insecure=args.insecure,
                                   threads=args.threads, port=args.port, lora_r=args.lora_r)
    from fl_crew_reddit.config import ConfigError, load_config

    _console_logging(False)
    try:
        config = load_config()
    except ConfigError as error:
        return _stop(error)
    return prepare_site_command(args.data_dir, config, names(args.subreddits or ""), args.posts, args.query)


def prepare_site_command(data_dir, config, subreddits: list[str] | None = None, posts: int | None = None,
                         queries: list[str] | None = None) -> int:
    """Collect through this site's own data source (its .env: REDDIT_BACKEND, dump folder, subreddits) and
    preprocess into one client's splits in `data_dir` ({train,validation,test}.jsonl + prepared.json with the
    counts, what was dropped and why). Nothing leaves the machine."""
    import json
    import shutil
    from collections import Counter

    from fl_crew_reddit.preprocessing.data_paths import data_anchor, portable_rows, read_resolved
    from fl_crew_reddit.preprocessing.pipeline import read_jsonl, write_jsonl
    from fl_crew_reddit.runs import RunPaths, write_json_atomic
    from fl_crew_reddit.workspace import FederatedWorkspace

    site_config = config.model_copy(update={"num_clients": 1, "num_trainers": 1, "federation": "inprocess"})
    paths = RunPaths(data_dir.resolve() / "work", "site").create()
    workspace = FederatedWorkspace(site_config, paths)
    try:
        collection = workspace.collect(subreddits or None, posts, queries=queries or None)
        report = workspace.preprocess()
    except Exception as error:  # the data source's own message (unknown subreddit, unreachable server, ...)
        print(f"prepare-site: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    finally:
        workspace.close()
    if not report.clients or not report.clients[0].num_train:
        print(f"prepare-site: no training examples came out of this site's data ({report.dropped})", file=sys.stderr)
        return 1
    shard = report.clients[0]
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", shard.train_path), ("test", shard.test_path),
                          ("validation", shard.validation_path)):
        if source:  # image paths re-anchored: relative to this site folder, which holds the work/ images
            target = data_dir / f"{split}.jsonl"
            rows = read_resolved(Path(source), read_jsonl(Path(source)), Counter())
            write_jsonl(target, portable_rows(rows, data_anchor(target)))
            pairs = Path(source).with_name(f"{split}_pairs.jsonl")  # the preference pairs of that split
            if pairs.is_file():
                shutil.copyfile(pairs, data_dir / pairs.name)
    summary = {"examples": {"train": shard.num_train, "validation": shard.num_validation, "test": shard.num_test},
               "pairs": {"train": shard.num_train_pairs, "validation": shard.num_validation_pairs,
                         "test": shard.num_test_pairs},
               "preference_pairs": report.preference_pairs,
               "train_tokens": shard.train_tokens, "subreddits": shard.subreddits,
               "dropped": report.dropped,
               "collected": {c.subreddit: {"posts": c.num_posts, "comments": c.num_comments, "skipped": c.skipped}
                             for c in collection.subreddits}}
    write_json_atomic(data_dir / "prepared.json", summary)
    print(json.dumps(summary))
    return 0


COMMANDS = ("run", "resume", "collect", "serve-mcp", "prepare-model", "report", "certs", "superlink", "site",
            "prepare-site")


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error nothing else handled stops it with one line on stderr (URL credentials masked),
    its full trace in the run's log or logs/errors.log: a traceback never reaches the console."""
    global _run_log
    _run_log = None  # set by run_command once the run has an id
    try:
        return _command(argv)
    except Exception as error:  # noqa: BLE001 - the one place that turns any error into a line and a log entry
        from fl_crew_reddit.config import ConfigError

        if isinstance(error, ConfigError):
            return _stop(error, log_file=_run_log)
        where = _log_trace(error, _run_log)
        _say(f"Stopped: {type(error).__name__}: {error}" + (f" (full trace in {where})" if where else ""))
        return 1


def _command(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # `run` is the default command: `main --rounds 3` means `main run --rounds 3`
    if argv[0] == "serve-mcp":  # its options belong to the server's own parser (REMAINDER drops leading options)
        return serve_mcp_command(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "prepare-model":
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        from fl_crew_reddit.training.model_loading import prepare_embedded_model

        print(prepare_embedded_model())
        return 0
    if args.command == "report":
        return report_command(args.run)
    if args.command == "collect":
        return collect_command(args.subreddits, args.posts, args.query)
    if args.command in ("certs", "superlink", "site", "prepare-site"):
        return deployment_command(args)
    if args.command == "resume":
        return run_command(args.rounds, args.verbose, resume=args.run)
    return run_command(args.rounds, args.verbose, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
