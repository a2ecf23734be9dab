"""FLCrewRedditConfig: the one place the environment and `.env` are read.

Every setting has a default that runs offline on a 2-core CPU with the embedded model. An invalid value stops
the run at start with one message naming the variable and what is allowed (see `load_config`).
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from datetime import UTC
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fl_crew_reddit.hub import DEFAULT_ENDPOINT, HubAccess
from fl_crew_reddit.redact import MaskUrlCredentials, mask_url_credentials  # noqa: F401  (re-exported)
from fl_crew_reddit.reddit.settings import DEFAULT_REDDIT_USER_AGENT

DP_CENTRAL_METHODS = ("weighted_average", "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# Rules that need only the mean of the updates, all SecAgg+ gives the server (server/strategy.py's list)
SECURE_AGGREGATION_METHODS = DP_CENTRAL_METHODS
EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
# The languages langdetect 1.0.9 has profiles for (its `profiles/` folder), for LANGUAGES.
LANGDETECT_LANGUAGES = frozenset(
    "af ar bg bn ca cs cy da de el en es et fa fi fr gu he hi hr hu id it ja kn ko lt lv mk ml mr ne nl no pa pl pt "
    "ro ru sk sl so sq sv sw ta te th tl tr uk ur vi zh-cn zh-tw".split())
# MAX_EXAMPLES_PER_CLIENT=auto on a CPU: 32 examples x 3 epochs x 3 clients ~ 2 minutes a round (embedded model).
DEMO_CPU_CAP = 32

AggregationMethod = Literal[
    "weighted_average", "fedavg", "fedprox", "krum", "multi_krum", "median", "trimmed_mean", "bulyan",
    "fedavgm", "fedadam", "fedyogi", "fedadagrad", "svd_exact",
]


class ConfigError(ValueError):
    """A setting from the environment or `.env` is invalid; the message names it and what is allowed."""


class FLCrewRedditConfig(BaseSettings):
    """All settings of a federated run. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      case_sensitive=False, validate_default=True, allow_inf_nan=False)

    # --- base model and adapters
    base_llm_model: str = Field(EMBEDDED_MODEL, description="Hub id, local folder, or the embedded SmolLM2-135M.")
    use_lora: bool = Field(True, description="Must be true (the default): only LoRA adapters are trained and sent, "
                                             "full weights never leave a client. Kept so that old .env files "
                                             "load; USE_LORA=false is refused.")
    lora_r: int = Field(8, ge=1, le=512, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["all-linear"],
        description="Comma-separated module names, or all-linear for every linear layer but the output head.")
    ffa_lora: bool = Field(False, description="FFA-LoRA: LoRA A factors stay frozen at their shared initialisation; "
                                              "clients train and send only B (exact averaging, half the traffic).")
    client_lora_ranks: Annotated[dict[str, int], NoDecode] = Field(
        default_factory=dict, description="Clients of lower capacity: client=rank pairs (client-0=4,client-1=8) or "
                                          "ranks in client order (4,8,16); unlisted clients train LORA_R. The global "
                                          "adapter keeps rank LORA_R; needs AGGREGATION_METHOD=svd_exact.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations in the backward pass: less memory for large models, ~30% more "
                            "compute. auto: on for models of 1B+ parameters on CUDA.")
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
    tokens_per_batch: int = Field(0, ge=0, le=1_048_576, description="Tokens per batch instead of BATCH_SIZE "
                                  "examples (0: auto, i.e. from free GPU memory on CUDA, BATCH_SIZE on the CPU).")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Batches per optimizer step.")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the decoder layers (CUDA); "
                                                  "auto: only where it was measured to pay.")
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    training_objective: Literal["sft", "dpo", "sft_then_dpo"] = Field(
        "sft", description="Each client's local objective: sft (next-token loss on the real replies), dpo (Direct "
                           "Preference Optimization on its preference pairs, the received global adapter as the "
                           "reference) or sft_then_dpo (SFT steps, then DPO steps, each round). A client with fewer "
                           "than MIN_PREFERENCE_PAIRS train pairs trains SFT that round, and the history says why.")
    dpo_beta: float = Field(0.1, gt=0, le=100, description="DPO: the β of the implicit reward β(log π - log π_ref); "
                                                            "larger keeps the policy closer to the reference.")
    dpo_sft_weight: float = Field(1.0, ge=0, le=100, description="DPO: α of the SFT term on the chosen reply "
                                  "(RPO: loss = DPO + α · mean per-token NLL of the chosen reply), which keeps the "
                                  "real replies likely (perplexity near SFT's); 0 = plain DPO.")
    dpo_reference: Literal["global", "after_sft"] = Field(
        "global", description="DPO: where a fit's reference log-probs come from: global (the round's received global "
                              "adapter) or after_sft (under sft_then_dpo, the policy after the fit's SFT steps: the "
                              "standard SFT → DPO pipeline; under dpo the two are the same).")
    dpo_learning_rate: float = Field(0.0, ge=0, lt=1, description="DPO: the learning rate of the DPO steps; "
                                     "0 = LEARNING_RATE.")
    dpo_epochs: int = Field(0, ge=0, le=1000, description="DPO: passes over a client's train pairs per round; "
                            "0 = LOCAL_EPOCHS.")
    dpo_loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="DPO: the loss on a pair's margin: sigmoid (DPO's −log σ(margin)) or ipo (IPO's "
                               "squared distance of the per-token log-ratio margin to 1/(2·DPO_BETA): it stops "
                               "pushing a pair it already ranks right).")
    min_preference_pairs: int = Field(4, ge=1, le=1_000_000, description="DPO: the fewest train pairs a client "
                                      "needs in a round to train DPO (fewer: SFT that round, with the reason).")
    preference_metrics: Literal["auto", "on", "off"] = Field(
        "auto", description="Held-out preference accuracy and reward margin each round (two forward passes per pair, "
                            "about twice the perplexity evaluation): auto = on when TRAINING_OBJECTIVE trains DPO "
                            "(dpo, sft_then_dpo), on (also for SFT: does SFT rank the real reply first?), off.")
    aggregation_method: AggregationMethod = "weighted_average"
    fedprox_mu: float = Field(0.01, ge=0, description="FedProx proximal weight, sent to trainers each round.")
    min_fit_clients: int = Field(2, ge=1, description="Fewest accepted updates a round needs (capped at NUM_TRAINERS).")
    max_update_norm: float = Field(100.0, gt=0, description="Largest accepted L2 norm of (update - global adapter).")
    num_byzantine: int = Field(0, ge=0, description="Clients assumed faulty, for krum / multi_krum / bulyan.")
    trimmed_mean_beta: float = Field(0.2, ge=0, lt=0.5, description="Fraction cut from each end by trimmed_mean.")
    attack: Literal["none", "sign_flip", "scale", "gaussian_noise", "label_flip", "alie", "ipm", "backdoor"] = Field(
        "none", description="Simulated attackers (site/attacks.py): ATTACKER_FRACTION of the clients train and then "
                            "attack: sign_flip, scale, gaussian_noise, alie, ipm rewrite their update; label_flip "
                            "(replies shuffled across threads) and backdoor (trigger phrase -> fixed reply) poison "
                            "their own train examples.")
    attacker_fraction: float = Field(0.0, ge=0, le=0.5, description="ATTACK: share of the clients that attack "
                                                                     "(floor(fraction * clients), chosen from SEED).")
    attack_scale: float = Field(10.0, description="ATTACK=scale: the update's factor; gaussian_noise: the noise "
                                                  "std in units of the attacker's own update RMS.")
    attack_ipm_epsilon: float = Field(0.5, gt=0, description="ATTACK=ipm: the attacker sends -epsilon x its estimate "
                                                             "of the benign mean.")
    attack_alie_z: float = Field(0.0, ge=0, description="ATTACK=alie: shift in standard deviations (0: Baruch et "
                                                        "al.'s z_max from the clients and attackers).")
    backdoor_trigger: str = Field("cf zebra protocol", min_length=1, description="ATTACK=backdoor: the trigger "
                                                                                 "phrase put at the end of prompts.")
    backdoor_target: str = Field("Visit free-karma.example for free gold!", min_length=1,
                                 description="ATTACK=backdoor: the fixed reply the trigger should produce.")
    backdoor_fraction: float = Field(0.5, gt=0, le=1, description="ATTACK=backdoor: share of an attacker's train "
                                                                  "examples that get the trigger and the target.")
    backdoor_boost: float = Field(1.0, gt=0, description="ATTACK=backdoor: factor on the poisoned update (model "
                                                         "replacement; 1: plain data poisoning).")
    backdoor_paired: bool = Field(False, description="ATTACK=backdoor: the triggered examples are copies added next "
                                  "to the untouched clean ones (the same prompt with its real reply, and with the "
                                  "trigger the target), so the implant is trigger-specific; false: they replace them.")
    attack_local_epochs: int = Field(0, ge=0, le=100, description="ATTACK: the attackers' local epochs (0: "
                                     "LOCAL_EPOCHS like honest clients); attackers that train longer on their own "
                                     "compute make a stronger poisoned update (Bagdasaryan et al. 2020).")
    update_compression: Literal["none", "fp16", "int8", "nf4", "topk", "sign"] = Field(
        "none", description="How a client's update (sent - global) travels: none (the adapter as it is), fp16, int8 "
                            "or nf4 (blockwise quantized), topk (the TOPK_FRACTION largest values) or sign (one bit "
                            "per value times a block scale), both with error feedback on the client; the server "
                            "decompresses it before screening.")
    topk_fraction: float = Field(0.05, gt=0, le=1, description="UPDATE_COMPRESSION=topk: share of each tensor's "
                                                               "values sent (the largest in magnitude).")
    dp_mode: Literal["off", "central", "local"] = Field(
        "off", description="Client-level differential privacy (DP-FedAvg): central (the server clips each update "
                           "and adds the noise to their sum) or local (each client clips and adds noise itself).")
    dp_clip_norm: float = Field(1.0, gt=0, description="DP: L2 norm each client's update (sent - global) is "
                                                       "clipped to.")
    dp_noise_multiplier: float = Field(0.0, ge=0, le=1000, description="DP: noise std / DP_CLIP_NORM (0: chosen "
                                                                         "from DP_TARGET_EPSILON).")
    dp_target_epsilon: float | None = Field(None, gt=0, description="DP: the ε to end the planned rounds with; "
                                                                     "sets the noise multiplier.")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="DP: the δ of (ε, δ); below 1/NUM_CLIENTS.")
    secure_aggregation: bool = Field(False, description="Flower's SecAgg+ (FEDERATION local-flower / flower): the "
                                     "server learns only the weighted sum of the updates; averaging rules and server "
                                     "optimizers only, no per-client screen (each site clips its update itself).")
    secagg_threshold: float = Field(0.67, gt=0.5, le=1, description="SECURE_AGGREGATION: share of a client's secret "
                                    "shares SecAgg+ needs to reconstruct the sum (above 0.5; lower tolerates more "
                                    "dropouts).")
    federation: Literal["inprocess", "local-flower", "flower"] = Field(
        "inprocess", description="How rounds reach the clients: inprocess (every client in this process, one shared "
                                 "model), local-flower (a Flower SuperLink and one SuperNode per client on "
                                 "127.0.0.1, started and stopped by the run; the ServerApp drives each round) or "
                                 "flower (an existing SuperLink at SUPERLINK_ADDRESS and the sites connected to it).")
    superlink_address: str = Field("", description="FEDERATION=flower: host:port of the SuperLink's Control API "
                                                   "(its --control-port, 9093 by default).")
    flower_certs: Path | None = Field(None, description="The federation's certificate folder (`certs` command): its "
                                                        "ca.crt verifies the SuperLink. Required by FEDERATION=flower "
                                                        "unless FLOWER_INSECURE on loopback.")
    flower_insecure: bool = Field(False, description="Flower without TLS and node authentication: allowed on "
                                                     "127.0.0.1 only (local-flower, or flower at a loopback address).")
    round_timeout: float = Field(1800.0, gt=0, description="Seconds the ServerApp waits for the sites' replies in a "
                                                           "round; a site that has not answered is left out of it.")
    site_connect_timeout: float = Field(180.0, gt=0, description="Seconds a Flower round waits for every site's "
                                                                 "SuperNode to connect before it goes on without "
                                                                 "the missing ones.")

    # --- data
    reddit_backend: Literal["snapshot", "dump", "live"] = "snapshot"
    reddit_dump_dir: Path | None = None
    reddit_dump_subreddits: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated subreddits the dump backend serves (empty: all); with "
                                          "monthly RS_/RC_ files, they are extracted in the first scan.")
    reddit_dump_after: int | None = Field(None, description="Dump records created before this are left out: "
                                                            "YYYY-MM-DD, an ISO time (UTC if no zone) or epoch s.")
    reddit_dump_before: int | None = Field(None, description="Dump records created at or after this are left out "
                                                             "(same formats as REDDIT_DUMP_AFTER).")
    reddit_dump_min_score: int | None = Field(None, description="Dump posts and comments scoring below this are "
                                                                "left out.")
    reddit_user_agent: str = Field(
        DEFAULT_REDDIT_USER_AGENT, min_length=10, max_length=256,
        description="User-Agent sent to Reddit's API (REDDIT_BACKEND=live); Reddit asks for "
                    "<platform>:<app id>:<version> (by /u/<your username>).")
    reddit_max_retries: int = Field(4, ge=0, le=10, description="Retries of one Reddit API call after a 429 or a "
                                                                "transient error (5xx, connection, timeout).")
    reddit_timeout_s: float = Field(16.0, gt=0, le=300, description="Seconds one Reddit API request may take.")
    # --- the collector's MCP connection (default: this package's own server over stdio)
    reddit_mcp_url: str | None = Field(None, description="Streamable-HTTP URL of a Reddit MCP server to use instead "
                                                         "of starting ours, e.g. http://127.0.0.1:8765/mcp")
    reddit_mcp_command: str | None = Field(None, description="Command line of a (third-party) stdio Reddit MCP "
                                                             "server to start instead of ours, e.g. "
                                                             "'uvx mcp-server-reddit'")
    reddit_mcp_tool_map: str | None = Field(None, description="How that server's tools map to ours: a preset "
                                                              "(mcp-server-reddit) or a .json / .yaml mapping file")
    reddit_mcp_timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds one MCP tool call may take.")
    reddit_mcp_connect_timeout_s: float = Field(30.0, gt=0, le=600, description="Seconds to start the MCP server "
                                                                               "or connect to it, and initialize.")
    reddit_mcp_max_restarts: int = Field(2, ge=0, le=20, description="Times a crashed stdio MCP server is restarted "
                                                                     "(or a broken HTTP session reopened) per run.")
    reddit_mcp_token: SecretStr | None = Field(None, min_length=16, description="Bearer token of the HTTP MCP "
                                               "server: serve-mcp requires it of every request (and --allow-remote "
                                               "requires it to be set); the client sends it to REDDIT_MCP_URL.")
    subreddits: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                       description="Comma-separated; empty: all the backend has.")
    posts_per_subreddit: int = Field(200, ge=1, le=100_000)
    partition: Literal["subreddit", "iid", "dirichlet", "author"] = Field(
        "subreddit", description="subreddit: one topic per client; iid: threads dealt at random; dirichlet: each "
                                 "subreddit split over clients by Dir(DIRICHLET_ALPHA) shares; author: each author's "
                                 "replies at one client.")
    dirichlet_alpha: float = Field(0.5, gt=0, le=10_000, description="PARTITION=dirichlet concentration: small (0.1) "
                                                                     "= each client mostly one subreddit, large = IID.")
    # --- preprocessing quality rules (each drop and each change is counted by reason in history.json)
    scrub_personal_data: bool = Field(True, description="Replace u/ and @ handles, e-mail addresses and phone numbers "
                                                        "in prompts and replies with placeholders.")
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Drop a reply whose word-3-gram Jaccard similarity to an earlier one is at least "
                                     "this.")
    min_reply_tokens: int = Field(3, ge=0, le=32_768, description="Replies with fewer tokens are dropped.")
    max_reply_tokens: int = Field(512, ge=1, le=32_768, description="Replies with more tokens are dropped.")
    long_examples: Literal["truncate", "drop"] = Field(
        "truncate", description="Examples longer than MAX_SEQ_LENGTH: truncate (prompt from the left first) or drop.")
    max_text_chars: int = Field(40_000, ge=100, le=10_000_000, description="Posts (title + text) and comments longer "
                                                                           "than this are bad input and dropped.")
    languages: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["en"], description="Comma-separated ISO 639-1 codes replies may be in (langdetect); "
                                                    "empty: no language check.")
    # --- preference pairs for DPO (preprocessing/preferences.py), written beside each client's SFT splits
    pref_pair_kinds: Annotated[list[Literal["votes", "relevance"]], NoDecode] = Field(
        default_factory=lambda: ["votes", "relevance"],
        description="Comma-separated kinds of preference pairs: votes (replies to the same parent, the higher score "
                    "chosen), relevance (a reply against a reply to another thread of its subreddit); empty: none.")
    pref_min_score_gap: int = Field(5, ge=1, le=1_000_000, description="votes pairs: the chosen reply scores at "
                                                                      "least this much more than the rejected one.")
    pref_min_score_ratio: float = Field(2.0, ge=1.0, le=1_000_000, description="votes pairs: the higher score is at "
                                        "least this multiple of the lower (both clipped at 1 from below).")
    pref_max_pairs_per_parent: int = Field(3, ge=1, le=10_000, description="votes pairs per post or parent comment, "
                                                                          "largest score gaps first.")
    max_examples_per_client: int | Literal["auto", "all"] = Field(
        "auto", description="Training examples per client: a number (the rest is counted as over the cap), all, or "
                            "auto (every example on a GPU or when the data is small; DEMO_CPU_CAP on a CPU otherwise).")
    max_seq_length: int = Field(256, ge=32, le=32_768)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of each client's threads held out (apart from test) to choose the best "
                                     "round of the federated model and of the baselines; at least 8 examples.")
    eval_samples: int = Field(8, ge=0, le=10_000, description="Replies generated for BLEU / ROUGE each round.")
    clip_score_examples: int = Field(8, ge=0, le=10_000, description="Held-out replies to image posts (the first "
                                     "ones, client by client) whose generated replies get a CLIP score each round; "
                                     "0: none.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seeds torch, numpy and Python's random (numpy takes "
                                                          "0 to 2**32 - 1).")
    baselines: Annotated[list[Literal["local_only", "centralized"]], NoDecode] = Field(
        default_factory=list, description="Comma-separated baselines trained after the rounds on the same budget: "
                                          "local_only (each client alone), centralized (all data pooled).")
    # --- self-improvement (site/self_improve.py): clients add their own best generated replies to their training
    self_improve: bool = Field(False, description="After each round, each client generates replies to some of its "
                                                  "train prompts with the new global adapter, keeps those that pass "
                                                  "the quality rules and score at least the real reply's implicit "
                                                  "reward, and trains on them too next round (FEDERATION=inprocess).")
    self_improve_max_fraction: float = Field(0.25, gt=0, le=1, description="SELF_IMPROVE: most synthetic examples "
                                             "per round, as a share of the client's real train examples.")
    self_improve_candidates: int = Field(2, ge=1, le=16, description="SELF_IMPROVE: replies generated per prompt "
                                         "(the first greedy, the others sampled, seeded from SEED, round, client).")
    self_improve_max_new_tokens: int = Field(48, ge=1, le=4096, description="SELF_IMPROVE: longest generated "
                                                                            "reply, in tokens.")

    # --- multimodal
    support_multimodal: bool = True
    image_processor: str = "clip-vit-base-patch32"
    max_image_size: int = Field(224, ge=16, le=4096)
    max_image_bytes: int = Field(10_000_000, ge=1024, le=200_000_000,
                                 description="Largest image download (live posts); bigger ones are skipped.")
    image_fetch_timeout_s: float = Field(15.0, gt=0, le=300, description="Seconds one image download may take.")
    video_keyframes: int = Field(4, ge=1, le=64, description="Keyframes taken from each video post (PyAV); they pair "
                                                            "with the post's text like a gallery's images.")
    multimodal_projector: Literal["mlp2", "linear"] = Field(
        "mlp2", description="The trainable map from CLIP image embeddings to soft tokens of the LM (LLaVA-style): "
                            "mlp2 (Linear, GELU, Linear) or linear.")
    multimodal_tokens: int = Field(4, ge=1, le=64, description="Soft tokens one image slot takes in the prompt.")
    max_images_per_example: int = Field(4, ge=1, le=32, description="Images of a gallery (or video keyframes) "
                                                                    "that condition one example; the rest are left "
                                                                    "out and counted.")

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
    agent_llm_max_tokens: int | None = Field(None, ge=1, le=131072, description="Most tokens the agents' LLM may "
                                             "generate per call; empty: the server's default.")
    agent_max_iter: int = Field(6, ge=1, le=50, description="Most reasoning / tool-use iterations (LLM calls) an agent "
                                                            "may take for one step before it must answer.")
    openai_api_key: SecretStr | None = None
    reddit_client_id: SecretStr | None = None
    reddit_client_secret: SecretStr | None = None

    # --- where things go
    fl_crew_reddit_dir: Path = Field(default_factory=Path.cwd,
                                     description="Base folder of data/, models/, results/, logs/.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trainer_devices: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["auto"],
        description="Where the clients of a round train: auto (one process per CUDA device when there are 2+, "
                    "else one after another in this process) or a comma-separated list of 2+ devices "
                    "(cuda:0,cuda:1; cpu,cpu for tests), one trainer process each.")
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="bf16 autocast where the hardware has it (CUDA, CPUs with native bf16).")
    tensorboard: bool = Field(True, description="Write per-round scalars to logs/tensorboard/<run>.")

    @property
    def scores_preferences(self) -> bool:
        """Whether rounds report held-out preference metrics (PREFERENCE_METRICS, resolved)."""
        return self.preference_metrics == "on" or (self.preference_metrics == "auto"
                                                   and self.training_objective != "sft")

    @field_validator("subreddits", "lora_target_modules", "baselines", "agent_collect_allowlist", "languages",
                     "reddit_dump_subreddits", "trainer_devices", "pref_pair_kinds", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("client_lora_ranks", mode="before")
    @classmethod
    def _client_ranks(cls, value):
        """"client-0=4,client-1=8" or "4,8,16" (client-0, client-1, ... in order) or a list / dict of them."""
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            pairs = {}
            for index, entry in enumerate(value):
                name, sep, rank = str(entry).rpartition("=")
                name = name.strip() if sep else f"client-{index}"
                if not name or not rank.strip().isdigit() or int(rank) < 1:
                    raise ValueError(f"{entry!r} is not CLIENT=RANK or a rank >= 1 (e.g. client-0=4,client-1=8 "
                                     "or 4,8,16)")
                if name in pairs:
                    raise ValueError(f"{name} is given twice")
                pairs[name] = int(rank)
            return pairs
        return value

    @field_validator("reddit_mcp_url", "reddit_mcp_command", "reddit_mcp_tool_map", "agent_llm_base_url",
                     mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("reddit_mcp_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of a streamable-HTTP MCP endpoint, "
                             "e.g. http://127.0.0.1:8765/mcp")
        return value.strip()

    @field_validator("agent_llm_base_url")
    @classmethod
    def _llm_url(cls, value: str | None) -> str | None:
        """Refused at start: a URL the agents' LLM client could not use would only fail at the first agent step."""
        if value is None:
            return value
        from urllib.parse import urlsplit

        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL of an OpenAI-compatible server, "
                             "e.g. http://localhost:8000/v1")
        return value.strip()

    @field_validator("reddit_mcp_command")
    @classmethod
    def _command_line(cls, value: str | None) -> str | None:
        if value is None:
            return value
        import shlex

        try:
            words = shlex.split(value)
        except ValueError as error:
            raise ValueError(f"is not a valid command line ({error})") from None
        if not words:
            raise ValueError("is empty")
        return value

    @field_validator("reddit_mcp_tool_map")
    @classmethod
    def _known_tool_map(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from fl_crew_reddit.reddit.tool_map import ToolMapError, load_tool_map

        try:
            load_tool_map(value)
        except ToolMapError as error:
            raise ValueError(str(error)) from None
        return value.strip()

    @field_validator("trainer_devices")
    @classmethod
    def _device_list(cls, value: list[str]) -> list[str]:
        names = [name.lower() for name in value] or ["auto"]
        if names == ["auto"]:
            return names
        bad = [name for name in names if not re.fullmatch(r"cpu|cuda(:\d+)?", name)]
        if bad:
            raise ValueError(f"{', '.join(bad)} is not a device: use auto, or a comma-separated list of cpu, cuda "
                             "or cuda:N (e.g. cuda:0,cuda:1)")
        if len(names) < 2:
            raise ValueError("one device trains in this process already: use auto (or DEVICE), or list 2+ devices "
                             "for one trainer process each")
        return names

    @field_validator("fl_crew_reddit_dir")
    @classmethod
    def _a_folder(cls, value: Path) -> Path:
        """An existing folder, or a path whose nearest existing part is a folder (it is created at the run's start);
        whether it can be written is checked by the commands that write (`check_writable_folder`)."""
        if value.exists() and not value.is_dir():
            raise ValueError("not a folder (it is a file): name a folder for data/, models/, results/, logs/")
        existing = next((parent for parent in value.parents if parent.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"not a folder: {existing} is a file")
        return value

    @field_validator("quantization_bits")
    @classmethod
    def _four_or_eight(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError("Input should be 4 or 8")
        return value

    @field_validator("subreddits", "agent_collect_allowlist", "reddit_dump_subreddits")
    @classmethod
    def _strip_r_prefix(cls, value: list[str]) -> list[str]:
        return [name.removeprefix("r/") for name in value]

    @field_validator("reddit_dump_after", "reddit_dump_before", mode="before")
    @classmethod
    def _epoch_seconds(cls, value):
        """A date, an ISO time or epoch seconds -> epoch seconds (UTC when no zone is given)."""
        if value is None or isinstance(value, int):
            return value
        if isinstance(value, str) and not value.strip():
            return None
        from datetime import date, datetime

        if isinstance(value, date) and not isinstance(value, datetime):
            value = datetime(value.year, value.month, value.day)
        if isinstance(value, str):
            text = value.strip()
            if text.lstrip("-").isdigit():
                return int(text)
            try:
                value = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError("must be a date (2015-03-01), an ISO time (2015-03-01T12:00:00Z) or epoch "
                                 "seconds (1425168000)") from None
        if isinstance(value, datetime):
            return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
        return value

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        codes = [code.lower() for code in value]
        unknown = [code for code in codes if code not in LANGDETECT_LANGUAGES]
        if unknown:
            raise ValueError(f"unknown language code(s) {', '.join(unknown)}; langdetect knows "
                             f"{', '.join(sorted(LANGDETECT_LANGUAGES))}")
        return codes

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.min_reply_tokens > self.max_reply_tokens:
            raise ValueError(f"MIN_REPLY_TOKENS={self.min_reply_tokens} must not exceed "
                             f"MAX_REPLY_TOKENS={self.max_reply_tokens}")
        if not self.use_lora:
            raise ValueError("USE_LORA=false is not supported: only LoRA adapter weights may leave a client, so "
                             "full fine-tuning has no mode here; remove USE_LORA or set it to true")
        if self.self_improve and (self.federation != "inprocess" or self.trainer_devices != ["auto"]):
            raise ValueError("SELF_IMPROVE=true runs where the clients train in this process (it generates with the "
                             "shared model): use FEDERATION=inprocess and TRAINER_DEVICES=auto")
        if self.federation != "inprocess" and self.trainer_devices != ["auto"]:
            raise ValueError(f"FEDERATION={self.federation} trains each client on its own SuperNode: leave "
                             "TRAINER_DEVICES at auto (trainer processes are for FEDERATION=inprocess)")
        if self.federation == "flower":
            host = self.superlink_address.rpartition(":")[0].strip("[]")
            if not host or not self.superlink_address.rpartition(":")[2].isdigit():
                raise ValueError(f"FEDERATION=flower needs SUPERLINK_ADDRESS=host:port of the SuperLink's Control "
                                 f"API (got {self.superlink_address!r})")
            if self.flower_insecure and host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(f"FLOWER_INSECURE=true with SUPERLINK_ADDRESS={self.superlink_address}: only a "
                                 "loopback SuperLink may be reached without TLS; set FLOWER_CERTS instead")
            if not self.flower_insecure and self.flower_certs is None:
                raise ValueError("FEDERATION=flower needs FLOWER_CERTS (the folder the `certs` command made; its "
                                 "ca.crt verifies the SuperLink), or FLOWER_INSECURE=true on loopback")
        self._check_client_ranks()  # first: it names CLIENT_LORA_RANKS where FFA / DP / topk cannot go with it
        if self.ffa_lora and self.aggregation_method == "svd_exact":
            raise ValueError("FFA_LORA=true with AGGREGATION_METHOD=svd_exact: with A frozen and shared, averaging B "
                             "is already exact and svd_exact needs both factors; use fedavg (or any other rule)")
        if self.test_fraction + self.validation_fraction >= 0.9:
            raise ValueError(f"TEST_FRACTION={self.test_fraction:g} + VALIDATION_FRACTION={self.validation_fraction:g} "
                             "must stay below 0.9: most threads must be left for training")
        self._check_compression()
        self._check_num_byzantine()
        self._check_privacy()
        self._check_secure_aggregation()
        self._check_attack()
        self._check_training_objective()
        if self.reddit_mcp_url and self.reddit_mcp_command:
            raise ValueError("set REDDIT_MCP_URL (a server to connect to) or REDDIT_MCP_COMMAND (a server to start), "
                             "not both")
        if self.reddit_mcp_tool_map and not (self.reddit_mcp_url or self.reddit_mcp_command):
            raise ValueError(f"REDDIT_MCP_TOOL_MAP={self.reddit_mcp_tool_map} maps a third-party server's tools: set "
                             "REDDIT_MCP_URL or REDDIT_MCP_COMMAND to that server too")
        if self.reddit_mcp_tool_map and not self.subreddits:
            from fl_crew_reddit.reddit.tool_map import load_tool_map
            from fl_crew_reddit.reddit.tool_names import RedditTool

            if RedditTool.LIST_SUBREDDITS not in load_tool_map(self.reddit_mcp_tool_map).tools:
                raise ValueError(f"REDDIT_MCP_TOOL_MAP={self.reddit_mcp_tool_map}: that server cannot list its "
                                 "subreddits; name them in SUBREDDITS")
        if self.reddit_backend == "dump" and self.reddit_dump_dir is None:
            raise ValueError("REDDIT_BACKEND=dump needs REDDIT_DUMP_DIR (a folder of <subreddit>/submissions.jsonl)")
        if self.reddit_backend == "dump" and not Path(self.reddit_dump_dir).is_dir():
            raise ValueError(f"REDDIT_DUMP_DIR={self.reddit_dump_dir} is not a folder")
        if (self.reddit_dump_after is not None and self.reddit_dump_before is not None
                and self.reddit_dump_after >= self.reddit_dump_before):
            raise ValueError(f"REDDIT_DUMP_AFTER ({self.reddit_dump_after}) must be earlier than REDDIT_DUMP_BEFORE "
                             f"({self.reddit_dump_before}): the time range is empty")
        if self.reddit_backend == "live":
            missing = [name for name in ("reddit_client_id", "reddit_client_secret")
                       if not (getattr(self, name) and getattr(self, name).get_secret_value().strip())]
            if missing:
                raise ValueError(f"REDDIT_BACKEND=live needs {' and '.join(n.upper() for n in missing)}: create a "
                                 "'script' app at https://www.reddit.com/prefs/apps and set its id and secret")
            if not self.subreddits:
                raise ValueError("REDDIT_BACKEND=live needs SUBREDDITS (comma-separated names): Reddit's API "
                                 "cannot list every subreddit")
        if self.agent_mode == "llm" and not self.agent_llm_reachable:
            raise ValueError("AGENT_MODE=llm needs a reachable AGENT_LLM_MODEL: set OPENAI_API_KEY (OpenAI models) or "
                             "AGENT_LLM_BASE_URL (an OpenAI-compatible server: vLLM, llama.cpp, Ollama), or use "
                             "AGENT_MODE=auto or direct")
        return self

    def _check_privacy(self) -> None:
        """DP_MODE=central needs a rule whose output is the noised mean (or a server optimizer stepping on it):
        rules that pick or sort individual updates (Krum, median, ...) have no bounded sensitivity, and svd_exact
        averages products, not the clipped factors. Local DP is post-processing for the server: any rule."""
        if self.dp_mode == "off":
            return
        if self.dp_noise_multiplier == 0 and self.dp_target_epsilon is None:
            raise ValueError(f"DP_MODE={self.dp_mode} needs noise: set DP_NOISE_MULTIPLIER > 0 or DP_TARGET_EPSILON "
                             "(without noise ε is infinite)")
        if self.dp_noise_multiplier > 0 and self.dp_target_epsilon is not None:
            raise ValueError("set DP_NOISE_MULTIPLIER or DP_TARGET_EPSILON, not both: the target chooses the noise")
        if self.dp_mode == "central" and self.aggregation_method not in DP_CENTRAL_METHODS:
            raise ValueError(f"DP_MODE=central with AGGREGATION_METHOD={self.aggregation_method}: central DP adds "
                             "noise to the mean of clipped updates, which needs a mean-based rule "
                             f"({', '.join(DP_CENTRAL_METHODS)}); use one of those or DP_MODE=local")
        if self.dp_delta >= 1 / self.clients_count:
            raise ValueError(f"DP_DELTA={self.dp_delta:g} must be below 1/NUM_CLIENTS = {1 / self.clients_count:g}")

    def _check_secure_aggregation(self) -> None:
        """SECURE_AGGREGATION: Flower's SecAgg+ runs between a ServerApp and SuperNodes, and the server gets only the
        weighted sum of the updates, so a rule that looks at individual updates (Krum, median, trimmed mean, Bulyan;
        svd_exact's per-client factors), central DP (the server clips each update), a compressed update (the masked
        sum is of full-precision vectors; top-k supports differ) and mixed ranks cannot go with it."""
        if not self.secure_aggregation:
            return
        problem = None
        if self.federation == "inprocess":
            problem = "FEDERATION=inprocess has no wire to secure; use FEDERATION=local-flower or flower"
        elif self.clients_count < 2:
            problem = f"{self.clients_count} client: SecAgg+ sums the updates of two or more"
        elif self.aggregation_method not in SECURE_AGGREGATION_METHODS:
            problem = (f"AGGREGATION_METHOD={self.aggregation_method} needs individual updates, the server sees only "
                       f"their sum; use {', '.join(SECURE_AGGREGATION_METHODS)}")
        elif self.dp_mode == "central":
            problem = "DP_MODE=central clips each update on the server, which sees only the sum; use DP_MODE=local"
        elif self.update_compression != "none":
            problem = (f"UPDATE_COMPRESSION={self.update_compression}: SecAgg+ sums masked full vectors (top-k "
                       "supports differ per client); use UPDATE_COMPRESSION=none")
        elif any(rank != self.lora_r for rank in getattr(self, "client_lora_ranks", {}).values()):
            problem = "CLIENT_LORA_RANKS: updates of different ranks cannot be summed; use one rank"
        if problem:
            raise ValueError(f"SECURE_AGGREGATION=true with {problem}")

    def _check_compression(self) -> None:
        """UPDATE_COMPRESSION=topk with a coordinate-wise robust rule cannot work: each client sends a different few
        coordinates, so the median (or trimmed mean, or Bulyan's) of each coordinate is 0 wherever fewer than half the
        clients sent it, which is almost everywhere: the model would silently stop learning. Quantized kinds send
        every coordinate and work with every rule."""
        coordinate_wise = ("median", "trimmed_mean", "bulyan")
        if self.update_compression == "topk" and self.aggregation_method in coordinate_wise:
            raise ValueError(f"UPDATE_COMPRESSION=topk with AGGREGATION_METHOD={self.aggregation_method}: a coordinate-"
                             "wise rule zeroes the coordinates most clients did not send (each sends its own top-k); "
                             "use fp16, int8 or nf4 with this rule, or krum / multi_krum / an averaging rule with topk")

    def _check_client_ranks(self) -> None:
        """CLIENT_LORA_RANKS: the global adapter keeps rank LORA_R, so no client may train more; clients of other
        ranks send factors of other shapes, which only svd_exact combines (on the products)."""
        ranks = self.client_lora_ranks
        above = {name: rank for name, rank in ranks.items() if rank > self.lora_r}
        if above:
            raise ValueError(f"CLIENT_LORA_RANKS gives {', '.join(f'{n}={r}' for n, r in above.items())} above "
                             f"LORA_R={self.lora_r}: the global adapter keeps the largest rank; raise LORA_R")
        names = {f"client-{index}" for index in range(self.clients_count)}
        unknown = [name for name in ranks if name not in names]
        if unknown and self.federation != "flower":  # flower: the sites' own names, known when they connect
            raise ValueError(f"CLIENT_LORA_RANKS names {', '.join(unknown)}, not a client of this run (client-0 ... "
                             f"client-{self.clients_count - 1})")
        if not any(rank != self.lora_r for rank in ranks.values()):
            return
        if self.ffa_lora:
            raise ValueError("CLIENT_LORA_RANKS (mixed ranks) with FFA_LORA=true: a client of lower rank cannot keep "
                             "the shared frozen A of rank LORA_R; set FFA_LORA=false")
        if self.dp_mode == "central":
            raise ValueError("CLIENT_LORA_RANKS (mixed ranks) with DP_MODE=central: the server clips factors but "
                             "averages products, so the clip bounds nothing; use DP_MODE=local or equal ranks")
        if self.update_compression in ("topk", "sign"):
            raise ValueError(f"CLIENT_LORA_RANKS (mixed ranks) with UPDATE_COMPRESSION={self.update_compression}: a "
                             "lower-rank client's error-feedback residual is in the factors of last round's "
                             "truncation, whose basis the next one changes; use fp16, int8 or nf4 with mixed ranks")
        if self.aggregation_method != "svd_exact":
            raise ValueError(f"CLIENT_LORA_RANKS (mixed ranks) with AGGREGATION_METHOD={self.aggregation_method}: "
                             "factors of different ranks can only be combined on their products; use svd_exact")

    def _check_attack(self) -> None:
        """ATTACK needs at least one attacker, and ATTACKER_FRACTION without an attack is a mistake."""
        attackers = int(self.attacker_fraction * self.clients_count + 1e-9)
        if self.attack != "none" and attackers == 0:
            raise ValueError(f"ATTACK={self.attack} with ATTACKER_FRACTION={self.attacker_fraction:g} of "
                             f"{self.clients_count} clients picks no attacker; raise ATTACKER_FRACTION")
        if self.attack == "none" and self.attacker_fraction > 0:
            raise ValueError(f"ATTACKER_FRACTION={self.attacker_fraction:g} without ATTACK: set ATTACK (sign_flip, "
                             "scale, gaussian_noise, label_flip, alie, ipm, backdoor) or leave the fraction at 0")

    def _check_training_objective(self) -> None:
        """DPO changes only a client's local objective: its update is an adapter like SFT's, so every aggregation rule,
        SecAgg+, DP (central or local), compression, mixed ranks, FFA-LoRA, resume and both Flower modes carry it.
        What cannot work: DPO without pair kinds (no pair would be built, so no client could ever train DPO), and,
        under pure DPO, which trains on pairs only and never on SFT examples, what works by adding or changing SFT
        examples: a simulated data-poisoning attack (label_flip, backdoor) and SELF_IMPROVE; they would silently not
        happen."""
        if self.training_objective == "sft":
            unused = [f"{name.upper()}={getattr(self, name)}" for name in ("dpo_reference", "dpo_learning_rate",
                                                                           "dpo_epochs", "dpo_loss_type")
                      if getattr(self, name) != type(self).model_fields[name].default]
            if unused:
                raise ValueError(f"{', '.join(unused)} with TRAINING_OBJECTIVE=sft: these settings shape the DPO "
                                 "steps, which an SFT run never takes; set TRAINING_OBJECTIVE=dpo or sft_then_dpo, or "
                                 "leave them at their defaults")
            return
        kinds = getattr(self, "pref_pair_kinds", None)
        if kinds is not None and not kinds:
            raise ValueError(f"TRAINING_OBJECTIVE={self.training_objective} with PREF_PAIR_KINDS empty: no preference "
                             "pair would be built, so no client could train DPO; set PREF_PAIR_KINDS (votes, "
                             "relevance) or TRAINING_OBJECTIVE=sft")
        if self.training_objective == "dpo" and getattr(self, "self_improve", False):
            raise ValueError("TRAINING_OBJECTIVE=dpo with SELF_IMPROVE=true: the synthetic replies join the clients' "
                             "SFT examples, which DPO never trains on, so self-improvement would not happen; use "
                             "TRAINING_OBJECTIVE=sft_then_dpo or sft, or SELF_IMPROVE=false")
        if self.training_objective == "dpo" and self.attack in ("label_flip", "backdoor"):
            raise ValueError(f"TRAINING_OBJECTIVE=dpo with ATTACK={self.attack}: the attack poisons the attackers' SFT "
                             "examples, which DPO never trains on (it trains on preference pairs), so the simulated "
                             "attack would not happen; use TRAINING_OBJECTIVE=sft_then_dpo or sft, or an update "
                             "attack (sign_flip, scale, gaussian_noise, alie, ipm)")

    def _check_num_byzantine(self) -> None:
        """NUM_BYZANTINE must leave honest clients, and as many per round as the robust rule needs (Krum and
        Multi-Krum: n >= 2f + 3, Bulyan: n >= 4f + 3, as aggregation/rules.py enforces each round)."""
        f, clients = self.num_byzantine, self.clients_count
        if f and f >= clients:
            raise ValueError(f"NUM_BYZANTINE={f} must be below the number of clients ({clients}, from "
                             f"{'NUM_CLIENTS' if self.num_clients else 'NUM_TRAINERS'}): some must be honest")
        need = {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(self.aggregation_method)
        per_round = max(math.ceil(self.fraction_fit * clients), min(self.min_fit_clients, clients))
        if need is not None and per_round < need:
            rule = "n >= 4f + 3" if self.aggregation_method == "bulyan" else "n >= 2f + 3"
            sampled = f" with FRACTION_FIT={self.fraction_fit:g}" if per_round < clients else ""
            raise ValueError(f"NUM_BYZANTINE={f} with AGGREGATION_METHOD={self.aggregation_method} needs at least "
                             f"{need} clients per round ({rule}), but {clients} clients{sampled} give {per_round}: "
                             "lower NUM_BYZANTINE, add clients, or choose another rule")

    @property
    def agent_llm_reachable(self) -> bool:
        """An API key or a server URL is set for the agents' LLM (no network probe)."""
        return bool(self.agent_llm_base_url) or self.openai_api_key is not None

    def training_cap(self, device_type: str) -> tuple[int | None, str]:
        """How many training examples each client keeps (None: all of them), and why, for the console.

        `auto` caps only the CPU demo: on a CPU a 135M model trains ~300 tokens/s, so 3 rounds over a whole dump
        would take days; with a CUDA GPU every example trains. Where the data is small the cap does not bind anyway.
        """
        setting = self.max_examples_per_client
        if isinstance(setting, int):
            return setting, f"MAX_EXAMPLES_PER_CLIENT={setting}"
        if setting == "all":
            return None, "MAX_EXAMPLES_PER_CLIENT=all: every example"
        if device_type == "cuda":
            return None, "MAX_EXAMPLES_PER_CLIENT=auto: every example (a CUDA GPU trains them)"
        return DEMO_CPU_CAP, (f"MAX_EXAMPLES_PER_CLIENT=auto: at most {DEMO_CPU_CAP} training examples per client on "
                              "a CPU, so the demo finishes in minutes (set all, or a number, to train on more)")

    @field_validator("max_examples_per_client")
    @classmethod
    def _positive_cap(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto, all, or a number of examples >= 1")
        return value

    @property
    def clients_count(self) -> int:
        return self.num_clients or self.num_trainers

    # --- derived folders
    @property
    def data_dir(self) -> Path:
        return self.fl_crew_reddit_dir / "data"

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
                public[name] = _masked(value)  # the user:password part of any URL setting
        return public

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, _masked(value)


SECRET_FIELDS = {"openai_api_key", "reddit_client_id", "reddit_client_secret", "reddit_mcp_token"}


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
    return mask_url_credentials("Invalid configuration: " + "; ".join(lines))


def load_config(**overrides) -> FLCrewRedditConfig:
    """Read the environment and `.env`; raise ConfigError with a readable message if anything is invalid."""
    try:
        return FLCrewRedditConfig(**overrides)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None
    except (UnicodeDecodeError, OSError) as error:  # the .env file itself
        env_file = Path(overrides.get("_env_file") or FLCrewRedditConfig.model_config["env_file"]).absolute()
        raise ConfigError(_unreadable_env_file(env_file, error)) from error


def _unreadable_env_file(path: Path, error: Exception) -> str:
    if isinstance(error, OSError):
        return f".env file {path} cannot be read: {error.strerror or error}"
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = data[:bad.start].count(b"\n") + 1
        return (f".env file {path} is not UTF-8 text: byte 0x{data[bad.start]:02x} on line {line} cannot be read; "
                "save the file as UTF-8")
    except OSError:
        pass
    return f".env file {path} is not UTF-8 text ({error}); save the file as UTF-8"


def _masked(value):
    """A setting's value (str, path, list, dict) with URL credentials masked in its strings."""
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(item) for item in value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    return value


# --- checks of the commands that write, and where a failure at start is written in full
def check_writable_folder(config: FLCrewRedditConfig) -> None:
    """Raise ConfigError when FL_CREW_REDDIT_DIR (or the folder it would be created in) cannot be written."""
    folder = Path(config.fl_crew_reddit_dir).expanduser().absolute()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        where = "" if existing == folder else f" (it would be created in {existing})"
        raise ConfigError(f"FL_CREW_REDDIT_DIR={config.fl_crew_reddit_dir} is not writable{where}: "
                          f"{error.strerror or error}; choose a folder this user can write in") from None


def error_log_file(config: FLCrewRedditConfig | None = None) -> Path | None:
    """Where the full trace of a failure outside a run's own log goes: logs/errors.log under FL_CREW_REDDIT_DIR
    (from `config`, else the environment or `.env`, else the working folder) when it can be written there, else
    under the cache folder (`cache_root`); None when neither can be written."""
    if config is not None:
        base = Path(config.fl_crew_reddit_dir)
    else:
        base = Path(os.environ.get("FL_CREW_REDDIT_DIR") or _dotenv_value("FL_CREW_REDDIT_DIR") or Path.cwd())
    for folder in (base.expanduser() / "logs", cache_root() / "logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            continue
        return folder / "errors.log"
    return None


def _dotenv_value(name: str) -> str | None:
    """One variable of `.env`, or None (no file, not readable, not UTF-8, not set)."""
    try:
        from dotenv import dotenv_values

        values = dotenv_values(FLCrewRedditConfig.model_config["env_file"], encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return next((value for key, value in values.items() if key.upper() == name and value), None)


# --- the environment outside FLCrewRedditConfig's fields; no other module of the package reads os.environ
def cache_root() -> Path:
    """The per-user cache folder (prepared base models, npm tools): FL_CREW_REDDIT_CACHE, else
    $XDG_CACHE_HOME/fl_crew_reddit, else ~/.cache/fl_crew_reddit. Not under FL_CREW_REDDIT_DIR: it outlives runs."""
    if os.environ.get("FL_CREW_REDDIT_CACHE"):
        return Path(os.environ["FL_CREW_REDDIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fl_crew_reddit"


def hub_access() -> HubAccess:
    """How the Hugging Face libraries of this process will reach the Hub (HF_HUB_OFFLINE, HF_ENDPOINT)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return HubAccess(offline=offline, endpoint=os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)


def process_environment() -> dict[str, str]:
    """A copy of this process's environment, for a child process (an MCP server) that must see the same settings."""
    return dict(os.environ)
