"""Shared fixtures: a tiny random Llama model with a real (tiny) BPE tokenizer and ChatML template, saved as a
local model folder, so unit tests take milliseconds and the end-to-end test runs the real loop without the hub."""
from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

import fl_crew_reddit._quiet  # noqa: F401,E402  (the package's own offline / no-telemetry defaults)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AGENT_MODE", "direct")  # an OPENAI_API_KEY on the machine must not switch tests to LLM mode

SNAPSHOT = Path(__file__).resolve().parent.parent / "fl_crew_reddit" / "reddit" / "snapshot"
REDDIT_2015 = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "reddit-2015"


def _snapshot_text() -> list[str]:
    lines = []
    for path in sorted(SNAPSHOT.glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            lines.append(record.get("body") or record.get("title", ""))
    return lines


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model folder: LlamaConfig(hidden 64, 2 layers, vocab ~1k) with random weights and a BPE tokenizer."""
    from fl_crew_reddit.training.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), _snapshot_text())


@contextmanager
def torch_threads_of_trainer_processes(workers: int = 2):
    """Run the block with the torch thread count a pool of `workers` trainer processes gives each of them
    (`device_pool`: cores // workers). A test comparing an in-process round with trainer processes bit for bit
    compares the process boundary, not thread counts: a reduction split over 2 threads can round differently from
    one on 1, and did, now and then, under load."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_run_config(model_dir: Path, root: Path, **overrides):
    """Settings for a fast real run: tiny model, snapshot data, 3 clients, few examples; no `.env` is read."""
    from fl_crew_reddit.config import FLCrewRedditConfig

    settings = dict(base_llm_model=str(model_dir), fl_crew_reddit_dir=root, max_examples_per_client=16,
                    local_epochs=2, batch_size=4, learning_rate=3e-3, eval_samples=2, max_seq_length=128, lora_r=4,
                    lora_alpha=8, posts_per_subreddit=20, seed=7, mixed_precision="no")
    return FLCrewRedditConfig(_env_file=None, **{**settings, **overrides})


@pytest.fixture()
def tiny_config(tiny_model_dir, tmp_path, monkeypatch):
    """`tiny_run_config` in this test's own folder (also the working directory)."""
    monkeypatch.chdir(tmp_path)
    return tiny_run_config(tiny_model_dir, tmp_path)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    """(peft model, tokenizer) for training tests."""
    import torch

    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model

    config = FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4, lora_alpha=8, device="cpu")
    base, tokenizer = load_base_model(config, torch.device("cpu"))
    torch.manual_seed(0)
    return build_peft_model(base, config), tokenizer


class RunStopped(Exception):
    """Stands for the process dying at that point: what is on disk is what a kill there would leave."""


@contextmanager
def stopped_in_round(round_number: int, method: str = "aggregate"):
    """Inside the block, `FederatedWorkspace.<method>(round_number, ...)` raises RunStopped for that round (other
    rounds run as usual); the method is itself again afterwards."""
    from fl_crew_reddit.workspace import FederatedWorkspace

    original = getattr(FederatedWorkspace, method)

    def stopping(self, number, *args, **kwargs):
        if number == round_number:
            raise RunStopped(f"killed in {method} of round {round_number}")
        return original(self, number, *args, **kwargs)

    setattr(FederatedWorkspace, method, stopping)
    try:
        yield
    finally:
        setattr(FederatedWorkspace, method, original)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A random CLIPModel (2-layer 32-wide towers, 16-d projection), its image processor and a byte-level
    character tokenizer, saved like a hub checkpoint: what IMAGE_PROCESSOR names in the multimodal tests."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers import CLIPImageProcessorPil as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = {symbol: i for i, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_vlm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random Idefics3 (the SmolVLM family) built from its config: a 1-layer vision tower on 32×32 images
    (4 image tokens after the connector), the 2-layer tiny Llama as its language model, the tiny BPE tokenizer and
    the Idefics3 image processor assembled into a processor with SmolVLM's chat template. No download."""
    import torch
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    folder = tmp_path_factory.mktemp("tiny-idefics3")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>"]})
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=False)
    # image_seq_len = (image_size / patch_size)² / scale_factor² = (32 / 8)² / 2² = 4 tokens per image
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)
    text = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=128, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                max_position_embeddings=512)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=8).to_dict()
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                            image_token_id=processor.image_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def processes_mentioning(text: str) -> list[int]:
    """Ids of live processes whose command line mentions `text` (a test's folder: its SuperLink / SuperNodes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture()
def flower_dir(tmp_path):
    """A Flower run's folder; whatever the test leaves running there (SuperLink, SuperNodes) is killed at the end."""
    folder = tmp_path / "flower"
    folder.mkdir()
    yield folder
    for pid in processes_mentioning(str(folder)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Tests that run a real Flower federation start a dozen processes each (SuperLink, SuperNodes, one ClientApp process
# per message) and wait on Flower's polls in between (a SuperNode looks for messages every 3 s). Under
# `--dist loadgroup` each chain below runs on one worker: at most two federations at once, the other workers run the
# rest of the suite meanwhile.
FEDERATION_CHAINS = {
    "flower-a": ["test_flower_deployment.py::test_three_machines_on_loopback",
                 "test_flower_security.py::test_tls_and_node_authentication_let_in_only_registered_sites",
                 "test_flower_security.py::test_a_site_killed_in_a_round_is_left_out_and_rejoins"],
    "flower-b": ["test_flower_parity.py::test_local_flower_matches_inprocess",
                 "test_multimodal_flower.py::test_secagg_sums_the_projector_with_the_adapter"],
}


def pytest_collection_modifyitems(items):
    chain_of = {test: chain for chain, tests in FEDERATION_CHAINS.items() for test in tests}
    for item in items:
        chain = chain_of.get(f"{Path(str(item.fspath)).name}::{item.name}")
        if chain is not None:
            item.add_marker(pytest.mark.xdist_group(name=chain))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """FL_CREW_REDDIT_TEST_CPU_LOG=<file>: append each test's CPU seconds (its process and the child processes it
    waited for) beside its wall seconds, to find what makes the suite slow on a loaded 2-core machine."""
    log = os.environ.get("FL_CREW_REDDIT_TEST_CPU_LOG")
    if not log:
        yield
        return
    import resource
    import time

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    start_cpu, start_wall = cpu(), time.monotonic()
    yield
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"{cpu() - start_cpu:.2f}\t{time.monotonic() - start_wall:.2f}\t{item.nodeid}\n")
