"""Scores from another judge or tool into ``eval.judge_scores``, so the marts summarise them like the project's.

``jpslm-sql load-scores scores.csv --db FILE`` reads a CSV (UTF-8, header row) that has at least the
documented columns of ``eval.judge_scores`` (``dbt_like_sql/sources.yml``; the README's "The DuckDB
contract"): model, n, format, question_id, category, judge, score, reason, parse_ok, raw_output. Optional
columns (adapter, stage, attempts, prompt_version, serving_backend) are taken when present; other columns are
refused, naming them. Values are cast to the contract's types. The rows replace those of the same (model, n,
format, judge) already in the table and nothing else, in one transaction: loading the same file twice leaves
the same table. Then ``jpslm-sql run --db FILE`` builds every mart from them.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from jpslm_assets.marts.sql_project import CONTRACT_DOCS, Source

TABLE = "eval.judge_scores"
SLICE = ("model", "n", "format", "judge")


class ScoreImportError(ValueError):
    """The file cannot be loaded; the message names the file, the column or row, and the fix."""


def load_scores(conn: duckdb.DuckDBPyConnection, csv_path: Path, source: Source) -> int:
    """Load ``csv_path`` into ``eval.judge_scores`` (see the module docstring); returns the rows loaded."""
    if not csv_path.is_file():
        raise ScoreImportError(f"score file {csv_path} does not exist")
    try:
        relation = conn.read_csv(str(csv_path), header=True, all_varchar=True)
    except duckdb.Error as exc:
        raise ScoreImportError(
            f"score file {csv_path} is not a readable CSV with a header row ({exc})"
        ) from exc
    columns = list(relation.columns)
    required = [name for name in source.columns if name not in source.optional]
    missing = [name for name in required if name not in columns]
    if missing:
        raise ScoreImportError(
            f"score file {csv_path} lacks required column(s) {missing} of {TABLE} (the contract is in "
            f"{CONTRACT_DOCS}); add them to the header."
        )
    unknown = [name for name in columns if name not in source.columns]
    if unknown:
        raise ScoreImportError(
            f"score file {csv_path} has column(s) {unknown} that {TABLE} does not define; remove them or rename "
            f"them to contract columns ({', '.join(source.columns)})."
        )
    casts = ", ".join(f'TRY_CAST("{name}" AS {source.columns[name]}) AS "{name}"' for name in columns)
    conn.register("score_file_raw", relation)
    try:
        # Line numbers as a reader of the file counts them: the header is line 1.
        conn.execute(
            "CREATE OR REPLACE TEMP TABLE score_file_lines AS "
            "SELECT row_number() OVER () + 1 AS csv_line, * FROM score_file_raw"
        )
        conn.execute(
            f"CREATE OR REPLACE TEMP TABLE score_file_typed AS SELECT csv_line, {casts} FROM score_file_lines"
        )
        for name in columns:
            row = conn.execute(
                f'SELECT t.csv_line, s."{name}" FROM score_file_typed AS t JOIN score_file_lines AS s USING '
                f'(csv_line) WHERE s."{name}" IS NOT NULL AND trim(s."{name}") <> \'\' AND t."{name}" IS NULL '
                "ORDER BY t.csv_line LIMIT 1"
            ).fetchone()
            if row:
                raise ScoreImportError(
                    f"score file {csv_path} line {row[0]}: column {name} = {row[1]!r} is not a "
                    f"{source.columns[name]}; fix that value."
                )
        schema, name = TABLE.split(".")
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} AS SELECT * EXCLUDE (csv_line) FROM score_file_typed LIMIT 0"
            )
            for column in columns:
                conn.execute(
                    f'ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS "{column}" {source.columns[column]}'
                )
            match = " AND ".join(f"s.{key} IS NOT DISTINCT FROM t.{key}" for key in SLICE)
            conn.execute(
                f"DELETE FROM {TABLE} AS s WHERE EXISTS (SELECT 1 FROM score_file_typed AS t WHERE {match})"
            )
            loaded = conn.execute(
                f"INSERT INTO {TABLE} BY NAME SELECT * EXCLUDE (csv_line) FROM score_file_typed"
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute("DROP TABLE IF EXISTS score_file_typed")
        conn.execute("DROP TABLE IF EXISTS score_file_lines")
        conn.unregister("score_file_raw")
    return int(loaded[0]) if loaded else 0
