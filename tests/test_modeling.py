import torch

from micl.adapters import build_peft_config
from micl.config import LoraArgs
from micl.data.collator import MultimodalCollator
from micl.modeling.llm import load_llm
from micl.modeling.multimodal import MultimodalLM
from micl.modeling.projectors import Projector
from micl.modeling.prompting import IGNORE_INDEX, PromptBuilder


def build(tiny_models, dims=None):
    torch.manual_seed(0)
    llm, tokenizer = load_llm(tiny_models["llm"])
    model = MultimodalLM.with_adapter(llm, tokenizer, dims or {"image": 12, "audio": 6},
                                      build_peft_config(LoraArgs(dropout=0.0)),
                                      settings={"llm": tiny_models["llm"]})
    return model, PromptBuilder(tokenizer, "")


def example(builder, instruction, modality, features, target=None):
    media = {} if features is None else {modality: features}
    enc = builder.encode(instruction, {m: f.shape[0] for m, f in media.items()}, target)
    return {"input_ids": enc.input_ids, "labels": enc.labels, "media_mask": enc.media_mask, "media": media}


def test_projector_shapes():
    projector = Projector(12, 64, hidden_dim=32)
    assert projector(torch.randn(3, 5, 12)).shape == (3, 5, 64)
    names = [type(m).__name__ for m in projector.children()]
    assert names == ["LayerNorm", "Linear", "GELU", "Linear"]


def test_labels_only_on_target_and_eos(tiny_models):
    model, builder = build(tiny_models)
    enc = builder.encode("describe the image.", {"image": 4}, "a red circle.")
    tokenizer = model.tokenizer
    labelled = [t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "a red circle." + tokenizer.eos_token
    assert enc.input_ids[-len(labelled):] == labelled  # the target ends the sequence
    assert sum(enc.media_mask) == 4
    # media placeholders sit right after the cue, inside the user turn
    first = enc.media_mask.index(True)
    assert tokenizer.decode(enc.input_ids[:first]).endswith("image: ")
    prompt_only = builder.encode("describe the image.", {"image": 4})
    assert all(l == IGNORE_INDEX for l in prompt_only.labels)
    assert prompt_only.input_ids == enc.input_ids[: len(prompt_only.input_ids)]


def test_collator_left_pads_and_groups_media(tiny_models):
    model, builder = build(tiny_models)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([
        example(builder, "describe the image.", "image", torch.randn(4, 12), "a red circle on the left."),
        example(builder, "q?", "audio", torch.randn(2, 6), "yes"),
        example(builder, "hello", "text", None, "hi"),
    ])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    assert batch["attention_mask"][:, -1].all()  # left padding: every row ends with a real token
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["media_rows"]["image"].tolist() == [0] and batch["media_rows"]["audio"].tolist() == [1]
    assert batch["media_mask"].sum(1).tolist() == [4, 2, 0]


def test_media_embeddings_replace_placeholders(tiny_models):
    model, builder = build(tiny_models)
    feats = [torch.randn(4, 12), torch.randn(2, 6)]
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([
        example(builder, "describe.", "image", feats[0], "x"), example(builder, "q?", "audio", feats[1], "y")])
    embeds = model.embed(batch["input_ids"], batch["media_mask"], batch["media_features"], batch["media_rows"])
    with torch.no_grad():
        assert torch.allclose(embeds[0][batch["media_mask"][0]], model.projectors["image"](feats[0][None])[0])
        assert torch.allclose(embeds[1][batch["media_mask"][1]], model.projectors["audio"](feats[1][None])[0])
        text = model.llm.get_input_embeddings()(batch["input_ids"])
        assert torch.equal(embeds[~batch["media_mask"]], text[~batch["media_mask"]])


def test_forward_returns_media_tokens_and_on_request_the_final_hidden_states(tiny_models):
    model, builder = build(tiny_models)
    feats = [torch.randn(4, 12), torch.randn(2, 6)]
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([
        example(builder, "describe.", "image", feats[0], "x"), example(builder, "q?", "audio", feats[1], "y")])
    captured = []
    hook = model.llm.get_decoder().register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, output_hidden_states=True)
    hook.remove()
    assert plain.hidden_states is None and plain.aux == {}
    assert torch.equal(out.hidden_states, captured[1])  # after the last norm, every position
    assert out.hidden_states.shape[:2] == batch["input_ids"].shape
    head = model.llm.get_output_embeddings()
    assert torch.allclose(head(out.hidden_states[:, out.logits_offset:]), out.logits, atol=1e-5)
    assert torch.equal(out.logits, plain.logits)
    with torch.no_grad():
        assert torch.equal(out.media_tokens["image"], model.projectors["image"](feats[0][None]))
        assert torch.equal(out.media_tokens["audio"], model.projectors["audio"](feats[1][None]))


def test_loss_backpropagates_into_lora_and_projectors_only(tiny_models):
    model, builder = build(tiny_models)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([example(builder, "d.", "image", torch.randn(4, 12), "a b")])
    model(**batch).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projectors.") for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("projectors.image"))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_batched_generation_matches_one_by_one(tiny_models):
    model, builder = build(tiny_models)
    torch.manual_seed(1)
    examples = [example(builder, "describe the image.", "image", torch.randn(4, 12)),
                example(builder, "is it loud? answer in one word please", "audio", torch.randn(2, 6)),
                example(builder, "hi", "text", None)]
    collate = MultimodalCollator(model.tokenizer.pad_token_id)
    batched = model.generate(collate(examples), max_new_tokens=6)
    single = [model.generate(collate([e]), max_new_tokens=6)[0] for e in examples]
    assert batched == single


def test_save_and_reload_phase_gives_identical_logits(tiny_models, tmp_path):
    model, builder = build(tiny_models)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    batch = MultimodalCollator(model.tokenizer.pad_token_id)([example(builder, "d.", "image", torch.randn(4, 12), "a")])
    model.eval()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "phase")
    assert (tmp_path / "phase" / "adapter" / "adapter_config.json").is_file()
    reloaded = MultimodalLM.from_pretrained(tmp_path / "phase")
    reloaded.eval()
    assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    # the adapter folder alone is a plain PEFT adapter
    from peft import PeftModel
    base, _ = load_llm(tiny_models["llm"])
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "phase" / "adapter"))
    lora_a = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert lora_a
