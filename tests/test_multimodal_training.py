"""Issue 15, the model side: the LLaVA-style image projector (CLIP embedding → soft tokens in the prompt), its loss
with the same contract as reply_token_nll, its files beside the PEFT adapter, its tensors through the real
aggregation rules and checks, and the image's contribution (real vs blank image) on a tiny model."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from fl_crew_reddit.aggregation import (
    check_update,
    fedavg,
    ffa_lora_trainable,
    median,
    screen_updates,
    svd_exact,
    trimmed_mean,
    update_norm,
)
from fl_crew_reddit.aggregation.mixed_rank import truncate_adapter
from fl_crew_reddit.preprocessing.examples import tokenize_example
from fl_crew_reddit.training.batching import collate, reply_token_nll
from fl_crew_reddit.training.multimodal import (
    PROJECTOR_PREFIX,
    SKIP_FEATURES_MISSING,
    SKIP_FEATURES_NOT_FINITE,
    SKIP_IMAGES_OVER_LIMIT,
    SKIP_SLOTS_DO_NOT_FIT,
    ImageProjector,
    NotAClipModel,
    ProjectorSpec,
    blank_image_features,
    build_projector,
    collate_multimodal,
    embedding_rms,
    image_contribution,
    load_image_encoder,
    load_projector_state,
    modality_grouped_batches,
    multimodal_reply_nll,
    multimodal_rows,
    pack_multimodal,
    projector_from_config,
    projector_state,
    split_projector,
    with_projector,
)
from fl_crew_reddit.training.projector_files import (
    PROJECTOR_CONFIG,
    PROJECTOR_WEIGHTS,
    load_multimodal_adapter,
    load_projector,
    save_multimodal_adapter,
)

CPU = torch.device("cpu")
FEATURES = 16  # the tiny CLIP's projection_dim


@pytest.fixture()
def sharp_model(tiny_model_dir):
    """(peft model, tokenizer): the tiny Llama's shape, with weights drawn at std 0.3 instead of 0.02. With frozen
    tied embeddings of std 0.02 the logits of a 64-wide model stay within about ±1.3, so no adapter can bring a
    reply's loss much below ln(vocabulary) - 2.5: too flat to show what an image adds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.training.peft_setup import build_peft_model

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
        peft_model = build_peft_model(base, FLCrewRedditConfig(base_llm_model=str(tiny_model_dir), lora_r=4,
                                                               lora_alpha=8, device="cpu"))
    return peft_model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _example(reply: str, images: list[str], prompt: str = "r/pics: what colour is this?") -> dict:
    return {"id": reply[:8], "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "image_paths": images}


def _features(*names: str, seed: int = 1) -> dict[Path, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {Path(name): torch.randn(FEATURES, generator=generator) * 5 for name in names}


def _projector(model, kind: str = "mlp2", tokens: int = 4, seed: int = 0) -> ImageProjector:
    return build_projector(model, FEATURES, kind=kind, tokens=tokens, seed=seed)


# --- the projector ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp2", "linear"])
def test_projector_shapes_seeded_init_and_starting_scale(tiny_model, kind):
    model, _ = tiny_model
    before = torch.random.get_rng_state()
    projector = _projector(model, kind, tokens=3, seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)  # built from its own seed: the run's RNG is untouched
    hidden = model.get_base_model().config.hidden_size
    features = torch.randn(7, FEATURES) * 10
    soft = projector(features)
    assert soft.shape == (7, 3, hidden)
    again = _projector(model, kind, tokens=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(projector.state_dict().values(), again.state_dict().values()))
    other = _projector(model, kind, tokens=3, seed=6)
    assert not torch.equal(projector.out.weight, other.out.weight)
    # soft tokens start at the size of the LM's own input embeddings (a raw CLIP vector is far larger)
    rms = float(soft.detach().pow(2).mean().sqrt())
    assert 0.5 < rms / embedding_rms(model) < 2.0, (rms, embedding_rms(model))
    expected = {"mlp2": FEATURES * 3 * hidden + 3 * hidden + hidden * hidden + hidden,
                "linear": FEATURES * 3 * hidden + 3 * hidden}[kind]
    assert sum(p.numel() for p in projector.parameters()) == expected
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        projector(torch.randn(2, FEATURES + 1))
    with pytest.raises(ValueError, match="MULTIMODAL_PROJECTOR='mlp3'"):
        ProjectorSpec(kind="mlp3", feature_size=FEATURES, hidden_size=hidden, tokens=2)


def test_settings_choose_the_projector(tiny_model_dir, tmp_path, tiny_model):
    from conftest import tiny_run_config
    from pydantic import ValidationError

    config = tiny_run_config(tiny_model_dir, tmp_path)
    assert (config.multimodal_projector, config.multimodal_tokens, config.max_images_per_example) == ("mlp2", 4, 4)
    projector = projector_from_config(tiny_run_config(tiny_model_dir, tmp_path, multimodal_projector="linear",
                                                      multimodal_tokens=2), tiny_model[0], FEATURES)
    assert (projector.spec.kind, projector.spec.tokens, projector.spec.seed) == ("linear", 2, config.seed)
    with pytest.raises(ValidationError, match="multimodal_projector"):
        tiny_run_config(tiny_model_dir, tmp_path, multimodal_projector="mlp3")
    with pytest.raises(ValidationError, match="multimodal_tokens"):
        tiny_run_config(tiny_model_dir, tmp_path, multimodal_tokens=0)


# --- rows with image slots ----------------------------------------------------------------------------------------
def test_rows_reserve_slots_at_the_start_of_the_user_turn_and_count_what_is_left_out(tiny_model):
    _, tokenizer = tiny_model
    features = _features("a.png", "b.png", "c.png")
    features[Path("nan.png")] = torch.full((FEATURES,), float("nan"))
    examples = [_example("It is red, a nice red.", ["a.png", "missing.png", "b.png", "nan.png", "c.png"]),
                _example("Just text here.", [])]
    built = multimodal_rows(tokenizer, examples, features.get, max_length=128, tokens_per_image=4, max_images=4)
    assert built.skipped == {SKIP_IMAGES_OVER_LIMIT: 1, SKIP_FEATURES_MISSING: 1, SKIP_FEATURES_NOT_FINITE: 1}
    assert built.images == 2 and built.image_rows == 1
    image_row, text_row = built.rows
    # the text-only row is tokenize_example's row, unchanged
    plain = tokenize_example(tokenizer, examples[1]["messages"], 128)
    assert text_row["input_ids"] == plain["input_ids"] and text_row["reply_mask"] == plain["reply_mask"]
    assert text_row["image_slots"] == [] and "image_embeds" not in text_row
    # two images → 8 slots, right after "<|im_start|>user\n", before the post's text; no loss on them
    slots = image_row["image_slots"]
    assert len(slots) == 8 and slots == list(range(slots[0], slots[0] + 8))
    head = tokenizer.decode(image_row["input_ids"][:slots[0]])
    assert head.endswith("<|im_start|>user\n"), head
    assert tokenizer.decode(image_row["input_ids"][slots[-1] + 1:]).startswith("r/pics: what colour")
    assert not any(image_row["reply_mask"][s] for s in slots)
    reference = tokenize_example(tokenizer, examples[0]["messages"], 128)
    assert sum(image_row["reply_mask"]) == sum(reference["reply_mask"])  # the same reply tokens carry the loss
    assert torch.equal(image_row["image_embeds"], torch.stack([features[Path("a.png")], features[Path("b.png")]]))

    # a long prompt is cut from the left of its text, never through the slots; slots that leave no room for a reply
    # fall back to the text-only row, counted
    long = [_example("Red.", ["a.png"], prompt="word " * 200)]
    cut = multimodal_rows(tokenizer, long, features.get, max_length=64, tokens_per_image=4, max_images=4).rows[0]
    assert len(cut["input_ids"]) <= 64 and cut["truncated"] and len(cut["image_slots"]) == 4
    assert sum(cut["reply_mask"]) == sum(tokenize_example(tokenizer, long[0]["messages"], 64)["reply_mask"])
    crowded = multimodal_rows(tokenizer, long, features.get, max_length=24, tokens_per_image=16, max_images=4)
    assert crowded.skipped == {SKIP_SLOTS_DO_NOT_FIT: 1} and crowded.rows[0]["image_slots"] == []
    assert crowded.rows[0]["input_ids"] == tokenize_example(tokenizer, long[0]["messages"], 24)["input_ids"]


def test_slots_without_a_chat_template(tiny_model):
    """A base model without a chat template gets the plain layout; the slots still open the post's text."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model[1].name_or_path)
    plain.chat_template = None
    rows = multimodal_rows(plain, [_example("Red.", ["a.png"])], _features("a.png").get, max_length=128,
                           tokens_per_image=3, max_images=4).rows
    slots = rows[0]["image_slots"]
    assert plain.decode(rows[0]["input_ids"][:slots[0]]) == "### Reddit post\n" and len(slots) == 3
    assert plain.decode(rows[0]["input_ids"][slots[-1] + 1:]).startswith("r/pics: what colour")


def test_batches_are_one_modality_each(tiny_model):
    _, tokenizer = tiny_model
    features = _features("a.png")
    examples = [_example(f"reply number {i}", ["a.png"] if i % 3 == 0 else []) for i in range(20)]
    rows = multimodal_rows(tokenizer, examples, features.get, max_length=128, tokens_per_image=2, max_images=4).rows
    batches = modality_grouped_batches(rows, 4, random.Random(0))
    assert sorted(id(r) for b in batches for r in b) == sorted(id(r) for r in rows)
    assert all(len({bool(r["image_slots"]) for r in batch}) == 1 for batch in batches)


# --- the loss -----------------------------------------------------------------------------------------------------
def _rows(tokenizer, tokens: int = 4):
    features = _features("red.png", "blue.png")
    examples = [_example("It is red.", ["red.png"]), _example("A plain reply without a picture.", []),
                _example("It is blue, very blue.", ["blue.png", "red.png"])]
    return multimodal_rows(tokenizer, examples, features.get, max_length=128, tokens_per_image=tokens,
                           max_images=4).rows


def test_text_only_rows_give_reply_token_nll_exactly(tiny_model):
    model, tokenizer = tiny_model
    projector = _projector(model)
    rows = _rows(tokenizer)
    text = [rows[1]]
    batch, features = collate_multimodal(text, tokenizer.pad_token_id, CPU)
    assert features is None
    nll, count = multimodal_reply_nll(model, projector, batch, features)
    reference, reference_count = reply_token_nll(model, collate(text, tokenizer.pad_token_id, CPU))
    assert count == reference_count and torch.equal(nll, reference)

    # in a mixed batch, the text row costs what it costs alone: the embedding path changes nothing for it
    mixed, mixed_features = collate_multimodal(rows[:2], tokenizer.pad_token_id, CPU)
    alone, alone_features = collate_multimodal(rows[:1], tokenizer.pad_token_id, CPU)
    together, n_together = multimodal_reply_nll(model, projector, mixed, mixed_features)
    image_only, n_image = multimodal_reply_nll(model, projector, alone, alone_features)
    assert n_together == n_image + reference_count
    assert torch.allclose(together, image_only + reference, rtol=1e-5, atol=1e-4)


def test_a_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_model):
    from fl_crew_reddit.training.packing import packed_attention_enabled

    model, tokenizer = tiny_model
    model.eval()  # no dropout: the two layouts see the same weights
    projector = _projector(model)
    rows = _rows(tokenizer)
    padded, features = collate_multimodal(rows, tokenizer.pad_token_id, CPU)
    packed, packed_features = pack_multimodal(rows, CPU, pad_to=sum(len(r["input_ids"]) for r in rows) + 5,
                                              pad_id=tokenizer.pad_token_id)
    assert torch.equal(features, packed_features) and packed["image_index"].numel() == 12
    expected, count = multimodal_reply_nll(model, projector, padded, features)
    expected.backward()
    reference = [p.grad.clone() for p in projector.parameters()]
    projector.zero_grad()
    with pytest.raises(RuntimeError, match="packed attention"):
        multimodal_reply_nll(model, projector, packed, packed_features)
    with packed_attention_enabled(model):
        got, packed_count = multimodal_reply_nll(model, projector, packed, packed_features)
        got.backward()
    assert packed_count == count and torch.allclose(got, expected, rtol=1e-5)
    assert all(torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6) for p, g in zip(projector.parameters(), reference))


def test_soft_tokens_change_the_loss_of_an_image_row(tiny_model):
    model, tokenizer = tiny_model
    projector = _projector(model)
    batch, features = collate_multimodal(_rows(tokenizer)[:1], tokenizer.pad_token_id, CPU)
    assert batch["image_index"].tolist() == _rows(tokenizer)[0]["image_slots"]  # row 0: flat index = slot
    with torch.no_grad():
        real, _ = multimodal_reply_nll(model, projector, batch, features)
        other, _ = multimodal_reply_nll(model, projector, batch, features.flip(-1))
        placeholder, _ = reply_token_nll(model, batch)  # the placeholder ids' own embeddings
    assert abs(float(real) - float(other)) > 1e-4 and abs(float(real) - float(placeholder)) > 1e-4
    with pytest.raises(ValueError, match="needs the image projector"):
        multimodal_reply_nll(model, None, batch, features)
    with pytest.raises(ValueError, match="image slots"):
        multimodal_reply_nll(model, _projector(model, tokens=3), batch, features)


def test_gradients_reach_projector_and_lora_not_the_frozen_lm_or_clip(tiny_model, tiny_clip_dir):
    model, tokenizer = tiny_model
    encoder = load_image_encoder(str(tiny_clip_dir))
    images = [Image.new("RGB", (32, 32), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    clip_features = encoder.image_embeddings(images)
    assert clip_features.shape == (2, FEATURES)
    features = {Path("red.png"): clip_features[0], Path("blue.png"): clip_features[1]}
    rows = multimodal_rows(tokenizer, [_example("It is red.", ["red.png"]), _example("Blue it is.", ["blue.png"])],
                           features.get, max_length=128, tokens_per_image=4, max_images=4).rows
    projector = _projector(model)
    model.train()
    batch, image_features = collate_multimodal(rows, tokenizer.pad_token_id, CPU)
    nll, count = multimodal_reply_nll(model, projector, batch, image_features)
    (nll / count).backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in projector.parameters())
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for _, p in lora)
    # PEFT starts B at zero, so at the first step only the B factors get a gradient (A's is zero, not missing)
    assert all(p.grad is not None for _, p in lora)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in lora if "lora_B" in n)
    frozen = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and all(not p.requires_grad and p.grad is None for _, p in frozen)
    assert all(p.grad is None for p in encoder.model.parameters())


# --- files ----------------------------------------------------------------------------------------------------------
def test_save_and_load_beside_the_adapter_bit_identical(tiny_model, tiny_model_dir, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_model
    projector = _projector(model, tokens=2, seed=3)
    with torch.no_grad():  # trained-looking weights, not the init
        for parameter in [*projector.parameters(), *(p for n, p in model.named_parameters() if "lora_" in n)]:
            parameter.add_(torch.randn_like(parameter) * 0.05)
    folder = save_multimodal_adapter(model, projector, tmp_path / "client-1")
    assert {PROJECTOR_WEIGHTS, PROJECTOR_CONFIG, "adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in folder.iterdir()}

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    saved_lora = get_peft_model_state_dict(model)
    assert all(torch.equal(v, get_peft_model_state_dict(plain)[k]) for k, v in saved_lora.items())

    loaded_model, loaded = load_multimodal_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    assert loaded.spec == projector.spec
    assert projector.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in projector.state_dict().items())
    assert all(torch.equal(v, get_peft_model_state_dict(loaded_model)[k]) for k, v in saved_lora.items())
    rows = _rows(tokenizer, tokens=2)
    batch, features = collate_multimodal(rows, tokenizer.pad_token_id, CPU)
    model.eval()
    with torch.no_grad():
        assert torch.equal(multimodal_reply_nll(model, projector, batch, features)[0],
                           multimodal_reply_nll(loaded_model, loaded, batch, features)[0])

    trainable_model, trainable = load_multimodal_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder,
                                                         is_trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert any(p.requires_grad for n, p in trainable_model.named_parameters() if "lora_" in n)

    text_only = save_multimodal_adapter(model, None, tmp_path / "text-only")
    assert load_multimodal_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), text_only)[1] is None
    from fl_crew_reddit.training.projector_files import save_projector

    save_projector(ImageProjector(ProjectorSpec(kind="linear", feature_size=FEATURES, hidden_size=32, tokens=2)),
                   text_only)
    with pytest.raises(ValueError, match="soft tokens of width 32, the base model's hidden size is 64"):
        load_multimodal_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), text_only)
    (folder / PROJECTOR_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="projector_config.json but not projector.safetensors"):
        load_projector(folder)


def test_a_projector_that_does_not_fit_is_refused_by_name(tiny_model, tmp_path):
    model, _ = tiny_model
    projector = _projector(model)
    state = projector_state(projector)
    state[PROJECTOR_PREFIX + "out.weight"] = state[PROJECTOR_PREFIX + "out.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"shapes \['out.weight"):
        load_projector_state(_projector(model), state)
    folder = save_multimodal_adapter(model, projector, tmp_path / "a")
    (folder / PROJECTOR_CONFIG).write_text('{"kind": "mlp2", "feature_size": 16}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing fields \['hidden_size', 'tokens'\]"):
        load_projector(folder)


# --- federation -----------------------------------------------------------------------------------------------------
def _client_states(model, projector, n: int = 3) -> list[dict[str, torch.Tensor]]:
    from peft import get_peft_model_state_dict

    base = with_projector({k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}, projector)
    generator = torch.Generator().manual_seed(11)
    return [{k: v + torch.randn(v.shape, generator=generator) * 0.01 for k, v in base.items()} for _ in range(n)]


def test_projector_tensors_travel_through_the_real_rules_and_checks(tiny_model):
    model, _ = tiny_model
    projector = _projector(model)
    global_state = with_projector({k: v.detach().clone() for k, v in __import__("peft").get_peft_model_state_dict(
        model).items()}, projector)
    keys = [k for k in global_state if k.startswith(PROJECTOR_PREFIX)]
    assert sorted(keys) == sorted(PROJECTOR_PREFIX + k for k in projector.state_dict())
    states = _client_states(model, projector)
    counts = [10, 30, 60]

    accepted, rejected = screen_updates(global_state, states, ["a", "b", "c"], max_norm=None, min_clients=3)
    assert accepted == [0, 1, 2] and not rejected
    projector_only = {k: v for k, v in global_state.items() if k in keys}
    assert update_norm(global_state, states[0]) > update_norm(
        {k: v for k, v in global_state.items() if k not in keys}, {k: v for k, v in states[0].items() if k not in keys})
    assert update_norm(projector_only, states[0]) > 0

    averaged = fedavg(states, counts)
    weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for key in keys:
        expected = sum(w * s[key].double() for w, s in zip(weights, states))
        assert torch.allclose(averaged[key].double(), expected, atol=1e-6), key
    middle = median(states, counts)
    trimmed = trimmed_mean(states, counts, beta=0.34)
    for key in keys:
        stacked = torch.stack([s[key] for s in states])
        assert torch.equal(middle[key], stacked.median(dim=0).values), key
        assert torch.allclose(trimmed[key], stacked.median(dim=0).values), key  # 3 clients, one cut each side

    # svd_exact re-factors the LoRA pairs and averages the projector plainly (it is not a LoRA factor)
    exact = svd_exact(states, counts)
    assert all(torch.allclose(exact[k], averaged[k], atol=1e-6) for k in keys)
    # FFA-LoRA freezes only the A factors: the projector trains and travels, and its plain average is exact
    assert all(ffa_lora_trainable(k) for k in keys)
    assert not all(ffa_lora_trainable(k) for k in global_state)
    # a client of lower LoRA rank gets the projector unchanged
    lower = truncate_adapter(global_state, 2, alpha=8)
    assert all(torch.equal(lower[k], global_state[k]) for k in keys)

    # compressed updates (UPDATE_COMPRESSION) carry them like any key
    from fl_crew_reddit.aggregation.compression import compress, decompress

    delta = {k: states[0][k] - global_state[k] for k in global_state}
    for kind in ("int8", "sign", "topk"):
        back = decompress(compress(delta, kind), global_state, kind)
        assert set(back) == set(global_state) and all(back[k].shape == delta[k].shape for k in keys)
    int8 = decompress(compress(delta, "int8"), global_state, "int8")
    assert all(torch.allclose(int8[k], delta[k], atol=float(delta[k].abs().max()) / 100) for k in keys)

    # the update checks name a bad projector tensor
    broken = dict(states[0])
    broken[keys[0]] = broken[keys[0]].clone()
    broken[keys[0]].view(-1)[0] = float("nan")
    assert any(keys[0] in reason and "non-finite" in reason for reason in check_update(global_state, broken,
                                                                                      max_norm=None))
    reshaped = {**states[0], keys[0]: states[0][keys[0]].reshape(-1)}
    assert any("shape mismatch" in r and keys[0] in r for r in check_update(global_state, reshaped, max_norm=None))
    missing = {k: v for k, v in states[0].items() if k != keys[0]}
    assert any("missing keys" in r and keys[0] in r for r in check_update(global_state, missing, max_norm=None))

    # the aggregate goes back into the adapter and the projector
    adapter_part, projector_part = split_projector(averaged)
    assert not any(k.startswith(PROJECTOR_PREFIX) for k in adapter_part)
    fresh = _projector(model, seed=9)
    load_projector_state(fresh, averaged)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in projector_part.items())
    with pytest.raises(ValueError, match="already use the projector prefix"):
        with_projector(averaged, projector)


# --- the image's contribution ----------------------------------------------------------------------------------------
def test_image_contribution_real_vs_blank_after_learning_to_read_the_image(sharp_model, tiny_clip_dir):
    """Two posts with the same text, one red and one blue picture, whose replies name the colour: after a few
    steps of projector + LoRA training the real image lowers the reply perplexity against a blank white image."""
    model, tokenizer = sharp_model
    encoder = load_image_encoder(str(tiny_clip_dir))
    pictures = {Path("red.png"): Image.new("RGB", (32, 32), (230, 20, 20)),
                Path("blue.png"): Image.new("RGB", (32, 32), (20, 20, 230))}
    embeds = encoder.image_embeddings(list(pictures.values()))
    features = dict(zip(pictures, embeds))
    examples = [_example("red red red", ["red.png"]), _example("blue blue blue", ["blue.png"])]
    rows = multimodal_rows(tokenizer, examples, features.get, max_length=64, tokens_per_image=2, max_images=4).rows
    blank = blank_image_features(encoder, size=32)
    assert blank.shape == (FEATURES,)

    torch.manual_seed(0)
    projector = _projector(model, tokens=2)
    before = image_contribution(model, projector, rows, blank, pad_id=tokenizer.pad_token_id, blank="white")
    assert before.rows == 2 and before.reply_tokens > 0 and before.blank == "white"
    parameters = [p for p in model.parameters() if p.requires_grad] + list(projector.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=1e-2)
    model.train()
    batch, image_features = collate_multimodal(rows, tokenizer.pad_token_id, CPU)
    for _ in range(60):
        nll, count = multimodal_reply_nll(model, projector, batch, image_features)
        optimiser.zero_grad()
        (nll / count).backward()
        optimiser.step()
    after = image_contribution(model, projector, rows, blank, pad_id=tokenizer.pad_token_id)
    zeros = image_contribution(model, projector, rows, None, pad_id=tokenizer.pad_token_id)
    assert after.perplexity_real < before.perplexity_real
    # the model now reads the picture: the real one gives the replies more probability than a blank one (zeros too)
    assert after.nats_per_token > 0.1 and after.nats_per_token > before.nats_per_token + 0.1, (before, after)
    assert zeros.blank == "zeros" and zeros.nats_per_token > 0.1, zeros
    assert model.training and projector.training  # the metric puts the modes back
    with pytest.raises(ValueError, match="no row with an image"):
        image_contribution(model, projector, [r for r in rows if not r["image_slots"]], blank)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_a_clip_folder_that_is_not_clip_gives_one_clear_error(tiny_model_dir, tmp_path, tiny_clip_dir):
    with pytest.raises(NotAClipModel, match=r"is a llama model folder .*not a CLIP model"):
        load_image_encoder(str(tiny_model_dir))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAClipModel, match="has no config.json"):
        load_image_encoder(str(empty))
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(NotAClipModel, match="config.json cannot be read"):
        load_image_encoder(str(garbled))
    assert load_image_encoder(str(tiny_clip_dir)).model.config.projection_dim == FEATURES
