"""Settings: defaults of the design, environment parsing, one clear message for bad values, secrets kept out."""
import pytest

from fl_crew_reddit.config import EMBEDDED_MODEL, ConfigError, load_config


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("AGGREGATION_METHOD", "SUBREDDITS", "LORA_R", "OPENAI_API_KEY", "REDDIT_BACKEND", "NUM_TRAINERS"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_match_the_design():
    config = load_config()
    assert config.base_llm_model == EMBEDDED_MODEL
    assert (config.use_lora, config.lora_r, config.lora_alpha) == (True, 8, 16)
    assert (config.use_quantization, config.quantization_bits) == (False, 4)
    assert (config.federation_rounds, config.local_epochs, config.batch_size) == (10, 3, 4)
    assert config.learning_rate == 2e-4
    assert config.aggregation_method == "weighted_average"
    assert (config.support_multimodal, config.image_processor, config.max_image_size) == (
        True, "clip-vit-base-patch32", 224)
    assert config.agent_llm_model == "gpt-4"
    assert (config.reddit_backend, config.num_trainers, config.partition) == ("snapshot", 3, "subreddit")


def test_environment_and_dotenv_are_read(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("LORA_R=16\nSUBREDDITS=r/books, history ,programming\n")
    monkeypatch.setenv("AGGREGATION_METHOD", "fedprox")
    monkeypatch.setenv("QUANTIZATION_BITS", "8")
    config = load_config()
    assert config.lora_r == 16
    assert config.subreddits == ["books", "history", "programming"]
    assert config.aggregation_method == "fedprox"
    assert config.quantization_bits == 8


@pytest.mark.parametrize("name, value, allowed", [
    ("AGGREGATION_METHOD", "fedsomething", "weighted_average"),
    ("LORA_R", "zero", "integer"),
    ("REDDIT_BACKEND", "ftp", "snapshot"),
    ("NUM_TRAINERS", "0", "greater than or equal to 1"),
    ("QUANTIZATION_BITS", "6", "4 or 8"),
])
def test_invalid_value_names_the_variable_and_what_is_allowed(monkeypatch, name, value, allowed):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        load_config()
    message = str(raised.value)
    assert name in message and value in message and allowed in message


def test_test_and_validation_fractions_must_leave_threads_to_train_on(monkeypatch):
    monkeypatch.setenv("TEST_FRACTION", "0.5")
    monkeypatch.setenv("VALIDATION_FRACTION", "0.45")
    with pytest.raises(ConfigError, match="TEST_FRACTION=0.5 \\+ VALIDATION_FRACTION=0.45 must stay below 0.9"):
        load_config()
    monkeypatch.setenv("VALIDATION_FRACTION", "0.3")
    assert load_config().validation_fraction == 0.3


def test_dump_backend_needs_an_existing_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("REDDIT_BACKEND", "dump")
    with pytest.raises(ConfigError, match="REDDIT_DUMP_DIR"):
        load_config()
    monkeypatch.setenv("REDDIT_DUMP_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a folder"):
        load_config()


def test_secrets_never_appear_in_public_settings_or_errors(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", "reddit-secret")
    config = load_config()
    public = repr(config.public_settings())
    assert "sk-very-secret" not in public and "reddit-secret" not in public
    assert config.public_settings()["openai_api_key"] == "set"
    assert "sk-very-secret" not in repr(config)
    monkeypatch.setenv("LORA_R", "-1")
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert "sk-very-secret" not in str(raised.value)


def test_ffa_lora_refuses_svd_exact(monkeypatch):
    monkeypatch.setenv("FFA_LORA", "true")
    monkeypatch.setenv("AGGREGATION_METHOD", "svd_exact")
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert "FFA_LORA" in str(raised.value) and "svd_exact" in str(raised.value)


def test_max_examples_per_client_auto_caps_only_the_cpu_demo(monkeypatch, tmp_path):
    from fl_crew_reddit.config import DEMO_CPU_CAP, ConfigError, FLCrewRedditConfig, load_config

    monkeypatch.chdir(tmp_path)
    config = FLCrewRedditConfig()
    assert config.max_examples_per_client == "auto"
    cap, why = config.training_cap("cpu")
    assert cap == DEMO_CPU_CAP and "CPU" in why and "all" in why
    assert config.training_cap("cuda") == (None, "MAX_EXAMPLES_PER_CLIENT=auto: every example (a CUDA GPU trains them)")
    monkeypatch.setenv("MAX_EXAMPLES_PER_CLIENT", "all")
    assert load_config().training_cap("cpu")[0] is None
    monkeypatch.setenv("MAX_EXAMPLES_PER_CLIENT", "100")
    assert load_config().training_cap("cuda")[0] == 100
    monkeypatch.setenv("MAX_EXAMPLES_PER_CLIENT", "0")
    with pytest.raises(ConfigError, match="MAX_EXAMPLES_PER_CLIENT"):
        load_config()
    monkeypatch.setenv("MAX_EXAMPLES_PER_CLIENT", "many")
    with pytest.raises(ConfigError, match="MAX_EXAMPLES_PER_CLIENT"):
        load_config()


def test_uncapped_split_trains_every_example_not_held_out():
    from fl_crew_reddit.preprocessing.partition import split_by_thread

    examples = [{"post_id": f"t{i // 5}", "id": str(i)} for i in range(500)]
    train, validation, test = split_by_thread(examples, 0.2, None, seed=1, validation_fraction=0.1)
    assert len(train) + len(validation) + len(test) == 500
    assert len(train) > 300 and 90 <= len(test) <= 110
    capped, _, _ = split_by_thread(examples, 0.2, 32, seed=1, validation_fraction=0.1)
    assert len(capped) == 32


def test_use_lora_is_accepted_true_and_refused_false(monkeypatch):
    monkeypatch.setenv("USE_LORA", "true")
    assert load_config().use_lora is True
    monkeypatch.setenv("USE_LORA", "false")
    with pytest.raises(ConfigError, match="USE_LORA=false is not supported: only LoRA adapter weights may leave"):
        load_config()


def test_cache_root_follows_fl_crew_reddit_cache_then_xdg(monkeypatch, tmp_path):
    from fl_crew_reddit.config import cache_root

    monkeypatch.setenv("FL_CREW_REDDIT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("FL_CREW_REDDIT_CACHE")
    assert cache_root() == tmp_path / "xdg" / "fl_crew_reddit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "fl_crew_reddit"


def test_hub_access_reads_hf_hub_offline_and_hf_endpoint(monkeypatch):
    from fl_crew_reddit.config import hub_access
    from fl_crew_reddit.hub import HubAccess, hub_reachable

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_access() == HubAccess(offline=True, endpoint="https://huggingface.co")
    assert hub_reachable() is False  # offline: no probe at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/mirror")
    assert hub_access() == HubAccess(offline=False, endpoint="http://127.0.0.1:9/mirror")
    assert hub_access().address == ("127.0.0.1", 9)
    assert hub_reachable(timeout_s=1) is False  # nothing listens on the discard port


def test_hub_reachable_connects_to_the_endpoint():
    import socket

    from fl_crew_reddit.hub import HubAccess, hub_reachable

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert hub_reachable(HubAccess(endpoint=endpoint), timeout_s=2) is True
        assert hub_reachable(HubAccess(offline=True, endpoint=endpoint)) is False
