"""Small real models for the export and generation tests, built in seconds on a CPU.

- ``build_sentencepiece_base``: a random-init Llama (or Qwen2) decoder, hidden 256 so K-quants apply, with a
  SentencePiece tokenizer trained here on a short Japanese corpus, ``tokenizer.model`` in the folder and a
  ChatML template whose markers are special tokens.
- ``build_byte_bpe_base``: the same decoder with a byte-level BPE ``tokenizer.json`` trained here; llama.cpp's
  converter does not know its pre-tokenizer and refuses it, like the paper's Tanuki tokenizer.
- ``build_lora_adapter``: a PEFT LoRA adapter with non-zero weights, so merging really changes the model.
- ``fixture_test_set``: a few test questions with the ``qa.test_set`` columns.
- ``upstream_assets``: stand-ins for ``stage2_lora_adapter``, ``stage1_lora_adapter``, ``optimal_scale`` and
  ``test_set`` that write fixture rows through the project's IO manager; ``prepare_upstream`` materializes them.
"""


import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.artifacts import artifact_record
from jpslm_assets.export import assets as export
from jpslm_assets.export.assets_gguf import gguf_f16, gguf_q4_k_m
from jpslm_assets.export.assets_serving import answers_f16, answers_nf4, answers_q4_k_m, deployment
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.partitions import STAGE1_SUFFIX, model_partitions, n_partitions
from jpslm_assets.store import DuckDBStore

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The same layout without the generation prompt: the model would continue the user's turn.
CHATML_WITHOUT_GENERATION_PROMPT = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
)
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")

CORPUS = [
    "堤防の点検は出水期の前と後に行い、亀裂や漏水の有無を記録する。",
    "砂防堰堤は土石流を捕捉し、下流の集落と道路を守るための構造物である。",
    "ダムの設計では基礎地盤の調査結果から許容支持力と透水性を確認する。",
    "河川の維持管理計画には巡視、点検、評価、対策の手順を定める。",
    "地すべり防止施設の効果は地下水位と移動量の観測で確かめる。",
    "計画高水流量は流域の降雨と流出の解析から定める。",
    "護岸の損傷は洗掘や背面の空洞化が原因となることが多い。",
    "緊急時には水位観測所の情報をもとに避難判断の基準を確認する。",
    "調査編では測量、水文観測、地質調査の方法を扱う。",
    "設計編では構造物の安全性と耐久性の照査方法を示す。",
    "Sabo dams trap debris flows; levees are inspected before the flood season.",
    "Volume 2, chapter 3, section 4: inspection intervals of 1 year or 5 years.",
]


def train_sentencepiece(folder: Path, vocab_size: int) -> bytes:
    import io

    import sentencepiece as spm

    lines = [*CORPUS, *(f"<|im_start|>user\n{line}<|im_end|>\n<|im_start|>assistant\n" for line in CORPUS)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=False, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=list(SPECIALS[4:]), num_threads=1, minloglevel=2,
    )  # fmt: skip
    return buffer.getvalue()


def _added_tokens() -> dict[str, Any]:
    return {
        str(index): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
        for index, piece in enumerate(SPECIALS)
    }  # fmt: skip


def _tiny_config(architecture: str, vocab_size: int) -> Any:
    import transformers

    config_class = getattr(transformers, architecture).config_class
    return config_class(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, vocab_size=vocab_size, bos_token_id=1, eos_token_id=5, pad_token_id=3,
        tie_word_embeddings=False,
    )  # fmt: skip


def _save_random_model(folder: Path, architecture: str, vocab_size: int, seed: int) -> None:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = _tiny_config(architecture, vocab_size)
    model = getattr(transformers, architecture)(config)
    model.generation_config.eos_token_id = 5
    model.generation_config.pad_token_id = 3
    model.save_pretrained(folder)


def build_sentencepiece_base(
    folder: Path, architecture: str = "LlamaForCausalLM", chat_template: str = CHATML, seed: int = 0
) -> Path:
    """A tiny base model folder with a SentencePiece tokenizer (see the module docstring)."""
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model_bytes = train_sentencepiece(folder, vocab_size=1024)
    config = {
        "tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": _added_tokens(), "bos_token": "<s>",
        "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False,
        "add_eos_token": False, "add_prefix_space": False, "legacy": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1024, "chat_template": chat_template,
    }  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model_bytes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), "utf-8")
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 drops these on save; a prepared base folder has them (as the training stage writes it).
    (folder / "tokenizer.model").write_bytes(model_bytes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), "utf-8")
    _save_random_model(folder, architecture, 1024, seed)
    return folder


def build_byte_bpe_base(folder: Path, seed: int = 0) -> Path:
    """A tiny Qwen2 with a locally trained byte-level BPE: llama.cpp's converter refuses its pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    _save_random_model(folder, "Qwen2ForCausalLM", 1024, seed)
    return folder


def build_lora_adapter(base: Path, folder: Path, seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], init_lora_weights=False,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # small random updates: the merged model must differ from the base, not explode
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(0.1)
    peft_model.save_pretrained(folder)
    return folder


def train_run_row(model: str, n: int, base: Path, adapter: Path) -> dict[str, Any]:
    """A ``train.runs`` row as the training stage writes it (the columns export reads, plus a few more)."""
    return {
        "model": model, "n": n, "stage": "stage2", "backend": "cpu_lora", "r": 8, "alpha": 16, "dropout": 0.0,
        "steps": 1, "train_loss_final": 1.0, "train_loss_avg": 1.0, "minutes": 0.01, "tokens_per_s": 1.0,
        "base_model_ref": str(base), **artifact_record(adapter),
    }  # fmt: skip


def fixture_test_set() -> pl.DataFrame:
    rows = [
        ("T001", "Maintenance-River", "堤防の点検はいつ行うか。", "出水期の前と後に行い、亀裂と漏水を記録する。", True),
        ("T002", "Design", "砂防堰堤の役割は何か。", "土石流を捕捉し、下流の集落を守る。", True),
        ("T003", "Survey", "ダムの基礎地盤では何を確認するか。", "許容支持力と透水性を確認する。", True),
        ("T004", "Planning", "計画高水流量はどう定めるか。", "流域の降雨と流出の解析から定める。", True),
        ("T005", "Hazard", "地すべり防止施設の効果はどう確かめるか。", "地下水位と移動量を観測する。", True),
        ("T006", "Comparative", "What is inspected before the flood season?", "Levees, for cracks and leaks.", True),
        ("T007", "Design", "護岸の損傷の原因は何か。", "洗掘や背面の空洞化である。", False),
    ]
    return pl.DataFrame(
        {
            "question_id": [r[0] for r in rows],
            "category": [r[1] for r in rows],
            "question": [r[2] for r in rows],
            "reference_answer": [r[3] for r in rows],
            "node_ids": [["N-001"] for _ in rows],
            "citation": ["河川砂防技術基準 維持管理編" for _ in rows],
            "human_written": [r[4] for r in rows],
        }
    )


def upstream_assets(runs: Mapping[str, dict[str, Any]], test_set: pl.DataFrame) -> list[dg.AssetsDefinition]:
    """Stand-ins for the training and dataset stages: they write the fixture rows through the IO manager.

    ``runs`` maps stage-3 partition keys to training-run rows: a model's key to its stage-2 run, and
    ``<model>@stage1`` to the stage-1 run whose n is the fixture's n*.
    """
    stage1 = next((row for key, row in runs.items() if key.endswith(STAGE1_SUFFIX)), None)

    @dg.asset(
        name="stage2_lora_adapter",
        partitions_def=model_partitions(),
        metadata=table_metadata("train.stage2_runs", partition_expr="model"),
    )
    def stage2_lora_adapter(context: dg.AssetExecutionContext) -> pl.DataFrame:
        return pl.DataFrame([{**runs[context.partition_key], "stage": 2}])

    @dg.asset(
        name="stage1_lora_adapter",
        partitions_def=n_partitions(),
        metadata=table_metadata("train.stage1_runs", partition_expr="n"),
    )
    def stage1_lora_adapter(context: dg.AssetExecutionContext) -> pl.DataFrame:
        if stage1 is None or str(stage1["n"]) != context.partition_key:
            raise dg.Failure(f"the fixture has no stage-1 run at n={context.partition_key}")
        return pl.DataFrame([{**stage1, "stage": 1}])

    @dg.asset(name="optimal_scale", metadata=table_metadata("eval.optimal_scale"))
    def optimal_scale() -> pl.DataFrame:
        chosen = stage1 or next(iter(runs.values()))
        return pl.DataFrame({"model": [chosen["model"]], "n": [chosen["n"]]})

    @dg.asset(name="test_set", metadata=table_metadata("qa.test_set"))
    def test_set_asset() -> pl.DataFrame:
        return test_set

    return [stage2_lora_adapter, stage1_lora_adapter, optimal_scale, test_set_asset]


def prepare_upstream(
    assets: list[dg.AssetsDefinition], resources: dict[str, Any], runs: Mapping[str, dict[str, Any]]
) -> None:
    """Materialize the stand-ins: test set, n*, every stage-2 run and the stage-1 run at n*."""
    assert materialize(assets, ["test_set", "optimal_scale"], resources).success
    for key, row in runs.items():
        if key.endswith(STAGE1_SUFFIX):
            assert materialize(assets, ["stage1_lora_adapter"], resources, partition_key=str(row["n"])).success
        else:
            assert materialize(assets, ["stage2_lora_adapter"], resources, partition_key=key).success


EXPORT_ASSETS = [
    export.merged_model, gguf_f16, gguf_q4_k_m, deployment, answers_f16, answers_q4_k_m, answers_nf4,
]  # fmt: skip


def export_resources(store: DuckDBStore, converter_cache: Path, generation: Any = None, **tools: Any) -> dict:
    from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
    from jpslm_assets.resources.llama_cpp_tools import LlamaCppTools

    return {
        "store": store,
        "io_manager": DuckDBTableIOManager(store=store),
        "generation": generation or LlamaCppBackend(n_ctx=1024),
        "llama_cpp_tools": LlamaCppTools(cache_dir=str(converter_cache), **tools),
    }


def materialize(
    assets: list[dg.AssetsDefinition],
    selection: list[str],
    resources: dict[str, Any],
    partition_key: str | None = None,
    raise_on_error: bool = True,
    run_config: dict[str, Any] | None = None,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        instance=instance,
        selection=selection,
        partition_key=partition_key,
        resources=resources,
        raise_on_error=raise_on_error,
        run_config=run_config,
    )


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
