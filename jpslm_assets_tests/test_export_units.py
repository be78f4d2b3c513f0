"""Plain functions of the export stage: Modelfiles from chat templates, fidelity math, question selection,
the converter's sdist handling and failure classification, atomic file moves. Seconds, no models."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from jpslm_assets.export.answering import AnsweringInputError, select_eval_questions, served_name
from jpslm_assets.export.fidelity import (
    ScoringSequence,
    SequenceNll,
    answer_token_nll,
    compare_tokenizations,
    mean_nll,
    relative_difference,
)
from jpslm_assets.export.modelfile import (
    ChatTemplateError,
    build_modelfile,
    chat_turns,
    ollama_template,
    render_chat_template,
    without_bos,
)
from jpslm_assets.resources.llama_cpp_tools import (
    LlamaCppToolError,
    _unpack_converter,
    check_gguf_file,
    classify_conversion_failure,
    remove_stale_partials,
    replace_atomically,
)
from jpslm_assets.resources.model_merge import _metaspace_schemes, restore_tokenizer_files
from jpslm_assets_tests.export_fixtures import CHATML, CHATML_WITHOUT_GENERATION_PROMPT, fixture_test_set
from jpslm_assets_tests.fake_ollama import parse_go_template, render_go_template

# Llama 3's layout (BOS written by the template itself), Qwen 2.5-like ChatML with a default system prompt,
# and a template that rejects the system role.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] "
    "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}<start_of_turn>{{ message['role'] }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "堤防の点検は？"}],
    [{"role": "system", "content": "専門家として答える。"}, {"role": "user", "content": "砂防堰堤とは？"}],
    [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2 with\nnew line"},
    ],
]


# ------------------------------------------------------------------------------------------- Modelfile


@pytest.mark.parametrize("template", [CHATML, LLAMA3, CHATML_DEFAULT_SYSTEM, NO_SYSTEM])
def test_turn_pieces_reproduce_the_jinja_rendering(template: str) -> None:
    turns = chat_turns(template, bos_token="<|begin_of_text|>")
    for conversation in CONVERSATIONS:
        if turns.system_prefix is None and conversation[0]["role"] == "system":
            continue
        for generation in (True, False):
            expected = render_chat_template(template, conversation, generation, bos_token="<|begin_of_text|>")
            assert turns.render(conversation, generation) == expected


@pytest.mark.parametrize("template", [CHATML, LLAMA3, CHATML_DEFAULT_SYSTEM, NO_SYSTEM])
def test_the_ollama_go_template_renders_like_the_jinja_template(template: str) -> None:
    turns = chat_turns(template, bos_token="<|begin_of_text|>")
    nodes = parse_go_template(ollama_template(turns))
    for conversation in CONVERSATIONS:
        if turns.system_prefix is None and conversation[0]["role"] == "system":
            continue
        system = "\n".join(m["content"] for m in conversation if m["role"] == "system")
        scope = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in conversation]}
        expected = render_chat_template(template, conversation, True, bos_token="<|begin_of_text|>")
        assert render_go_template(nodes, scope) == expected


def test_llama3_modelfile_strips_the_bos_the_server_adds() -> None:
    spec = build_modelfile(
        LLAMA3, "m.gguf", model="swallow-8b", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        server_adds_bos=True, catalogue_stops=["<|eot_id|>"], seed=42, temperature=0.0, num_ctx=4096,
        num_predict=1024,
    )  # fmt: skip
    text = spec.render()
    assert "<|begin_of_text|>" not in text  # llama.cpp / Ollama prepend BOS; the template must not repeat it
    assert text.startswith("FROM ./m.gguf\n")
    assert 'PARAMETER stop "<|eot_id|>"' in text and text.count("PARAMETER stop") == 1
    assert "PARAMETER seed 42\nPARAMETER temperature 0\nPARAMETER num_ctx 4096\nPARAMETER num_predict 1024" in text
    assert spec.parameters() == {"stop": ["<|eot_id|>"], "seed": 42, "temperature": 0.0, "num_ctx": 4096,
                                 "num_predict": 1024}  # fmt: skip
    kept = build_modelfile(
        LLAMA3, "m.gguf", model="x", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", server_adds_bos=False,
        catalogue_stops=[], seed=1, temperature=0.7, num_ctx=8, num_predict=8,
    )  # fmt: skip
    assert "<|begin_of_text|>" in kept.template  # a server that adds no BOS needs the template's


def test_stop_tokens_come_from_catalogue_template_and_eos() -> None:
    spec = build_modelfile(
        CHATML, "m.gguf", model="x", bos_token="<s>", eos_token="</s>", server_adds_bos=True,
        catalogue_stops=["<|im_end|>"], seed=42, temperature=0.0, num_ctx=1024, num_predict=96,
    )  # fmt: skip
    assert spec.stop == ("<|im_end|>", "</s>")


def test_a_template_without_generation_prompt_is_refused_with_the_fix() -> None:
    with pytest.raises(ChatTemplateError, match=r"tiny-llama has no generation prompt.*add_generation_prompt"):
        chat_turns(CHATML_WITHOUT_GENERATION_PROMPT, model="tiny-llama")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        build_modelfile(None, "m.gguf", model="x", bos_token="", eos_token="", server_adds_bos=False,
                        catalogue_stops=[], seed=1, temperature=0, num_ctx=8, num_predict=8)  # fmt: skip
    with pytest.raises(ChatTemplateError, match="does not render"):
        chat_turns("{% for m in messages %}{{ m['content'] }")


def test_templates_render_as_transformers_renders_them_strftime_now_included() -> None:
    """A template that stamps today's date (as Llama 3.1's does) renders here exactly as in the tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    dated = (
        "{{ bos_token }}{{ 'Today: ' + strftime_now('%Y-%m-%d') + '\\n' }}"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip
    tokenizer.chat_template = dated
    messages = [{"role": "user", "content": " 河川の点検は？ "}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    mine = render_chat_template(dated, messages, True, bos_token="<s>", eos_token="</s>")
    assert mine == expected and mine.startswith("<s>Today: 20") and mine.endswith("<|assistant|>")
    refusing = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}x"
    with pytest.raises(ChatTemplateError, match="does not render the conversation: no system role"):
        render_chat_template(refusing, [{"role": "system", "content": "s"}], False)


def test_go_delimiters_in_a_template_are_refused() -> None:
    turns = chat_turns(CHATML.replace("<|im_start|>", "{{"))
    with pytest.raises(ChatTemplateError, match="Go templates reserve"):
        ollama_template(turns)


def test_without_bos_only_touches_leading_text() -> None:
    turns = chat_turns(LLAMA3, bos_token="<s>")
    assert turns.preamble == "<s>" and without_bos(turns, "<s>").preamble == ""
    assert without_bos(turns, "").preamble == "<s>"


# -------------------------------------------------------------------------------------------- fidelity


def test_answer_token_nll_matches_torch_cross_entropy() -> None:
    import torch

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 11)).astype(np.float32)
    sequence = ScoringSequence("q", (3, 1, 4, 1, 5, 9, 2), answer_start=4)
    score = answer_token_nll(logits, sequence)
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits[3:6]), torch.tensor([5, 9, 2]), reduction="sum"
    ).item()
    assert score.answer_tokens == 3 and score.nll_sum == pytest.approx(expected, rel=1e-6)


def test_scoring_sequences_need_prompt_and_answer() -> None:
    with pytest.raises(ValueError, match="needs a non-empty prompt and a non-empty answer"):
        ScoringSequence("q9", (1, 2, 3), answer_start=3)
    with pytest.raises(ValueError, match="does not cover"):
        answer_token_nll(np.zeros((2, 5)), ScoringSequence("q", (1, 2, 3, 4), 2))


def test_mean_nll_is_token_weighted_and_relative_difference() -> None:
    assert mean_nll([SequenceNll("a", 2.0, 1), SequenceNll("b", 2.0, 3)]) == (1.0, 4)
    assert math.isnan(mean_nll([])[0])
    assert relative_difference(1.01, 1.0) == pytest.approx(0.01)
    assert math.isnan(relative_difference(float("nan"), 1.0))


def test_tokenizer_comparison_names_the_first_mismatch() -> None:
    agreement = compare_tokenizations(["q1", "q2", "q3"], [[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 7], [6]])
    assert agreement.identical == 2 and agreement.share == pytest.approx(2 / 3)
    assert agreement.first_mismatch == "q2: first difference at token 1: hf [5] vs gguf [7]"
    assert compare_tokenizations(["q"], [[1]], [[1]]).first_mismatch is None
    with pytest.raises(ValueError, match="same length"):
        compare_tokenizations(["q"], [[1]], [])


# ------------------------------------------------------------------------------------------- answering


def test_eval_questions_are_a_stratified_sample_of_the_human_written_in_id_order() -> None:
    frame = fixture_test_set()
    chosen = select_eval_questions(frame.sample(fraction=1.0, shuffle=True, seed=3), 3)
    assert chosen["human_written"].all() and chosen["category"].n_unique() == 3  # three categories of six
    assert chosen["question_id"].to_list() == sorted(chosen["question_id"].to_list())
    assert chosen.equals(select_eval_questions(frame, 3)), "input order does not change the sample"
    everything = select_eval_questions(frame, 6)
    assert everything["question_id"].to_list() == ["T001", "T002", "T003", "T004", "T005", "T006"]


def test_eval_question_errors_name_the_fix() -> None:
    frame = fixture_test_set()
    with pytest.raises(AnsweringInputError, match="has only 6 human_written questions; lower eval_questions"):
        select_eval_questions(frame, 20)
    with pytest.raises(AnsweringInputError, match=r"lacks column\(s\) \['reference_answer'\]"):
        select_eval_questions(frame.drop("reference_answer"), 2)
    blank = frame.with_columns(pl.when(pl.col("question_id") == "T002").then(pl.lit(" ")).otherwise("question").alias("question"))
    with pytest.raises(AnsweringInputError, match="T002 has an empty question"):
        select_eval_questions(blank, 2)
    twice = pl.concat([frame, frame.head(1)])
    with pytest.raises(AnsweringInputError, match="T001 appears more than once"):
        select_eval_questions(twice, 2)


def test_served_names_are_valid_ollama_names() -> None:
    assert served_name("qwen2.5-7b", 4000, "q4_k_m") == "jpslm-qwen2.5-7b-n4000:q4_k_m"
    assert served_name("Tanuki 8B/dpo", 1, "f16") == "jpslm-tanuki-8b-dpo-n1:f16"


# ------------------------------------------------------------------------------------- llama.cpp tools


def test_conversion_failures_are_classified() -> None:
    tanuki = "Traceback...\nNotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()"
    assert classify_conversion_failure(tanuki) == "unknown_tokenizer"
    assert classify_conversion_failure("ERROR:hf-to-gguf:Model MadeUpForCausalLM is not supported") == (
        "unsupported_architecture"
    )
    assert classify_conversion_failure("NotImplementedError: Architecture 'MadeUpForCausalLM' not supported!") == (
        "unsupported_architecture"
    )
    assert classify_conversion_failure("ValueError: Missing or incomplete model files: ['a.safetensors']") == (
        "missing_files"
    )
    assert classify_conversion_failure("RuntimeError: CUDA driver too old") == "converter_error"


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_only_the_converter_parts_of_the_sdist_are_unpacked(tmp_path: Path) -> None:
    sdist = _sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", {
        "llama_cpp_python-9.9.9/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('convert')",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/conversion/__init__.py": b"",
        "llama_cpp_python-9.9.9/vendor/llama.cpp/ggml/src/huge.c": b"int main(){}",
        "llama_cpp_python-9.9.9/llama_cpp/llama.py": b"",
    })  # fmt: skip
    _unpack_converter(sdist, tmp_path / "out")
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert found == ["conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    with pytest.raises(LlamaCppToolError, match="has no vendor/llama.cpp/convert_hf_to_gguf.py"):
        _unpack_converter(_sdist(tmp_path / "other.tar.gz", {"x/README": b""}), tmp_path / "out2")
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(LlamaCppToolError, match="not a readable .tar.gz sdist"):
        _unpack_converter(tmp_path / "broken.tar.gz", tmp_path / "out3")


def test_gguf_file_checks_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(LlamaCppToolError, match="does not exist; materialize the gguf asset"):
        check_gguf_file(tmp_path / "none.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGML....")
    with pytest.raises(LlamaCppToolError, match="is not a GGUF file .* corrupt or truncated"):
        check_gguf_file(tmp_path / "bad.gguf")


def test_atomic_replacement_and_stale_partials(tmp_path: Path) -> None:
    target = tmp_path / "merged"
    target.mkdir()
    (target / "old.txt").write_text("old")
    fresh = tmp_path / ".merged.partial-1234"
    fresh.mkdir()
    (fresh / "new.txt").write_text("new")
    replace_atomically(fresh, target)
    assert [p.name for p in target.iterdir()] == ["new.txt"] and not fresh.exists()
    assert not list(tmp_path.glob(".merged.old-*"))
    gguf = tmp_path / "m.gguf"
    (tmp_path / ".m.gguf.partial-aaaa").write_bytes(b"torn")
    (tmp_path / ".m.gguf.partial-bbbb").mkdir()
    assert len(remove_stale_partials(gguf)) == 2 and not list(tmp_path.glob(".m.gguf.partial-*"))


# ------------------------------------------------------------------------------------------ tokenizers


def test_word_start_schemes_are_read_from_tokenizer_json() -> None:
    assert _metaspace_schemes({"type": "Metaspace", "prepend_scheme": "first"}) == ["first"]
    legacy = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace"}]}
    assert _metaspace_schemes(legacy) == ["always"]
    assert _metaspace_schemes({"type": "ByteLevel"}) == []
    assert _metaspace_schemes(None) == []


def test_tokenizer_files_dropped_by_save_pretrained_are_restored(tmp_path: Path) -> None:
    source, saved = tmp_path / "source", tmp_path / "saved"
    source.mkdir()
    saved.mkdir()
    (source / "tokenizer.model").write_bytes(b"sp-model")
    (saved / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    added = [{"id": 5, "content": "<|im_end|>", "special": True, "lstrip": False, "rstrip": False,
              "normalized": False, "single_word": False}]  # fmt: skip
    (saved / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    restored = restore_tokenizer_files(saved, [source])
    assert restored == ["tokenizer.model", "added_tokens_decoder"]
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"]["5"] == {k: v for k, v in added[0].items() if k != "id"}
    assert (saved / "tokenizer.model").read_bytes() == b"sp-model"
