"""FLCrewRedditConfig: the one place the environment and `.env` are read.

Every setting has a default that runs offline on a 2-core CPU with the embedded model. An invalid value stops
the run at start with one message naming the variable and what is allowed (see `load_config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"

AggregationMethod = Literal[
    "weighted_average", "fedavg", "fedprox", "krum", "multi_krum", "median", "trimmed_mean", "bulyan",
    "fedavgm", "fedadam", "fedyogi", "fedadagrad", "svd_exact",
]


class ConfigError(ValueError):
    """A setting from the environment or `.env` is invalid; the message names it and what is allowed."""


class FLCrewRedditConfig(BaseSettings):
    """All settings of a federated run. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False, validate_default=True)

    # --- base model and adapters
    base_llm_model: str = Field(EMBEDDED_MODEL, description="Hub id, local folder, or the embedded SmolLM2-135M.")
    use_lora: bool = Field(True, description="Fine-tune LoRA adapters (the only mode: full weights never travel).")
    lora_r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["all-linear"],
        description="Comma-separated module names, or all-linear for every linear layer but the output head.")
    use_quantization: bool = Field(False, description="QLoRA: load the base model in 4/8 bit (CUDA).")
    quantization_bits: int = Field(4, description="4 (nf4 with double quantisation) or 8")

    # --- federation
    federation_rounds: int = Field(10, ge=1, le=10_000)
    num_trainers: int = Field(3, ge=1, le=64, description="Trainer agents; they serve the clients round-robin.")
    num_clients: int | None = Field(None, ge=1, le=10_000, description="Federated clients (data shards); "
                                                                        "default: NUM_TRAINERS.")
    fraction_fit: float = Field(1.0, gt=0, le=1, description="Share of clients sampled to train each round.")
    client_timeout: float = Field(0, ge=0, description="Seconds a client may train in one round before it is left "
                                                        "out of that round (0: no limit).")
    local_epochs: int = Field(3, ge=1, le=100)
    max_local_steps: int = Field(0, ge=0, description="Cap on optimizer steps per client per round (0: none).")
    batch_size: int = Field(4, ge=1, le=1024)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    aggregation_method: AggregationMethod = "weighted_average"
    fedprox_mu: float = Field(0.01, ge=0, description="FedProx proximal weight, sent to trainers each round.")
    min_fit_clients: int = Field(2, ge=1, description="Fewest accepted updates a round needs (capped at NUM_TRAINERS).")
    max_update_norm: float = Field(100.0, gt=0, description="Largest accepted L2 norm of (update - global adapter).")
    num_byzantine: int = Field(0, ge=0, description="Clients assumed faulty, for krum / multi_krum / bulyan.")
    trimmed_mean_beta: float = Field(0.2, ge=0, lt=0.5, description="Fraction cut from each end by trimmed_mean.")

    # --- data
    reddit_backend: Literal["snapshot", "dump", "live"] = "snapshot"
    reddit_dump_dir: Path | None = None
    subreddits: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                       description="Comma-separated; empty: all the backend has.")
    posts_per_subreddit: int = Field(200, ge=1, le=100_000)
    partition: Literal["subreddit", "iid"] = "subreddit"
    max_examples_per_client: int = Field(32, ge=1, description="Training examples per client (the rest is counted as over the cap).")
    max_seq_length: int = Field(256, ge=32, le=32_768)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    eval_samples: int = Field(8, ge=0, le=10_000, description="Replies generated for BLEU / ROUGE each round.")
    seed: int = 42
    baselines: Annotated[list[Literal["local_only", "centralized"]], NoDecode] = Field(
        default_factory=list, description="Comma-separated baselines trained after the rounds on the same budget: "
                                          "local_only (each client alone), centralized (all data pooled).")

    # --- multimodal
    support_multimodal: bool = True
    image_processor: str = "clip-vit-base-patch32"
    max_image_size: int = Field(224, ge=16, le=4096)

    # --- agents
    agent_llm_model: str = "gpt-4"
    agent_mode: Literal["auto", "direct", "llm"] = Field(
        "auto", description="auto: the agents' LLM chooses the tools' arguments when it is reachable (OPENAI_API_KEY "
                            "or AGENT_LLM_BASE_URL set), else the Flow calls the tools directly; direct; llm.")
    agent_llm_base_url: str | None = Field(None, description="An OpenAI-compatible server for AGENT_LLM_MODEL "
                                                             "(vLLM, llama.cpp, Ollama), e.g. http://localhost:8000/v1")
    agent_collect_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated subreddits the collector agent may pick from; empty: "
                                          "SUBREDDITS, or all the backend has.")
    agent_may_switch_aggregation: bool = Field(False, description="Let the aggregator agent switch a round to a "
                                                                  "robust rule when the updates look anomalous.")
    openai_api_key: SecretStr | None = None
    reddit_client_id: SecretStr | None = None
    reddit_client_secret: SecretStr | None = None

    # --- where things go
    fl_crew_reddit_dir: Path = Field(default_factory=Path.cwd,
                                     description="Base folder of data/, models/, results/, logs/.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="bf16 autocast where the hardware has it (CUDA, CPUs with native bf16).")

    @field_validator("subreddits", "lora_target_modules", "baselines", "agent_collect_allowlist", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("quantization_bits")
    @classmethod
    def _four_or_eight(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError("Input should be 4 or 8")
        return value

    @field_validator("subreddits", "agent_collect_allowlist")
    @classmethod
    def _strip_r_prefix(cls, value: list[str]) -> list[str]:
        return [name.removeprefix("r/") for name in value]

    @model_validator(mode="after")
    def _check_combinations(self):
        if not self.use_lora:
            raise ValueError("USE_LORA=false is not supported: only adapter weights may leave a client")
        if self.reddit_backend == "dump" and self.reddit_dump_dir is None:
            raise ValueError("REDDIT_BACKEND=dump needs REDDIT_DUMP_DIR (a folder of <subreddit>/submissions.jsonl)")
        if self.reddit_backend == "dump" and not Path(self.reddit_dump_dir).is_dir():
            raise ValueError(f"REDDIT_DUMP_DIR={self.reddit_dump_dir} is not a folder")
        if self.agent_mode == "llm" and not self.agent_llm_reachable:
            raise ValueError("AGENT_MODE=llm needs a reachable AGENT_LLM_MODEL: set OPENAI_API_KEY (OpenAI models) or "
                             "AGENT_LLM_BASE_URL (an OpenAI-compatible server: vLLM, llama.cpp, Ollama), or use "
                             "AGENT_MODE=auto or direct")
        return self

    @property
    def agent_llm_reachable(self) -> bool:
        """An API key or a server URL is set for the agents' LLM (no network probe)."""
        return bool(self.agent_llm_base_url) or self.openai_api_key is not None

    @property
    def clients_count(self) -> int:
        return self.num_clients or self.num_trainers

    # --- derived folders
    @property
    def data_dir(self) -> Path:
        return self.fl_crew_reddit_dir / "data"

    @property
    def models_dir(self) -> Path:
        return self.fl_crew_reddit_dir / "models"

    @property
    def results_dir(self) -> Path:
        return self.fl_crew_reddit_dir / "results"

    @property
    def logs_dir(self) -> Path:
        return self.fl_crew_reddit_dir / "logs"

    def public_settings(self) -> dict:
        """Settings safe to log and store: secrets are reported only as set / not set."""
        public = {}
        for name, value in self.model_dump(mode="json").items():
            if isinstance(getattr(self, name), SecretStr) or name in SECRET_FIELDS:
                public[name] = "set" if getattr(self, name) is not None else "not set"
            else:
                public[name] = value
        return public


SECRET_FIELDS = {"openai_api_key", "reddit_client_id", "reddit_client_secret"}


def describe_validation_error(error: ValidationError) -> str:
    """One message naming each bad variable and what it allows, without echoing secret values."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "settings"
        variable = field.upper()
        message = item["msg"].removeprefix("Value error, ")
        if field in SECRET_FIELDS:
            lines.append(f"{variable}: {message}")
        elif item["loc"]:
            lines.append(f"{variable}={item.get('input')!r} is invalid: {message}")
        else:
            lines.append(message)
    return "Invalid configuration: " + "; ".join(lines)


def load_config(**overrides) -> FLCrewRedditConfig:
    """Read the environment and `.env`; raise ConfigError with a readable message if anything is invalid."""
    try:
        return FLCrewRedditConfig(**overrides)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
