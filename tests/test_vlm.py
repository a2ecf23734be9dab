"""A vision-language base (training/vlm.py) on a tiny random Idefics3 built from its config: a 1-layer vision tower
on 32×32 images (4 image tokens after the connector), the 2-layer tiny Llama as its language model, the tiny BPE
tokenizer and the Idefics3 image processor assembled into a processor with SmolVLM's chat template. No download."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fl_crew_reddit.config import ConfigError, FLCrewRedditConfig
from fl_crew_reddit.preprocessing.images import SKIP_IMAGE_BROKEN, SKIP_IMAGE_MISSING, SKIP_NOT_AN_IMAGE
from fl_crew_reddit.training.model_loading import BaseModelUnavailable, load_base_model
from fl_crew_reddit.training.multimodal import SKIP_IMAGES_OVER_LIMIT
from fl_crew_reddit.training.vlm import (
    SKIP_IMAGE_TOKENS_DO_NOT_FIT,
    build_vlm_peft_model,
    collate_vlm,
    language_model_path,
    load_vlm,
    vision_language_model_type,
    vlm_reply_nll,
    vlm_rows,
)

CPU = torch.device("cpu")


def vlm_config(folder: Path, **overrides) -> FLCrewRedditConfig:
    settings = dict(base_llm_model=str(folder), lora_r=4, lora_alpha=8, device="cpu", max_seq_length=128)
    return FLCrewRedditConfig(_env_file=None, **{**settings, **overrides})


@pytest.fixture()
def vlm(tiny_vlm_dir):
    """(peft VLM with LoRA on q_proj, v_proj: names the vision tower has too, processor)."""
    config = vlm_config(tiny_vlm_dir, lora_target_modules=["q_proj", "v_proj"])
    model, processor = load_vlm(config, CPU)
    torch.manual_seed(0)
    return build_vlm_peft_model(model, config), processor


def png(path: Path, color: tuple[int, int, int], size=(40, 24)) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def example(reply: str, images: list[Path] | None = None) -> dict:
    return {"messages": [{"role": "user", "content": "what went wrong with this cake?"},
                         {"role": "assistant", "content": reply}],
            "image_paths": [str(p) for p in images or []]}


def test_detection_reads_the_config(tiny_vlm_dir, tiny_model_dir):
    assert vision_language_model_type(str(tiny_vlm_dir)) == "idefics3"
    assert vision_language_model_type(str(tiny_model_dir)) is None  # a text LM
    assert vision_language_model_type("embedded") is None
    with pytest.raises(BaseModelUnavailable, match="not a vision-language model"):
        load_vlm(vlm_config(tiny_model_dir), CPU)
    # the text path refuses a VLM base with a message that says what does load it
    with pytest.raises(BaseModelUnavailable, match="vision-language model \\(idefics3\\).*inprocess.*load_vlm"):
        load_base_model(vlm_config(tiny_vlm_dir), CPU)


def test_missing_processor_is_one_clear_error(tiny_vlm_dir, tmp_path):
    folder = tmp_path / "no-processor"
    shutil.copytree(tiny_vlm_dir, folder)
    (folder / "processor_config.json").unlink()
    with pytest.raises(BaseModelUnavailable, match=rf"{folder}.*idefics3.*processor is missing: the image processor"):
        load_vlm(vlm_config(folder), CPU)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(BaseModelUnavailable, match="the image processor .* and the tokenizer"):
        load_vlm(vlm_config(folder), CPU)


def test_lora_only_on_the_language_model(vlm):
    model, _ = vlm
    base = model.get_base_model()
    assert language_model_path(base) == "model.text_model"
    lora = [name for name, _ in model.named_parameters() if "lora_" in name]
    assert lora and all(".text_model.layers." in name for name in lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) == set(lora)  # vision tower, connector, embeddings, output layer: frozen
    assert not any("vision_model" in name or "connector" in name for name in lora)
    # q_proj and v_proj exist in the vision tower too: none of those got LoRA
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in lora} == {"q_proj", "v_proj"}


def test_all_linear_and_a_bad_target(tiny_vlm_dir):
    model, _ = load_vlm(vlm_config(tiny_vlm_dir), CPU)
    peft = build_vlm_peft_model(model, vlm_config(tiny_vlm_dir))  # LORA_TARGET_MODULES=all-linear, the default
    wrapped = {name.split(".lora_")[0] for name, _ in peft.named_parameters() if "lora_A" in name}
    assert len(wrapped) == 2 * 7 and all(".text_model.layers." in name for name in wrapped)  # lm_head excluded
    model, _ = load_vlm(vlm_config(tiny_vlm_dir), CPU)
    with pytest.raises(ConfigError, match="out_proj matches no linear layer .*language model"):
        build_vlm_peft_model(model, vlm_config(tiny_vlm_dir, lora_target_modules=["q_proj", "out_proj"]))


def test_rows_loss_on_reply_only_and_gradients_reach_lora(vlm, tmp_path):
    model, processor = vlm
    red = png(tmp_path / "red.png", (220, 30, 30))
    built = vlm_rows(processor, [example("it sank in the middle", [red]), example("no picture here")],
                     max_length=128, max_images=4, max_image_size=224)
    assert built.image_rows == 1 and built.images == 1 and not built.skipped
    image_row, text_row = built.rows
    tokenizer = processor.tokenizer
    assert image_row["input_ids"].count(processor.image_token_id) == 4  # the processor's own image tokens
    assert text_row["input_ids"].count(processor.image_token_id) == 0 and text_row["vision"] == {}
    for row, reply in ((image_row, "it sank in the middle"), (text_row, "no picture here")):
        masked = [t for t, m in zip(row["input_ids"], row["reply_mask"]) if m]
        assert tokenizer.decode(masked).startswith(" " + reply)
        assert "<end_of_utterance>" in tokenizer.decode(masked)
        assert processor.image_token_id not in masked
    batch = collate_vlm(built.rows, tokenizer.pad_token_id, CPU)
    assert batch["pixel_values"].shape[:2] == (2, 1)  # the text row gets an all-zero image, dropped by the model
    nll, count = vlm_reply_nll(model, batch)
    assert count == sum(sum(row["reply_mask"][1:]) for row in built.rows)
    # the same sum by the plain forward pass: logits at every position, NLL of the reply tokens only
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(~batch["reply_mask"], -100)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
    assert torch.allclose(nll, expected, rtol=1e-5)
    nll.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    # B starts at zero (so A's gradient is zero at the first step): B's gradient is what reaches the adapter
    assert all(float(g.abs().sum()) > 0 for name, g in grads.items() if "lora_B" in name)


def test_the_image_changes_the_loss(vlm, tmp_path):
    model, processor = vlm
    tokenizer = processor.tokenizer
    losses = []
    for name, color in (("red", (220, 30, 30)), ("blue", (20, 40, 230))):
        built = vlm_rows(processor, [example("it sank", [png(tmp_path / f"{name}.png", color)])],
                         max_length=128, max_images=4, max_image_size=224)
        with torch.no_grad():
            losses.append(float(vlm_reply_nll(model, collate_vlm(built.rows, tokenizer.pad_token_id, CPU))[0]))
    text = vlm_rows(processor, [example("it sank")], max_length=128, max_images=4, max_image_size=224)
    with torch.no_grad():
        losses.append(float(vlm_reply_nll(model, collate_vlm(text.rows, tokenizer.pad_token_id, CPU))[0]))
    assert abs(losses[0] - losses[1]) > 1e-4 and abs(losses[0] - losses[2]) > 1e-4


def test_bad_images_fall_back_to_text_with_counts(vlm, tmp_path):
    _, processor = vlm
    good = png(tmp_path / "good.png", (10, 200, 10))
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png(tmp_path / "whole.png", (1, 2, 3), size=(64, 64)).read_bytes()[:60])
    built = vlm_rows(processor, [example("a", [not_image, tmp_path / "gone.png", truncated]),
                                 example("b", [good] * 4)],
                     max_length=128, max_images=3, max_image_size=224)
    assert len(built.rows) == 2 and built.image_rows == 1 and built.images == 3
    assert built.skipped == {SKIP_NOT_AN_IMAGE: 1, SKIP_IMAGE_MISSING: 1, SKIP_IMAGE_BROKEN: 1,
                             SKIP_IMAGES_OVER_LIMIT: 1}
    # images whose tokens leave no room for a reply: the text-only row, counted
    tight = vlm_rows(processor, [example("a reply " * 10, [good, good])], max_length=24, max_images=4,
                     max_image_size=224)
    assert tight.image_rows == 0 and len(tight.rows) == 1 and tight.skipped == {SKIP_IMAGE_TOKENS_DO_NOT_FIT: 2}
    assert len(tight.rows[0]["input_ids"]) <= 24


def test_adapter_round_trip_loads_with_peft(vlm, tiny_vlm_dir, tmp_path):
    from peft import PeftModel

    model, processor = vlm
    model.eval()  # no LoRA dropout: the same numbers twice
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)  # B starts at zero: give the adapter an effect to lose
    built = vlm_rows(processor, [example("it sank", [png(tmp_path / "red.png", (220, 30, 30))])],
                     max_length=128, max_images=4, max_image_size=224)
    batch = collate_vlm(built.rows, processor.tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        before = vlm_reply_nll(model, batch)[0]
    model.save_pretrained(tmp_path / "adapter")
    base, _ = load_vlm(vlm_config(tiny_vlm_dir), CPU)
    with torch.no_grad():
        plain = vlm_reply_nll(base, batch)[0]
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        after = vlm_reply_nll(loaded, batch)[0]
    assert torch.equal(before, after) and not torch.equal(before, plain)
    saved = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random LLaVA: a 2-layer CLIP vision tower on 32×32 images (16 patches: 16 image tokens), the tiny
    Llama's shape as its language model, CLIP's image processor and a ChatML template with image entries."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for message in messages %}<|im_start|>{{message['role']}}\n{% for line in message['content'] %}"
                "{% if line['type'] == 'text' %}{{line['text']}}{% else %}<image>\n{% endif %}{% endfor %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)
    text = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=128, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32).to_dict()
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_llava_family_the_same_way(tiny_llava_dir, tmp_path):
    """LLaVA's processor gives [images, 3, H, W] (no per-prompt block): a mixed batch concatenates the image rows'
    pixels, and the loss is still the reply NLL of the plain forward pass."""
    assert vision_language_model_type(str(tiny_llava_dir)) == "llava"
    config = vlm_config(tiny_llava_dir, lora_target_modules=["q_proj", "v_proj"])
    model, processor = load_vlm(config, CPU)
    assert language_model_path(model) == "model.language_model"
    peft = build_vlm_peft_model(model, config).eval()
    lora = [name for name, p in peft.named_parameters() if p.requires_grad]
    assert lora and all(".language_model.layers." in name and "lora_" in name for name in lora)
    built = vlm_rows(processor, [example("no picture"), example("it sank", [png(tmp_path / "red.png", (200, 0, 0))])],
                     max_length=128, max_images=4, max_image_size=224)
    assert built.image_rows == 1 and built.rows[1]["input_ids"].count(model.config.image_token_index) == 16
    batch = collate_vlm(built.rows, processor.tokenizer.pad_token_id, CPU)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        nll, count = vlm_reply_nll(peft, batch)
        logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values=batch["pixel_values"]).logits
    labels = batch["input_ids"].masked_fill(~batch["reply_mask"], -100)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
    assert count == int((labels[:, 1:] != -100).sum()) and torch.allclose(nll, expected, rtol=1e-5)


def test_lora_learns_to_read_the_image(tiny_vlm_dir, tmp_path):
    """Red image → "red", blue image → "blue": after 20 steps on the language model's LoRA alone (vision tower and
    connector frozen) the replies are likelier with their own image than with the swapped one."""
    config = vlm_config(tiny_vlm_dir, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    model, processor = load_vlm(config, CPU)
    torch.manual_seed(0)
    peft = build_vlm_peft_model(model, config)
    red, blue = png(tmp_path / "red.png", (230, 20, 20)), png(tmp_path / "blue.png", (20, 20, 230))

    def batch(pairs):
        rows = vlm_rows(processor, [example(reply, [image]) for reply, image in pairs], max_length=64,
                        max_images=1, max_image_size=64).rows
        return collate_vlm(rows, processor.tokenizer.pad_token_id, CPU)

    matched, swapped = batch([("red", red), ("blue", blue)]), batch([("red", blue), ("blue", red)])

    def gap() -> float:  # nats per reply token the right image is worth
        with torch.no_grad():
            return float(vlm_reply_nll(peft, swapped)[0] - vlm_reply_nll(peft, matched)[0]) / matched["count"]

    before = gap()
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(20):
        nll, count = vlm_reply_nll(peft, matched)
        (nll / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gap() > before + 0.2



def test_local_trainer_fits_a_vlm_client(tiny_vlm_dir, tmp_path):
    """The client side of a round on a VLM base: LocalTrainer.fit on vlm_rows (image and text rows mixed, padded
    batches even where packing is asked for) trains the language model's LoRA through the images (the matched image
    becomes worth more than the swapped one) and returns only those tensors."""
    from fl_crew_reddit.training.trainer import LocalTrainer, snapshot_adapter

    config = vlm_config(tiny_vlm_dir, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    model, processor = load_vlm(config, CPU)
    torch.manual_seed(0)
    peft = build_vlm_peft_model(model, config)
    red, blue = png(tmp_path / "red.png", (230, 20, 20)), png(tmp_path / "blue.png", (20, 20, 230))

    def rows(pairs):
        return vlm_rows(processor, [example(reply, [image] if image else []) for reply, image in pairs],
                        max_length=64, max_images=1, max_image_size=64).rows

    def gap() -> float:  # nats per reply token the right image is worth
        matched, swapped = (collate_vlm(rows(pairs), processor.tokenizer.pad_token_id, CPU)
                            for pairs in ([("red", red), ("blue", blue)], [("red", blue), ("blue", red)]))
        with torch.no_grad():
            return float(vlm_reply_nll(peft, swapped)[0] - vlm_reply_nll(peft, matched)[0]) / matched["count"]

    train = rows([("red", red), ("blue", blue), ("no picture", None), ("none here", None)])
    before, start = gap(), snapshot_adapter(peft)
    trainer = LocalTrainer("site-1", peft, processor.tokenizer, train, CPU, mixed_precision="no",
                           show_progress=False)
    result = trainer.fit(start, {"local_epochs": 10, "batch_size": 2, "learning_rate": 1e-2, "seed": 0,
                                 "packing": "on"})
    assert set(result.state) == set(start) and all(".text_model.layers." in key for key in result.state)
    assert result.num_examples == 4 and result.metrics["steps"] == 20
    assert result.metrics["train_loss"] < result.metrics["first_loss"]
    peft.eval()
    assert gap() > before + 0.1  # measured: 0.010 before, 0.160 after


def test_site_rows_text_view_and_image_counts_for_the_round_loop(vlm, tmp_path):
    """What the round loop wires: a site's every split as VLM rows (images left out counted, in the client's round
    metrics under the projector path's names), preprocessing's text view of the tokenizer rendering through the
    processor (so its text rows match the VLM's), and the image contribution's blank rows (same tokens, white
    pixels) giving another perplexity than the real images."""
    import json

    from fl_crew_reddit.preprocessing.examples import render_chat
    from fl_crew_reddit.site.data import SiteData
    from fl_crew_reddit.training.vlm import (
        VlmRowSettings,
        VlmTextTokenizer,
        render_vlm_chat,
        vlm_image_contribution,
    )
    from fl_crew_reddit.workspace import vlm_image_counts

    model, processor = vlm
    red = png(tmp_path / "red.png", (220, 30, 30))
    examples = [example("it sank", [red, tmp_path / "gone.png"]), example("no picture here")]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    text = VlmTextTokenizer(processor)
    data = SiteData(tmp_path, text, 128, vlm=VlmRowSettings(processor, max_images=4, max_image_size=224))
    rows = data.rows("train")
    assert [row["images"] for row in rows] == [1, 0] and all("vision" in row for row in rows)
    assert vlm_image_counts(data) == {"images_used": 1, "image_rows": 1, "images_left_out_image_missing": 1}
    assert data.rows("test")[0]["images"] == 1  # held-out rows carry their images too
    # preprocessing's chat rendering through the text view is the processor's text-only rendering
    assert render_chat(text, example("a reply")["messages"]) == render_vlm_chat(processor, example("a reply")[
        "messages"], 0)
    text.padding_side = "left"
    assert processor.tokenizer.padding_side == "left"
    text.padding_side = "right"
    # the image contribution: white images of the same sizes, the same tokens
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    blank = vlm_rows(processor, examples, max_length=128, max_images=4, max_image_size=224, blank=True).rows
    assert [row["input_ids"] for row in blank] == [row["input_ids"] for row in rows]
    result = vlm_image_contribution(model, rows, blank, processor.tokenizer.pad_token_id, CPU)
    assert result.rows == 1 and result.reply_tokens > 0
    assert result.perplexity_real > 1 and result.perplexity_blank > 1
    assert result.perplexity_real != result.perplexity_blank


def test_a_long_image_post_loses_the_start_of_its_text_not_its_images_or_reply(vlm, tmp_path):
    """The image tokens cannot be cut: a post too long for MAX_SEQ_LENGTH with its image loses the start of its
    text (the end, nearest the reply, stays) and the reply keeps tokenize_example's minimum."""
    _, processor = vlm
    tokenizer = processor.tokenizer
    long_post = {"messages": [{"role": "user", "content": "first words of the post " * 30 + "and the last words"},
                              {"role": "assistant", "content": "a reply that is long enough to be cut " * 3}],
                 "image_paths": [str(png(tmp_path / "red.png", (220, 30, 30)))]}
    built = vlm_rows(processor, [long_post], max_length=64, max_images=4, max_image_size=224)
    assert not built.skipped and built.image_rows == 1
    (row,) = built.rows
    assert len(row["input_ids"]) <= 64 and row["truncated"]
    assert row["input_ids"].count(processor.image_token_id) == 4
    assert sum(row["reply_mask"]) >= 16  # max(8, 64 // 4)
    prompt = tokenizer.decode([t for t, m in zip(row["input_ids"], row["reply_mask"]) if not m])
    assert "and the last words" in prompt and prompt.rstrip().endswith("Assistant:")
