"""Unit tests of the training stage's plain functions: encoding, NLL, scale curve, plans, facts, plots."""

import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from jpslm_assets.catalogue import UnknownModelError
from jpslm_assets.resources import trainer as trainer_lib
from jpslm_assets.resources import trainer_loading, trainer_loop, trainer_spec
from jpslm_assets.resources.models import ModelFactory, ModelUnavailableError
from jpslm_assets.settings import load_profile
from jpslm_assets.training import chat_format, nll, scaling
from jpslm_assets.training.model_facts import ConfigFactError, architecture_facts, attention_kind
from jpslm_assets.training.plan import PlanError, resolve_plan
from jpslm_assets.training.plots import japanese_font_path, plot_loss_curves, plot_scale_curve
from jpslm_assets.training.tokenizer_training import (
    RESERVED_PIECES,
    TokenizerTrainingError,
    render_conversations,
    train_sentencepiece,
)
from jpslm_assets_tests.test_training_support import qa_pairs


class CharTokenizer:
    """One token per character, ChatML-like template: enough to pin the masking arithmetic."""

    def apply_chat_template(
        self, conversation: Any, add_generation_prompt: bool = False, tokenize: bool = False
    ):
        text = "".join(f"<{m['role']}>{m['content']}|" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


# ------------------------------------------------------------------------------------------ encoding


def test_prompt_is_masked_and_is_an_exact_prefix() -> None:
    tokenizer = CharTokenizer()
    example = chat_format.encode_pair(
        tokenizer, "堤防とは", "河川の盛土", "$", max_length=100, record_id="QA-1"
    )
    prompt = [ord(c) for c in "<user>堤防とは|<assistant>"]
    answer = [ord(c) for c in "河川の盛土$"]
    assert example.input_ids == prompt + answer
    assert example.labels == [chat_format.IGNORE_INDEX] * len(prompt) + answer
    assert (example.prompt_tokens, example.answer_tokens) == (len(prompt), len(answer))


def test_long_answers_keep_their_start_and_long_prompts_are_refused() -> None:
    tokenizer = CharTokenizer()
    example = chat_format.encode_pair(tokenizer, "q", "abcdefghij", "$", max_length=24)
    assert len(example.input_ids) == 24 and example.answer_tokens == 24 - len("<user>q|<assistant>")
    assert example.input_ids[-5:] == [ord(c) for c in "abcde"]
    with pytest.raises(chat_format.EncodingError, match=r"record QA-9.*max_seq_length=8"):
        chat_format.encode_pair(tokenizer, "a long question", "x", "$", max_length=8, record_id="QA-9")
    with pytest.raises(chat_format.EncodingError, match="QA-3: the answer is empty"):
        chat_format.encode_pair(CharTokenizer(), "q", "", "", max_length=64, record_id="QA-3")


def test_training_encoding_leaves_out_prompts_that_fill_the_budget() -> None:
    records = [
        ("QA-1", "q", "answer"),
        ("QA-2", "a very long question indeed", "answer"),
        ("QA-3", "q2", "ok"),
    ]
    examples, skipped = chat_format.encode_training_pairs(CharTokenizer(), records, "$", max_length=26)
    assert [e.record_id for e in examples] == ["QA-1", "QA-3"] and skipped == ["QA-2"]
    with pytest.raises(chat_format.PromptTooLongError, match="QA-2"):
        chat_format.encode_pairs(CharTokenizer(), records, "$", max_length=26)


def test_unknown_chat_template_names_the_folder() -> None:
    assert "<|im_start|>" in chat_format.chat_template_text("chatml")
    with pytest.raises(ValueError, match="chat_templates"):
        chat_format.chat_template_text("nonexistent")


# ----------------------------------------------------------------------------------------------- NLL


def test_token_losses_count_answer_positions_only() -> None:
    import torch

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    sums, counts = nll.token_losses(logits, labels)
    log_probs = torch.log_softmax(logits, dim=-1)
    expected_first = -(log_probs[0, 1, 3] + log_probs[0, 2, 4] + log_probs[0, 3, 5])
    expected_second = -(log_probs[1, 0, 1] + log_probs[1, 1, 2])
    assert counts.tolist() == [3, 2]
    assert torch.allclose(sums, torch.stack([expected_first, expected_second]), atol=1e-5)


def test_summary_is_token_weighted_and_rejects_divergence() -> None:
    result = nll.summarize([3.0, 1.0], [3, 1])
    assert result.nll == pytest.approx(1.0) and result.ppl == pytest.approx(math.e)
    assert result.per_question_nll == [1.0, 1.0] and result.answer_tokens == 4
    with pytest.raises(ValueError, match="not finite"):
        nll.summarize([float("nan")], [2])
    with pytest.raises(ValueError, match="no answer tokens"):
        nll.summarize([0.0], [0])


def test_answer_token_nll_of_a_uniform_model_is_log_vocab() -> None:
    import torch

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids: Any, attention_mask: Any = None) -> Any:
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 11)})()

    examples = [
        chat_format.EncodedExample("a", [1, 2, 3, 4], [-100, -100, 3, 4]),
        chat_format.EncodedExample("b", [1, 2], [-100, 2]),
    ]
    result = nll.answer_token_nll(Uniform(), examples, pad_id=0, batch_size=1)
    assert result.nll == pytest.approx(math.log(11)) and result.answer_tokens == 3 and result.questions == 2


# ------------------------------------------------------------------------------------- scale curve


def paper_table2() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": ["swallow-8b"] * 5,
            "n": [1000, 2000, 3000, 4000, 5000],
            "train_loss_final": [0.8687, 0.8413, 0.7894, 0.7800, 0.7666],
            "test_nll": [1.3421, 1.2758, 1.2150, 1.1272, 1.3190],
        }
    )


def test_scale_curve_reproduces_the_papers_table2() -> None:
    curve = scaling.scale_curve(paper_table2().sample(fraction=1.0, shuffle=True, seed=3))
    assert curve["n"].to_list() == [1000, 2000, 3000, 4000, 5000]
    assert curve["paper_status"].to_list() == ["underfit", "improving", "improving", "optimal", "overfitting"]
    assert curve["status"].to_list() == ["underfit", "underfit", "underfit", "optimal", "overfitting"]
    assert curve["is_optimal"].to_list() == [False, False, False, True, False]
    assert curve["test_ppl"].round(2).to_list() == [3.83, 3.58, 3.37, 3.09, 3.74]
    assert curve.filter(pl.col("n") == 5000)["delta_nll"][0] == pytest.approx(0.1918, abs=1e-4)
    assert curve.filter(pl.col("n") == 3000)["nll_above_optimum"][0] == pytest.approx(0.0878, abs=1e-4)
    assert scaling.optimal_n(curve) == 4000
    assert tuple(curve.columns) == scaling.SCALE_CURVE_COLUMNS


def synthetic_questions(means: dict[int, float], spread: float, questions: int = 40) -> pl.DataFrame:
    """Per-question NLLs around each n's mean: a question effect shared by every n (some questions are hard
    for all sizes), plus independent noise of size ``spread`` per (n, question)."""
    rng = np.random.default_rng(11)
    difficulty = rng.normal(0.0, 0.4, questions)
    rows = [
        (n, f"q{i:03d}", mean + difficulty[i] + rng.normal(0.0, spread), int(rng.integers(10, 40)))
        for n, mean in means.items()
        for i in range(questions)
    ]
    return pl.DataFrame(rows, schema=["n", "question_id", "nll", "answer_tokens"], orient="row")


def curve_from(questions: pl.DataFrame, per_question: pl.DataFrame | None = None) -> pl.DataFrame:
    points = (
        questions.group_by("n")
        .agg(
            ((pl.col("nll") * pl.col("answer_tokens")).sum() / pl.col("answer_tokens").sum()).alias(
                "test_nll"
            )
        )
        .with_columns(pl.lit("m").alias("model"), pl.lit(1.0).alias("train_loss_final"))
    )
    chosen = questions if per_question is None else per_question
    return scaling.scale_curve(points, chosen, resamples=2000, seed=5)


def test_a_clear_gap_is_underfit_or_overfitting_and_a_noise_sized_gap_is_indistinguishable() -> None:
    # The paper's gaps (0.09 below n*, 0.19 above) measured with little per-question noise: both sides
    # are really worse than n*, and the intervals exclude zero.
    clear = curve_from(synthetic_questions({1000: 1.34, 3000: 1.215, 4000: 1.127, 5000: 1.319}, spread=0.02))
    assert clear["status"].to_list() == ["underfit", "underfit", "optimal", "overfitting"]
    assert (clear.filter(~pl.col("is_optimal"))["diff_ci_low"] > 0).all()
    # The demo's kind of gap (0.018) under per-question noise ten times larger: the lowest mean still
    # names n*, but its neighbours cannot be told from it.
    noisy = curve_from(synthetic_questions({1000: 1.30, 2000: 1.118, 3000: 1.1, 4000: 1.12}, spread=0.2))
    assert noisy.filter(pl.col("is_optimal"))["n"].to_list() == [3000]
    statuses = dict(zip(noisy["n"], noisy["status"], strict=True))
    assert statuses == {
        1000: "underfit",
        2000: "indistinguishable from optimal",
        3000: "optimal",
        4000: "indistinguishable from optimal",
    }
    row = noisy.filter(pl.col("n") == 2000).row(0, named=True)
    assert row["diff_ci_low"] < 0 < row["diff_ci_high"] and row["paired_questions"] == 40
    assert row["diff_ci_low"] <= row["nll_above_optimum"] <= row["diff_ci_high"]
    # Same seed, same intervals: the table does not change between materializations.
    again = curve_from(synthetic_questions({1000: 1.30, 2000: 1.118, 3000: 1.1, 4000: 1.12}, spread=0.2))
    assert again.equals(noisy)


def test_per_question_nlls_pair_by_question_and_bad_values_are_named() -> None:
    questions = synthetic_questions({1000: 1.3, 2000: 1.1}, spread=0.05)
    # n=1000 scored on a subset of the questions: only the shared ones are paired.
    partial = questions.filter((pl.col("n") == 2000) | (pl.col("question_id") < "q020"))
    curve = curve_from(partial)
    assert curve.filter(pl.col("n") == 1000)["paired_questions"][0] == 20
    broken = questions.with_columns(
        pl.when((pl.col("n") == 1000) & (pl.col("question_id") == "q007")).then(float("nan")).otherwise("nll")
        .alias("nll")
    )  # fmt: skip
    with pytest.raises(
        scaling.ScaleCurveError, match=r"model m, n=1000, question q007: per-question NLL is nan"
    ):
        curve_from(questions, broken)


def test_scale_curve_ties_prefer_the_smaller_n_and_bad_points_are_named() -> None:
    tied = paper_table2().with_columns(
        pl.when(pl.col("n") == 2000).then(1.1272).otherwise("test_nll").alias("test_nll")
    )
    assert scaling.optimal_n(scaling.scale_curve(tied)) == 2000
    with pytest.raises(scaling.ScaleCurveError, match=r"n=3000: test NLL is nan"):
        scaling.scale_curve(
            paper_table2().with_columns(
                pl.when(pl.col("n") == 3000).then(float("nan")).otherwise("test_nll").alias("test_nll")
            )
        )
    with pytest.raises(scaling.ScaleCurveError, match=r"more than one row for n=\[1000\]"):
        scaling.scale_curve(pl.concat([paper_table2(), paper_table2().head(1)]))
    with pytest.raises(scaling.ScaleCurveError, match="materialize stage1_lora_adapter and stage1_test_nll"):
        scaling.scale_curve(paper_table2().head(0))


def test_n_outside_the_grid_is_refused_with_the_fix() -> None:
    assert scaling.check_n_in_grid(120, [60, 120, 180]) == 120
    with pytest.raises(
        scaling.ScaleCurveError, match=r"n=250 is not in the profile's n_grid \[60, 120, 180\]"
    ):
        scaling.check_n_in_grid(250, [60, 120, 180])


# ----------------------------------------------------------------------------------------- plans


def test_plan_defaults_follow_the_paper_per_stage() -> None:
    train = load_profile("paper").train
    stage1, stage2 = resolve_plan(train, 1), resolve_plan(train, 2)
    assert (stage1.r, stage1.alpha, stage1.dropout) == (16, 16, 0.0)
    assert (stage2.r, stage2.alpha, stage2.dropout) == (32, 16, 0.05)
    for plan in (stage1, stage2):
        assert plan.learning_rate == 2e-4 and plan.lr_scheduler == "cosine" and plan.warmup_ratio == 0.1
        assert plan.epochs == 3 and plan.effective_batch_size == 8
        assert set(plan.target_modules) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    assert stage1.fingerprint() != stage2.fingerprint()


def test_plan_overrides_apply_and_bad_ones_are_named() -> None:
    train = load_profile("demo").train
    plan = resolve_plan(train, 1, {"r": 8, "learning_rate": 1e-4, "max_steps": None})
    assert (plan.r, plan.learning_rate, plan.max_steps) == (8, 1e-4, None)
    with pytest.raises(PlanError, match="unknown training setting 'rank'"):
        resolve_plan(train, 1, {"rank": 8})
    with pytest.raises(PlanError, match="dropout"):
        resolve_plan(train, 2, {"dropout": 1.5})
    with pytest.raises(PlanError, match="stage must be 1"):
        resolve_plan(train, 3)


# ----------------------------------------------------------------------------------- model facts


def test_attention_kind_comes_from_head_counts() -> None:
    assert (attention_kind(32, 32), attention_kind(32, 8), attention_kind(32, 1)) == ("MHA", "GQA", "MQA")
    with pytest.raises(ConfigFactError, match="cannot share"):
        attention_kind(9, 2)


def test_llama3_configs_contradict_the_papers_mha_label() -> None:
    llama3 = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    facts = architecture_facts("swallow-8b", llama3, 8_030_261_248, "MHA")
    assert (facts["attention_kind"], facts["gqa_ratio"], facts["matches_paper_label"]) == ("GQA", 4.0, False)
    assert facts["head_dim"] == 128
    qwen = {**llama3, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584}
    assert architecture_facts("qwen2.5-7b", qwen, 1, "GQA")["gqa_ratio"] == 7.0
    with pytest.raises(ConfigFactError, match="model broken"):
        architecture_facts("broken", {"hidden_size": 8}, 1, None)


def test_unknown_model_key_lists_the_catalogue() -> None:
    with pytest.raises(
        UnknownModelError, match=r"model 'mystery-7b' is not in the catalogue; known models: .*tiny-llama"
    ):
        ModelFactory().config("mystery-7b")


def test_hub_model_offline_names_the_model_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as caught:
        ModelFactory().config("swallow-8b")
    message = str(caught.value)
    for expected in (
        "swallow-8b",
        "tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1",
        "HF_HUB_OFFLINE",
        "HF_TOKEN",
    ):
        assert expected in message


# ------------------------------------------------------------------------------------ tokenizer


def test_sentencepiece_training_covers_unseen_text_by_bytes() -> None:
    import sentencepiece as spm

    pool = qa_pairs(80)
    texts = render_conversations(
        zip(pool["question"], pool["answer"], strict=True), chat_format.chat_template_text("chatml")
    )
    model = train_sentencepiece(texts, 1024)
    processor = spm.SentencePieceProcessor(model_proto=model)
    assert [processor.id_to_piece(i) for i in range(len(RESERVED_PIECES))] == list(RESERVED_PIECES)
    unseen = "未知の漢字「鬱」と絵文字🙂"
    ids = processor.encode(unseen)
    assert processor.unk_id() not in ids and processor.decode(ids) == unseen
    assert processor.encode("<|im_start|>user\n", out_type=str) == ["<|im_start|>", "user", "\n"]
    assert train_sentencepiece(texts, 1024) == model  # deterministic
    with pytest.raises(TokenizerTrainingError, match="vocab_size=100 is too small"):
        train_sentencepiece(texts, 100)
    with pytest.raises(TokenizerTrainingError, match="materialize rebalanced_pool"):
        train_sentencepiece(["  "], 1024)


# ------------------------------------------------------------------------------------- trainer bits


def test_backend_choice_without_cuda() -> None:
    assert trainer_loading.select_backend("auto") == "cpu_lora"
    assert trainer_loading.select_backend("cpu_lora") == "cpu_lora"
    for gpu_only in ("bnb_qlora", "unsloth"):
        with pytest.raises(trainer_spec.BackendUnavailableError, match="needs a CUDA GPU"):
            trainer_loading.select_backend(gpu_only)
    assert trainer_lib.LoraTrainer().launcher_for("cpu_lora") == ("in_process", 1)


def test_auto_on_cuda_picks_the_backend_measured_faster_for_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped measurements: unsloth was faster capped at 16 GiB (the paper's card), the bitsandbytes path
    # on the whole 80 GiB card; a run between the rows takes the next larger one.
    expected = {12.0: "unsloth", 16.0: "unsloth", 24.0: "bnb_qlora", 80.0: "bnb_qlora", 141.0: "bnb_qlora"}
    for memory, faster in expected.items():
        backend, why = trainer_loading.measured_faster(memory)
        assert backend == faster and "unsloth" in why and "bnb_qlora" in why and "real tokens/s" in why, why
    table = """
measured:
  - {memory_gib: 16, device: small card, bnb_qlora: 1000, unsloth: 1500}
  - {memory_gib: 80, device: large card, bnb_qlora: 9000, unsloth: 5000}
"""
    assert trainer_loading.measured_faster(12, table)[0] == "unsloth"
    assert trainer_loading.measured_faster(16, table)[0] == "unsloth"
    assert trainer_loading.measured_faster(40, table)[0] == "bnb_qlora"
    assert trainer_loading.measured_faster(141, table) == ("bnb_qlora", trainer_loading.measured_faster(80, table)[1])

    # select_backend on a (pretend) CUDA machine with both installed follows the measurements for the run's
    # memory: the budget when one is set, else the GPU's memory.
    monkeypatch.setattr(trainer_loading, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(trainer_loading, "first_gpu_gib", lambda: 80.0)
    monkeypatch.setattr(trainer_loading.importlib.util, "find_spec", lambda name: object())
    chosen: list[float] = []

    def fake(memory_gib: float, table: str | None = None) -> tuple[str, str]:
        chosen.append(memory_gib)
        return ("unsloth" if memory_gib <= 16 else "bnb_qlora"), "test"

    monkeypatch.setattr(trainer_loading, "measured_faster", fake)
    assert trainer_loading.select_backend("auto", 16.0) == "unsloth"
    assert trainer_loading.select_backend("auto") == "bnb_qlora"
    assert trainer_lib.LoraTrainer(memory_budget_gib=16.0).resolved_backend() == "unsloth"
    assert chosen == [16.0, 80.0, 16.0]


def test_resume_skips_a_checkpoint_cut_short(tmp_path: Path) -> None:
    def checkpoint(step: int, state: str | None) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        (folder / "optimizer.pt").write_bytes(b"x")
        if state is not None:
            (folder / "trainer_state.json").write_text(state)

    assert trainer_loop.resumable_checkpoint(tmp_path) is None
    checkpoint(5, json.dumps({"global_step": 5}))
    checkpoint(10, '{"global_st')  # killed while writing the state
    checkpoint(15, None)  # killed before the state
    (tmp_path / "checkpoint-x").mkdir()
    assert trainer_loop.resumable_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_training_records_round_trip_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    trainer_spec.write_training_records(path, [("QA-1", "問", "答\n改行")])
    assert trainer_spec.read_training_records(path) == [("QA-1", "問", "答\n改行")]
    path.write_text('{"qa_id": "QA-1", "question": "q"}\n', encoding="utf-8")
    with pytest.raises(
        trainer_spec.TrainingError, match=r"train.jsonl:1: not a qa_id/question/answer record"
    ):
        trainer_spec.read_training_records(path)


# ---------------------------------------------------------------------------------------------- plots


def test_plots_render_pngs_with_the_bundled_japanese_font() -> None:
    assert japanese_font_path().name == "ipaexg.ttf"
    curve = scaling.scale_curve(paper_table2())
    losses = pl.DataFrame(
        {"model": ["m"] * 4, "n": [1, 1, 2, 2], "step": [1, 2, 1, 2], "loss": [2.0, 1.5, 2.1, 1.2]}
    )
    for png in (plot_scale_curve(curve, "n とテストNLL"), plot_loss_curves(losses, "学習損失")):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size[0] > 300


def test_cpu_threads_leave_busy_cores_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from jpslm_assets.resources import cpu as models

    monkeypatch.setattr(models.os, "cpu_count", lambda: 2)
    # Without a measurement of the other processes (not Linux), the load average decides.
    monkeypatch.setattr(models, "cores_busy_elsewhere", lambda: None)
    for load, expected in ((0.2, 2), (0.9, 1), (7.5, 1)):
        monkeypatch.setattr(models.os, "getloadavg", lambda load=load: (load, load, load))
        assert models.cpu_thread_count() == expected
    assert models.cpu_thread_count(3) == 3
    # A load average raised by this process's own last step does not cost a core when nothing else runs;
    # another process's work does.
    monkeypatch.setattr(models.os, "getloadavg", lambda: (1.1, 0.8, 0.5))
    for elsewhere, expected in ((0.05, 2), (0.9, 1), (1.8, 1)):
        monkeypatch.setattr(models, "cores_busy_elsewhere", lambda elsewhere=elsewhere: elsewhere)
        assert models.cpu_thread_count() == expected


def test_cores_busy_elsewhere_sees_another_busy_process() -> None:
    import multiprocessing
    import platform

    from jpslm_assets.resources import cpu as models

    if platform.system() != "Linux":
        assert models.cores_busy_elsewhere(0.05) is None
        return
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(3.0,))
    spinner.start()
    try:
        time.sleep(0.5)
        busy = models.cores_busy_elsewhere(0.5)
    finally:
        spinner.join()
    assert busy is not None and busy >= 0.6  # one process spinning on a core


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
