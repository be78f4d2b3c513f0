"""The dbt-like runner: discovery, dependencies parsed with sqlglot, ordering, atomic runs, tests, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pytest

from jpslm_assets.marts import sql_project
from jpslm_assets.marts.cli import main
from jpslm_assets.marts.sql_project import SqlProjectError, load_project
from jpslm_assets.marts.sql_runs import ModelRunError, run_models, run_tests

SOURCES = """
sources:
  eval.things:
    columns: {id: BIGINT, value: DOUBLE, kind: VARCHAR}
"""


def write_project(root: Path, files: dict[str, str], sources: str = SOURCES) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sources.yml").write_text(sources, "utf-8")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), "utf-8")
    return root


BASIC = {
    "totals.sql": """
        -- Sum of values per kind.
        select kind, sum(value) as total, count(*) as items from eval.things group by kind
    """,
    "ranked.sql": """
        -- Kinds ranked by total (reads another model).
        with t as (select * from marts.totals)
        select kind, total, rank() over (order by total desc) as place from t
    """,
    "spread.py": '''
        """Standard deviation per kind, computed in Python."""
        import polars as pl

        SOURCE = "select kind, value from eval.things"


        def model(frame):
            return frame.group_by("kind").agg(pl.col("value").std().alias("sd")).sort("kind")
    ''',
    "tests/ranked_places_unique.sql": """
        -- Every place is taken once.
        select place from marts.ranked group by place having count(*) > 1
    """,
    "tests/totals_positive.sql": """
        -- severity: warn
        -- Totals are positive.
        select * from marts.totals where total <= 0
    """,
}


def seed(db: Path, rows: list[tuple[int, float, str]]) -> None:
    with duckdb.connect(str(db)) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS eval")
        conn.execute("CREATE OR REPLACE TABLE eval.things (id BIGINT, value DOUBLE, kind VARCHAR)")
        conn.executemany("INSERT INTO eval.things VALUES (?, ?, ?)", rows)


def test_discovery_parses_dependencies_and_orders_models(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", BASIC))
    assert project.order.index("totals") < project.order.index("ranked")
    assert project.models["ranked"].depends_on == {"totals"}
    assert project.models["ranked"].sources == frozenset()
    assert project.models["totals"].sources == {"eval.things"}
    assert project.models["spread"].kind == "python" and project.models["spread"].sources == {"eval.things"}
    assert project.models["totals"].description == "Sum of values per kind."
    assert project.models["spread"].description == "Standard deviation per kind, computed in Python."
    assert project.tests["totals_positive"].severity == "warn"
    assert project.test_target(project.tests["ranked_places_unique"]) == "ranked"
    # The code version changes with the file's text.
    version = project.models["totals"].code_version
    (tmp_path / "p" / "totals.sql").write_text("select kind, 1 as total from eval.things", "utf-8")
    assert load_project(tmp_path / "p").models["totals"].code_version != version


def test_run_builds_marts_and_tests_report_failures(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", BASIC))
    db = tmp_path / "db.duckdb"
    seed(db, [(1, 2.0, "a"), (2, 4.0, "a"), (3, -10.0, "b")])
    with duckdb.connect(str(db)) as conn:
        summaries = run_models(conn, project)
        assert [s.model for s in summaries] == project.order
        assert conn.execute("SELECT kind, total, place FROM marts.ranked ORDER BY place").fetchall() == [
            ("a", 6.0, 1),
            ("b", -10.0, 2),
        ]
        assert conn.execute("SELECT round(sd, 4) FROM marts.spread WHERE kind = 'a'").fetchone() == (1.4142,)
        results = {r.name: r for r in run_tests(conn, project)}
    assert results["ranked_places_unique"].passed
    warn = results["totals_positive"]
    assert (
        not warn.passed
        and warn.failing_rows == 1
        and warn.sample[0]["kind"] == "b"
        and warn.severity == "warn"
    )


def test_select_with_ancestors(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", BASIC))
    assert project.select(["+ranked"]) == ["totals", "ranked"]
    assert project.select(["spread"]) == ["spread"]
    with pytest.raises(SqlProjectError, match="no model 'nope'"):
        project.select(["nope"])
    db = tmp_path / "db.duckdb"
    seed(db, [(1, 1.0, "a")])
    with (
        duckdb.connect(str(db)) as conn,
        pytest.raises(ModelRunError, match=r"reads \['marts.totals'\], which are not built"),
    ):
        run_models(conn, project, ["ranked"])


def test_missing_source_reads_as_an_empty_typed_table(tmp_path: Path) -> None:
    project = load_project(write_project(tmp_path / "p", BASIC))
    with duckdb.connect(str(tmp_path / "empty.duckdb")) as conn:
        summaries = {s.model: s for s in run_models(conn, project)}
        assert summaries["totals"].rows == 0 and summaries["totals"].stubbed_sources == ["eval.things"]
        types = dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                  "WHERE table_name = 'totals'").fetchall())  # fmt: skip
        assert types == {"kind": "VARCHAR", "total": "DOUBLE", "items": "BIGINT"}
        assert all(result.passed for result in run_tests(conn, project))


def test_a_failing_model_rolls_back_the_whole_run(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", BASIC)
    db = tmp_path / "db.duckdb"
    seed(db, [(1, 2.0, "a")])
    with duckdb.connect(str(db)) as conn:
        run_models(conn, load_project(root))
    (root / "ranked.sql").write_text("select kind, total / 'x' as place from marts.totals", "utf-8")
    seed(db, [(1, 5.0, "a"), (2, 5.0, "b")])
    with duckdb.connect(str(db)) as conn:
        with pytest.raises(ModelRunError, match=r"model ranked \(.*ranked.sql\) failed in DuckDB"):
            run_models(conn, load_project(root))
        # totals was rebuilt before ranked failed, but the rollback keeps the previous version.
        assert conn.execute("SELECT kind, total FROM marts.totals").fetchall() == [("a", 2.0)]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.sql": "select * from marts.b", "b.sql": "select * from marts.a"}, "cycle"),
        ({"a.sql": "select * from marts.nothing"}, "no model nothing.sql or nothing.py"),
        ({"a.sql": "select * from eval.undeclared"}, "which sources.yml does not declare"),
        ({"a.sql": "select * from things"}, "table 'things' has no schema"),
        ({"a.sql": "select * from eval.things; select 1"}, "exactly one SELECT"),
        ({"a.sql": "selec kind from eval.things"}, "does not parse"),
        ({"a.sql": "select * from marts.a"}, "reads its own table"),
        ({"Bad-Name.sql": "select 1"}, "lower_snake_case"),
        (
            {"p.py": "SOURCE = f'select 1'\ndef model(frame):\n    return frame\n"},
            "SOURCE must be a string literal",
        ),
        ({"p.py": "def model(frame):\n    return frame\n"}, "defines SOURCE"),
        (
            {"a.sql": "select 1 as x", "tests/t.sql": "select 1 from eval.things"},
            "must read at least one marts",
        ),
        ({"a.sql": "select 1 as x", "tests/t.sql": "-- severity: fatal\nselect * from marts.a"}, "severity"),
    ],
)
def test_inconsistent_projects_are_refused_with_the_file_named(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(SqlProjectError, match=message):
        load_project(write_project(tmp_path / "p", files))


def test_ctes_and_table_functions_are_not_dependencies() -> None:
    sql = """
        with levels as (select * from range(0, 4) as r(score))
        select * from levels cross join marts.judged_answers join qa.test_set using (question_id),
        unnest([1, 2]) as u(x)
    """
    assert sql_project.referenced_tables(sql, "inline") == {"marts.judged_answers", "qa.test_set"}


def test_python_model_returning_the_wrong_type_is_a_clear_error(tmp_path: Path) -> None:
    project = load_project(
        write_project(tmp_path / "p", {"p.py": "SOURCE = None\ndef model(frame):\n    return [1]\n"})
    )
    with (
        duckdb.connect(str(tmp_path / "x.duckdb")) as conn,
        pytest.raises(ModelRunError, match="returned list"),
    ):
        run_models(conn, project)


def test_cli_run_test_list_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_project(
        tmp_path / "p", {**BASIC, "tests/totals_small.sql": "select * from marts.totals where total > 100"}
    )
    db = tmp_path / "db.duckdb"
    seed(db, [(1, 2.0, "a")])
    assert main(["--models-dir", str(root), "list"]) == 0
    assert "ranked" in capsys.readouterr().out
    assert main(["--models-dir", str(root), "test", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--models-dir", str(root), "run", "--db", str(db)]) == 0
    assert "built marts.ranked: 1 rows" in capsys.readouterr().out
    assert main(["--models-dir", str(root), "test", "--db", str(db)]) == 0
    seed(db, [(1, 200.0, "a")])
    assert main(["--models-dir", str(root), "run", "--db", str(db), "--select", "+totals"]) == 0
    capsys.readouterr()
    assert main(["--models-dir", str(root), "test", "--db", str(db)]) == 1
    out = capsys.readouterr().out
    assert "FAIL totals_small on marts.totals  1 failing rows" in out
    assert main(["--models-dir", str(tmp_path / "missing"), "list"]) == 2


def test_console_script_module_runs_against_any_duckdb_file(tmp_path: Path) -> None:
    db = tmp_path / "any.duckdb"
    completed = subprocess.run(
        [sys.executable, "-m", "jpslm_assets.marts.cli", "run", "--db", str(db)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "built marts.score_summary: 0 rows" in completed.stdout
    with duckdb.connect(str(db), read_only=True) as conn:
        tables = {row[0] for row in conn.execute("SELECT table_name FROM information_schema.tables "
                                                 "WHERE table_schema = 'marts'").fetchall()}  # fmt: skip
    assert {"score_summary", "score_distribution", "category_scores", "quantization_effect", "scale_curve",
            "judge_reliability", "citation_summary"} <= tables  # fmt: skip


DOCUMENTED = ["model", "n", "format", "question_id", "category", "judge", "score", "reason", "parse_ok", "raw_output"]


def _score_csv(path: Path, rows: list[list[object]], header: list[str] = DOCUMENTED) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


SCORES = [
    ["tiny-llama", 60, "f16", "TS-001", "Survey", "other-tool/gpt/ja", 3, "正確", "true", '{"score": 3}'],
    ["tiny-llama", 60, "f16", "TS-002", "Design", "other-tool/gpt/ja", 1, "一部", "true", '{"score": 1}'],
    ["tiny-llama", 60, "q4_k_m", "TS-001", "Survey", "other-tool/gpt/ja", 2, "ほぼ", "true", '{"score": 2}'],
    ["tiny-llama", 60, "q4_k_m", "TS-002", "Design", "other-tool/gpt/ja", "", "", "false", "garbled"],
]


def test_scores_from_a_csv_with_only_the_documented_columns_build_every_mart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "other.duckdb"
    csv_file = _score_csv(tmp_path / "scores.csv", SCORES)
    assert main(["load-scores", str(csv_file), "--db", str(db)]) == 0
    assert "loaded 4 rows" in capsys.readouterr().out
    assert main(["load-scores", str(csv_file), "--db", str(db)]) == 0, "loading again replaces, not appends"
    assert main(["run", "--db", str(db)]) == 0
    project = load_project()
    with duckdb.connect(str(db), read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM eval.judge_scores").fetchone() == (4,)
        marts = {row[0] for row in conn.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'marts'").fetchall()}
        assert marts == set(project.models)
        summary = conn.sql(
            "SELECT format, questions, scored, unparsed, avg_score, judge_verdict FROM marts.score_summary ORDER BY format"
        ).fetchall()
    assert summary == [("f16", 2, 2, 0, 2.0, None), ("q4_k_m", 2, 1, 1, 2.0, None)]
    assert main(["test", "--db", str(db)]) == 0


def test_a_score_csv_missing_a_column_or_with_a_bad_value_is_named_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "other.duckdb"
    assert main(["load-scores", str(_score_csv(tmp_path / "good.csv", SCORES)), "--db", str(db)]) == 0
    capsys.readouterr()
    no_judge = _score_csv(tmp_path / "no_judge.csv", [row[:5] + row[6:] for row in SCORES], DOCUMENTED[:5] + DOCUMENTED[6:])
    assert main(["load-scores", str(no_judge), "--db", str(db)]) == 2
    error = capsys.readouterr().err
    assert f"score file {no_judge} lacks required column(s) ['judge'] of eval.judge_scores" in error
    assert "The DuckDB contract" in error and "nothing was changed" in error
    bad = [*SCORES[:2], ["tiny-llama", "sixty", "f16", "TS-003", "Hazard", "other-tool/gpt/ja", 2, "x", "true", "{}"]]
    bad_file = _score_csv(tmp_path / "bad.csv", bad)
    assert main(["load-scores", str(bad_file), "--db", str(db)]) == 2
    assert f"score file {bad_file} line 4: column n = 'sixty' is not a BIGINT" in capsys.readouterr().err
    extra = _score_csv(tmp_path / "extra.csv", [[*row, 0.5] for row in SCORES], [*DOCUMENTED, "confidence"])
    assert main(["load-scores", str(extra), "--db", str(db)]) == 2
    assert "column(s) ['confidence'] that eval.judge_scores does not define" in capsys.readouterr().err
    with duckdb.connect(str(db), read_only=True) as conn:
        assert conn.sql("SELECT count(*) FROM eval.judge_scores").fetchone() == (4,)
