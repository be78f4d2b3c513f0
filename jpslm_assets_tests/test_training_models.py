"""The model factory: random-init demo models with a corpus tokenizer, the packaged SmolLM2, configs."""

import json
from pathlib import Path

import pytest

from jpslm_assets.catalogue import model_entry
from jpslm_assets.resources.models import ModelFactory, count_parameters, load_tokenizer
from jpslm_assets.training.model_facts import architecture_facts
from jpslm_assets.training.tokenizer_training import RESERVED_PIECES
from jpslm_assets_tests.test_training_support import qa_pairs


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    pool = qa_pairs(150)
    return list(zip(pool["question"], pool["answer"], strict=True))


@pytest.fixture(scope="module")
def demo_bases(tmp_path_factory: pytest.TempPathFactory, corpus: list[tuple[str, str]]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    factory = ModelFactory(seed=9)
    return {key: factory.prepare_base(key, corpus, root, "k").folder for key in ("tiny-llama", "tiny-qwen2")}


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-qwen2"])
def test_demo_base_ships_a_sentencepiece_tokenizer_with_chatml_specials(
    key: str, demo_bases: dict[str, Path]
) -> None:
    import sentencepiece as spm

    folder = demo_bases[key]
    assert (folder / "tokenizer.model").is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    decoder = config["added_tokens_decoder"]
    for index, piece in enumerate(RESERVED_PIECES):
        assert decoder[str(index)] == {**decoder[str(index)], "content": piece, "special": True}
    assert "<|im_start|>" in config["chat_template"] and config["eos_token"] == "<|im_end|>"

    tokenizer = load_tokenizer(str(folder))
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "遊水地の監視はどう行いますか？ (Q-12)"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids == processor.encode(rendered), "Hugging Face and SentencePiece must agree on every id"
    assert ids[0] == RESERVED_PIECES.index("<|im_start|>")
    unseen = "鬱蒼とした森林🙂"
    unseen_ids = tokenizer(unseen, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in unseen_ids and tokenizer.decode(unseen_ids) == unseen


def test_random_init_is_seeded_and_sized_by_the_catalogue(
    demo_bases: dict[str, Path], tmp_path: Path, corpus: list[tuple[str, str]]
) -> None:
    import torch
    from safetensors.torch import load_file

    again = ModelFactory(seed=9).prepare_base("tiny-llama", corpus, tmp_path, "k").folder
    first, second = (
        load_file(str(demo_bases["tiny-llama"] / "model.safetensors")),
        load_file(str(again / "model.safetensors")),
    )
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = ModelFactory(seed=10).prepare_base("tiny-llama", corpus, tmp_path, "other-seed").folder
    assert not torch.equal(
        first["model.embed_tokens.weight"],
        load_file(str(other / "model.safetensors"))["model.embed_tokens.weight"],
    )

    config = json.loads((demo_bases["tiny-qwen2"] / "config.json").read_text("utf-8"))
    assert config["model_type"] == "qwen2" and config["hidden_size"] % 256 == 0
    assert config["intermediate_size"] % 256 == 0 and config["vocab_size"] == 4096


def test_an_existing_base_folder_is_reused_not_rebuilt(
    demo_bases: dict[str, Path], corpus: list[tuple[str, str]]
) -> None:
    folder = demo_bases["tiny-llama"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    info = ModelFactory(seed=9).prepare_base("tiny-llama", corpus, folder.parent.parent, "k")
    assert info.folder == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(folder.parent.glob(".*tmp-*"))


def test_empty_corpus_is_refused_for_config_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"corpus \(rebalanced_pool\) is empty"):
        ModelFactory().prepare_base("tiny-llama", [], tmp_path, "k")
    assert not (tmp_path / "tiny-llama" / "k").exists() and not list((tmp_path / "tiny-llama").glob(".*"))


@pytest.mark.parametrize(
    ("key", "heads", "kv_heads", "kind"),
    [("tiny-llama", 8, 2, "GQA"), ("tiny-qwen2", 8, 2, "GQA"), ("smollm2-135m", 9, 3, "GQA")],
)
def test_architecture_facts_come_from_each_config(key: str, heads: int, kv_heads: int, kind: str) -> None:
    factory = ModelFactory()
    config = factory.config(key)
    facts = architecture_facts(
        key, config.to_dict(), count_parameters(config), model_entry(key).paper_attention_label
    )
    assert (facts["heads"], facts["kv_heads"], facts["attention_kind"]) == (heads, kv_heads, kind)
    assert facts["gqa_ratio"] == heads / kv_heads
    if key == "smollm2-135m":
        assert 130_000_000 < facts["parameters"] < 140_000_000 and facts["vocab_size"] == 49152


@pytest.fixture(scope="module")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ModelFactory().prepare_base("smollm2-135m", [], tmp_path_factory.mktemp("smollm2"), "k").folder


@pytest.mark.slow
def test_smollm2_base_is_dense_real_weights_with_its_chat_template(smollm2_base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(smollm2_base))
    assert len(tokenizer) == 49152 and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_base, dtype=torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris", "real weights, not random ones"


@pytest.mark.slow
def test_smollm2_test_nll_falls_with_training(smollm2_base: Path, tmp_path: Path) -> None:
    from jpslm_assets.resources import trainer_loop
    from jpslm_assets.resources.models import load_for_scoring
    from jpslm_assets.training.chat_format import encode_pairs
    from jpslm_assets.training.nll import answer_token_nll
    from jpslm_assets_tests.test_training_support import eval_questions_frame
    from jpslm_assets_tests.training_specs import training_spec

    pool = qa_pairs(32, seed=3)
    records = list(zip(pool["qa_id"], pool["question"], pool["answer"], strict=True))
    overrides = {
        "max_steps": 6,
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 128,
    }
    spec = training_spec("smollm2-135m", smollm2_base, tmp_path, records, 1, overrides)
    result = trainer_loop.run_training(spec, lambda message: None)
    tests = eval_questions_frame(12)
    scorer = load_for_scoring(str(smollm2_base), Path(result.adapter_path), result.backend)
    triples = list(zip(tests["question_id"], tests["question"], tests["reference_answer"], strict=True))[:12]
    examples = encode_pairs(scorer.tokenizer, triples, "<|im_end|>", 512)
    adapted = answer_token_nll(scorer.model, examples, scorer.pad_id, batch_size=4)
    with scorer.model.disable_adapter():
        base = answer_token_nll(scorer.model, examples, scorer.pad_id, batch_size=4)
    assert adapted.answer_tokens == base.answer_tokens > 0
    assert adapted.nll < base.nll - 0.05, f"NLL {adapted.nll:.3f} should fall below the base's {base.nll:.3f}"
