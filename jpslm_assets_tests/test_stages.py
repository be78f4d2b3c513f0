"""The paper's three stages as the asset graph: stage assets, n* as data, public Dagster APIs only,
the Table 2 deltas, the stratified evaluation questions and CPU precision by capability."""

from __future__ import annotations

import math
import re
from pathlib import Path

import polars as pl
import pytest

from jpslm_assets.export.answering import select_eval_questions, stratified_quotas
from jpslm_assets.partitions import stage3_adapter, stage3_keys
from jpslm_assets.resources.cpu import choose_cpu_precision
from jpslm_assets.settings import load_profile
from jpslm_assets.training.scaling import scale_curve

PACKAGE = Path(__file__).resolve().parents[1] / "jpslm_assets"
TEST_SET = PACKAGE / "data" / "test_set_200.jsonl"


def test_no_private_dagster_module_is_used_anywhere_in_the_package() -> None:
    private = re.compile(r"\bdagster(_\w+)?\._")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1)
        if private.search(line)
    ]
    assert found == []


# The paper's Table 2: n, test NLL, status. ΔNLL is the change from the previous n.
TABLE_2 = [
    (1000, 1.3421, "underfit"),
    (2000, 1.2758, "improving"),
    (3000, 1.2150, "improving"),
    (4000, 1.1272, "optimal"),
    (5000, 1.3190, "overfitting"),
]
PAPER_DELTA = [None, -0.0663, -0.0608, -0.0878, 0.1918]
ABOVE_OPTIMUM = [0.2149, 0.1486, 0.0878, 0.0, 0.1918]


def test_scale_curve_reproduces_every_row_of_the_papers_table_2() -> None:
    points = pl.DataFrame(
        {
            "model": ["swallow-8b"] * 5,
            "n": [n for n, _, _ in TABLE_2],
            "train_loss_final": [0.8687, 0.8413, 0.7894, 0.7800, 0.7666],
            "test_nll": [nll for _, nll, _ in TABLE_2],
        }
    )
    curve = scale_curve(points.reverse())  # input order does not matter
    assert curve["n"].to_list() == [n for n, _, _ in TABLE_2]
    assert curve["paper_status"].to_list() == [status for *_, status in TABLE_2]
    # Means alone carry no interval: the status is the position against n*, and no interval is claimed.
    assert curve["status"].to_list() == ["underfit", "underfit", "underfit", "optimal", "overfitting"]
    assert curve["diff_ci_low"].null_count() == 5
    for got, expected in zip(curve["delta_nll"].to_list(), PAPER_DELTA, strict=True):
        assert (got is None) if expected is None else math.isclose(got, expected, abs_tol=5e-5)
    for got, expected in zip(curve["nll_above_optimum"].to_list(), ABOVE_OPTIMUM, strict=True):
        assert math.isclose(got, expected, abs_tol=5e-5)
    assert curve.filter(pl.col("is_optimal"))["n"].to_list() == [4000]


def test_demo_evaluation_questions_are_one_per_category_seeded_and_recorded_by_id() -> None:
    test_set = pl.read_ndjson(TEST_SET)
    chosen = select_eval_questions(test_set, 8, seed=42)
    assert chosen.height == 8
    assert sorted(chosen["category"].to_list()) == sorted(
        test_set.filter(pl.col("human_written"))["category"].unique().to_list()
    )
    assert chosen["question_id"].to_list() == sorted(chosen["question_id"].to_list())
    again = select_eval_questions(test_set, 8, seed=42)
    assert again["question_id"].to_list() == chosen["question_id"].to_list()
    other = select_eval_questions(test_set, 8, seed=7)
    assert other["question_id"].to_list() != chosen["question_id"].to_list()
    assert select_eval_questions(test_set, 100, seed=42).height == 100  # the paper's whole set


def test_stratified_quotas_are_proportional_and_never_exceed_a_stratum() -> None:
    sizes = {"a": 13, "b": 13, "c": 12, "d": 2}
    assert stratified_quotas(sizes, 4) == {"a": 1, "b": 1, "c": 1, "d": 1}
    quotas = stratified_quotas(sizes, 20)
    assert sum(quotas.values()) == 20 and quotas["d"] <= 2 and quotas["a"] >= quotas["d"]
    assert stratified_quotas(sizes, 2) == {"a": 1, "b": 1}
    assert stratified_quotas(sizes, 40) == sizes


@pytest.mark.parametrize(
    ("requested", "flags", "expected"),
    [
        ("auto", set(), "fp32"),  # AVX2 only: bf16 would be emulated, ~40x slower
        ("auto", {"avx512_bf16"}, "bf16"),
        ("auto", {"amx_bf16"}, "bf16"),
        ("fp32", {"avx512_bf16", "amx_bf16"}, "fp32"),
        ("bf16", set(), "bf16"),
    ],
)
def test_cpu_precision_auto_takes_bf16_only_where_the_cpu_has_it(
    requested: str, flags: set[str], expected: str
) -> None:
    precision, reason = choose_cpu_precision(requested, flags)
    assert precision == expected
    assert f"cpu_precision={requested}" in reason
    if requested == "bf16" and not flags:
        assert "40x slower" in reason


def test_cpu_precision_rejects_an_unknown_setting() -> None:
    with pytest.raises(ValueError, match="cpu_precision='fp16' is not one of auto, fp32, bf16"):
        choose_cpu_precision("fp16", set())


def test_stage3_partitions_are_the_stage2_adapters_and_the_reference_stage1_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JPSLM_PROFILE", raising=False)
    profile = load_profile("paper")
    assert profile.stage1_model == "swallow-8b"
    assert stage3_keys(profile) == [*profile.models, "swallow-8b@stage1"]
    demo = load_profile("demo")
    assert stage3_adapter(demo.models[1]) == (demo.models[1], demo.models[1], 2)
    assert stage3_adapter(f"{demo.stage1_model}@stage1").stage == 1
    with pytest.raises(ValueError, match="not one of"):
        stage3_adapter("nobody@stage1")


def test_a_reference_model_outside_the_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from jpslm_assets.settings import SettingsError

    monkeypatch.setenv("JPSLM_REFERENCE_MODEL", "qwen2.5-7b")
    with pytest.raises(SettingsError, match="reference_model 'qwen2.5-7b' is not one of the profile's models"):
        load_profile("demo")
