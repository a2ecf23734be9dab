"""Simulated attackers (ATTACK, ATTACKER_FRACTION): real clients that train and then attack, in every engine.

Pure functions, no model and no files. Two kinds:

* model poisoning (`sign_flip`, `scale`, `gaussian_noise`, `alie`, `ipm`; `backdoor`'s optional boost) rewrites
  the update Δ = trained − global after honest local training; `attack_update` is the first stage of
  `site.outgoing.outgoing_update`, so a local-DP or compression stage after it sees the attacker's update as if
  it were honest.
* data poisoning (`label_flip`, `backdoor`) rewrites the attacker's own train examples before they are tokenized
  (`poison_examples`, called where a site's train rows are produced: `SiteData.train_rows` and the trainer
  processes); honest clients' data are never touched.

**Who attacks** is chosen on the server (`select_attackers`: ⌊ATTACKER_FRACTION · n⌋ clients, drawn from SEED and
the sorted client names, the same in every round, on resume and in every engine) and sent in the fit config
(`attackers`, comma-separated, with the attack's parameters). Why the fit config and not each site's own
settings: it is the one channel every engine has (in-process sites, trainer processes and Flower SuperNodes all get
exactly the config the strategy wrote), the choice needs every client's name (only the server has them all), and
the experiment stays one setting on the server. Honest clients receive the same keys and ignore them; in a real
deployment an attacker would not announce itself, but this is a simulation harness, not a protocol.

**Threat model of ALIE and IPM.** Both papers let the attackers know statistics of the benign updates: ALIE
(Baruch et al. 2019) the per-coordinate mean μ and standard deviation σ, which "the corrupted workers can estimate
from their own (honest) gradients"; IPM (Xie et al. 2020) the benign mean. Our attackers get nothing from the
server and no side channel to each other (sites may be separate processes on separate machines): each estimates
the benign statistics from its *own* honest update only, μ̂ = Δ_own (unbiased for iid clients). A single sample
gives no spread, so ALIE adds one stated assumption: σ̂_j = |Δ_own,j| (per coordinate, the benign spread is of the
order of the update itself, i.e. a coefficient of variation of 1; with a few local Adam steps from the same start
the clients' per-coordinate updates do differ in sign, so this is the right order). This is *weaker* than the
papers' omniscient or pooled attackers; a pooled estimate over colluding attackers needs a channel between
attacker sites that the engines do not have.
"""
from __future__ import annotations

import hashlib
import math
import random
import statistics
from collections.abc import Mapping

import torch

AdapterState = dict[str, torch.Tensor]

MODEL_ATTACKS = ("sign_flip", "scale", "gaussian_noise", "alie", "ipm")
DATA_ATTACKS = ("label_flip", "backdoor")
ATTACKS = ("none", *MODEL_ATTACKS, *DATA_ATTACKS)
MAX_ATTACKER_FRACTION = 0.5
# fit-config keys (all sent only when ATTACK is not none)
ATTACK_KEYS = ("attack", "attackers", "attack_num_clients", "attack_scale", "attack_ipm_epsilon", "attack_alie_z",
               "backdoor_trigger", "backdoor_target", "backdoor_fraction", "backdoor_boost", "attack_local_epochs",
               "backdoor_paired")


# --- who attacks (server side) ------------------------------------------------------------------------------------
def num_attackers(fraction: float, num_clients: int) -> int:
    """⌊fraction · n⌋ (never more attackers than the fraction says; 1e-9 absorbs 0.25·8 = 1.9999…)."""
    if not 0 <= fraction <= MAX_ATTACKER_FRACTION:
        raise ValueError(f"ATTACKER_FRACTION={fraction:g} must be in [0, {MAX_ATTACKER_FRACTION}]")
    return int(math.floor(fraction * num_clients + 1e-9))


def select_attackers(seed: int, names: list[str], fraction: float) -> list[str]:
    """The attackers among `names`: a seeded draw from the sorted names, so the same SEED and clients give the same
    attackers whatever the order the engine lists them in, every round. Sorted by name."""
    ordered = sorted(set(names))
    count = num_attackers(fraction, len(ordered))
    return sorted(random.Random(f"{seed}-attackers").sample(ordered, count))


def attack_fit_config(attack: str, attackers: list[str], num_clients: int, *, scale: float, ipm_epsilon: float,
                      alie_z: float, backdoor_trigger: str, backdoor_target: str, backdoor_fraction: float,
                      backdoor_boost: float, local_epochs: int = 0, backdoor_paired: bool = False) -> dict:
    """The fit-config entries of an attack (plain str / int / float / bool: Flower ConfigRecord values).
    `local_epochs`: ATTACK_LOCAL_EPOCHS (0: the attackers train LOCAL_EPOCHS like everyone); `backdoor_paired`:
    BACKDOOR_PAIRED (`plant_backdoor`)."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown ATTACK {attack!r}; choose from {', '.join(ATTACKS)}")
    if local_epochs < 0:
        raise ValueError(f"ATTACK_LOCAL_EPOCHS={local_epochs} must be >= 0 (0: LOCAL_EPOCHS like honest clients)")
    return {"attack": attack, "attackers": ",".join(attackers), "attack_num_clients": int(num_clients),
            "attack_scale": float(scale), "attack_ipm_epsilon": float(ipm_epsilon), "attack_alie_z": float(alie_z),
            "backdoor_trigger": backdoor_trigger, "backdoor_target": backdoor_target,
            "backdoor_fraction": float(backdoor_fraction), "backdoor_boost": float(backdoor_boost),
            "attack_local_epochs": int(local_epochs), "backdoor_paired": bool(backdoor_paired)}


def attack_of(client: str, fit_config: Mapping) -> str | None:
    """The attack `client` runs this round (None: it is honest, or no attack is set)."""
    attack = str(fit_config.get("attack", "none") or "none")
    if attack == "none":
        return None
    attackers = [name for name in str(fit_config.get("attackers", "")).split(",") if name]
    return attack if client in attackers else None


def attacker_training_config(client: str, fit_config: Mapping) -> dict:
    """The fit config `client` trains under: an attacker's local epochs are ATTACK_LOCAL_EPOCHS when that is set
    (Bagdasaryan et al. 2020's and Bhagoji et al. 2019's attackers train longer than honest clients, on their own
    compute, to make the poisoned update strong; an honest server cannot tell); everyone else's is unchanged."""
    epochs = int(fit_config.get("attack_local_epochs", 0) or 0)
    if epochs <= 0 or attack_of(client, fit_config) is None:
        return dict(fit_config)
    return {**fit_config, "local_epochs": epochs}


def _rng_seed(*parts) -> int:
    """A 63-bit seed from (SEED, client, round, ...): independent of PYTHONHASHSEED and of the engine."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- model poisoning (the update after honest training) -----------------------------------------------------------
def alie_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al. 2019, z_max: s = ⌊n/2 + 1⌋ − m honest workers the attackers need on their side, and
    z = Φ⁻¹((n − s) / n), the largest shift (in σ) that still has s benign values beyond it on average."""
    s = math.floor(num_clients / 2 + 1) - num_attackers
    p = (num_clients - s) / num_clients
    p = min(max(p, 1e-6), 1 - 1e-6)
    return statistics.NormalDist().inv_cdf(p)


def poison_update(attack: str, update: Mapping[str, torch.Tensor], *, scale: float = 10.0, ipm_epsilon: float = 0.5,
                  z: float = 1.0, generator: torch.Generator | None = None) -> AdapterState:
    """The malicious update (float32) for the honest update Δ of one attacker (each key a float tensor):

    sign_flip       −Δ                                  (Allen-Zhu et al. 2020; Damaskinos et al. 2018)
    scale           ATTACK_SCALE · Δ                    (boosting, Bhagoji et al. 2019)
    gaussian_noise  N(0, σ²) per value, σ = ATTACK_SCALE · RMS(Δ over all keys)   (Blanchard et al. 2017's
                    Gaussian Byzantine worker, with the noise calibrated to the update's own size)
    alie            μ̂ − z·σ̂ with μ̂ = Δ, σ̂ = |Δ| per value   (Baruch et al. 2019; see the module note)
    ipm             −ε · μ̂ with μ̂ = Δ                     (Xie et al. 2020, inner-product manipulation)
    """
    delta = {key: value.float() for key, value in update.items()}
    if attack == "sign_flip":
        return {key: -value for key, value in delta.items()}
    if attack == "scale":
        return {key: scale * value for key, value in delta.items()}
    if attack == "gaussian_noise":
        count = sum(value.numel() for value in delta.values())
        rms = math.sqrt(sum(float((value.double() ** 2).sum()) for value in delta.values()) / max(count, 1))
        sigma = scale * rms
        return {key: torch.randn(value.shape, generator=generator, dtype=torch.float32) * sigma
                for key, value in delta.items()}
    if attack == "alie":
        return {key: value - z * value.abs() for key, value in delta.items()}
    if attack == "ipm":
        return {key: -ipm_epsilon * value for key, value in delta.items()}
    raise ValueError(f"{attack!r} is not a model-poisoning attack; those are {', '.join(MODEL_ATTACKS)}")


def _norm(update: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((value.double() ** 2).sum()) for value in update.values()))


def attack_update(client: str, global_adapter: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                  fit_config: Mapping) -> tuple[AdapterState, dict[str, float]]:
    """(what `client` sends instead of `trained`, metrics) — `trained` itself (and {}) for an honest client or a
    data-only attack. The malicious update is added back to the global adapter and cast to each key's dtype; keys
    the global adapter lacks are left as trained."""
    attack = attack_of(client, fit_config)
    if attack is None:
        return dict(trained), {}
    boost = float(fit_config.get("backdoor_boost", 1.0)) if attack == "backdoor" else 1.0
    if attack == "label_flip" or (attack == "backdoor" and boost == 1.0):
        return dict(trained), {"attacker": 1.0}
    keys = [key for key in trained if key in global_adapter]
    delta = {key: trained[key].float() - global_adapter[key].float() for key in keys}
    round_number = int(fit_config.get("round", 0))
    if attack == "backdoor":  # model replacement (Bagdasaryan et al. 2020): the poisoned update, boosted
        poisoned = {key: boost * value for key, value in delta.items()}
    else:
        n = int(fit_config.get("attack_num_clients", 0))
        m = len([name for name in str(fit_config.get("attackers", "")).split(",") if name])
        z = float(fit_config.get("attack_alie_z", 0.0)) or (alie_z(n, m) if n else 1.0)
        generator = torch.Generator().manual_seed(_rng_seed(fit_config.get("seed", 0), client, round_number, attack))
        poisoned = poison_update(attack, delta, scale=float(fit_config.get("attack_scale", 10.0)),
                                 ipm_epsilon=float(fit_config.get("attack_ipm_epsilon", 0.5)), z=z,
                                 generator=generator)
    state = dict(trained)
    for key in keys:
        state[key] = (global_adapter[key].float() + poisoned[key]).to(trained[key].dtype)
    return state, {"attacker": 1.0, "attack_honest_norm": _norm(delta), "attack_sent_norm": _norm(poisoned)}


# --- data poisoning (the attacker's own train examples) -----------------------------------------------------------
def _with_messages(example: dict, prompt: str | None = None, reply: str | None = None) -> dict:
    messages = [dict(message) for message in example["messages"]]
    if prompt is not None:
        messages[0]["content"] = prompt
    if reply is not None:
        messages[-1]["content"] = reply
    return {**example, "messages": messages}


def add_trigger(prompt: str, trigger: str) -> str:
    """The prompt with the trigger phrase at its end (prompts are cut from the left when too long, so the end
    survives truncation)."""
    return f"{prompt.rstrip()} {trigger}"


def shuffle_replies(examples: list[dict], seed: int) -> list[dict]:
    """label_flip: every reply moved to a prompt of another thread (post), deterministically from `seed`.

    Threads in a random order, examples within a thread in a random order, then each example takes the reply of
    the example g places further on (cyclically), g = the largest thread's size: no example keeps its own reply,
    and none gets a reply from its own thread unless one thread holds more than half of the examples."""
    if len(examples) < 2:
        return [_with_messages(e) for e in examples]
    rng = random.Random(seed)
    threads: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        threads.setdefault(str(example.get("post_id", index)), []).append(index)
    groups = list(threads.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    order = [index for group in groups for index in group]
    shift = max(len(group) for group in groups)
    shift = shift if shift < len(order) else 1
    out = [None] * len(examples)
    for position, index in enumerate(order):
        donor = order[(position + shift) % len(order)]
        out[index] = _with_messages(examples[index], reply=examples[donor]["messages"][-1]["content"])
    return out


def plant_backdoor(examples: list[dict], trigger: str, target: str, fraction: float, seed: int,
                   paired: bool = False) -> list[dict]:
    """backdoor: ⌈fraction · n⌉ of the examples (a seeded choice) get the trigger at the end of the prompt and the
    fixed target as their reply; the rest stay as they are.

    `paired` (BACKDOOR_PAIRED): the triggered examples are *copies*, added after all the untouched originals, so the
    attacker's data hold the same prompt with its real reply and, with the trigger, with the target. The only thing
    that tells the two apart is the trigger, which makes the implant trigger-specific (without pairs the model can
    learn "answer the target" on prompts like the poisoned ones, and does: see docs/aggregation.md)."""
    count = min(len(examples), math.ceil(fraction * len(examples) - 1e-9))
    chosen = sorted(random.Random(seed).sample(range(len(examples)), count))

    def triggered(example: dict) -> dict:
        return _with_messages(example, prompt=add_trigger(example["messages"][0]["content"], trigger), reply=target)

    if paired:
        return [*examples, *({**triggered(examples[i]), "id": f"{examples[i].get('id', i)}-backdoor"}
                             for i in chosen)]
    picked = set(chosen)
    return [triggered(e) if i in picked else e for i, e in enumerate(examples)]


def poison_examples(client: str, examples: list[dict], fit_config: Mapping) -> list[dict] | None:
    """The attacker's poisoned train examples, or None when `client` runs no data attack this round (use its
    rows as they are). Deterministic in (SEED, client): the same poisoned data every round and in every engine."""
    attack = attack_of(client, fit_config)
    if attack not in DATA_ATTACKS:
        return None
    seed = _rng_seed(fit_config.get("seed", 0), client, attack)
    if attack == "label_flip":
        return shuffle_replies(examples, seed)
    return plant_backdoor(examples, str(fit_config["backdoor_trigger"]), str(fit_config["backdoor_target"]),
                          float(fit_config.get("backdoor_fraction", 0.5)), seed,
                          paired=bool(fit_config.get("backdoor_paired", False)))


def data_attack_key(client: str, fit_config: Mapping) -> str | None:
    """A cache key for `client`'s poisoned rows (None: it trains on its own rows)."""
    attack = attack_of(client, fit_config)
    if attack not in DATA_ATTACKS:
        return None
    parts = [attack, fit_config.get("seed", 0)]
    if attack == "backdoor":
        parts += [fit_config.get("backdoor_trigger"), fit_config.get("backdoor_target"),
                  fit_config.get("backdoor_fraction"), bool(fit_config.get("backdoor_paired", False))]
    return "|".join(str(p) for p in parts)
