"""The code location itself: profiles, settings errors, executor, and the shape of every asset."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from jpslm_assets import execution, settings
from jpslm_assets.catalogue import UnknownModelError, load_catalogue, model_entry
from jpslm_assets.cli import INSTANCE_LOCK, INSTANCE_READY, prepare_instance

ROOT = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("torch", "transformers", "llama_cpp", "peft", "trl", "matplotlib")


def test_default_profile_is_demo_and_env_overrides_apply(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert settings.load_profile().name == "demo"
    monkeypatch.setenv("JPSLM_N_GRID", "[300, 100]")
    monkeypatch.setenv("JPSLM_TRAIN__EPOCHS", "2")
    profile = settings.load_profile()
    assert profile.n_grid == [100, 300]
    assert profile.train.epochs == 2


def test_paper_profile_holds_the_papers_grid_and_models() -> None:
    paper = settings.load_profile("paper")
    assert paper.n_grid == [1000, 2000, 3000, 4000, 5000]
    assert paper.models == ["swallow-8b", "elyza-jp-8b", "qwen2.5-7b", "tanuki-8b"]
    assert (paper.train.stage1.r, paper.train.stage1.alpha) == (16, 16)
    assert (paper.train.stage2.r, paper.train.stage2.alpha, paper.train.stage2.dropout) == (32, 16, 0.05)
    assert paper.train.per_device_batch_size * paper.train.gradient_accumulation_steps == 8


def test_cpu_precision_comes_from_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    from jpslm_assets.training import assets as training

    assert settings.load_profile("demo").train.cpu_precision == "auto"  # bf16 only where the CPU has it
    assert settings.load_profile("paper").train.cpu_precision == "auto"
    assert training.defs.resources["trainer"].cpu_precision == settings.current_profile().train.cpu_precision
    monkeypatch.setenv("JPSLM_TRAIN__CPU_PRECISION", "fp16")
    with pytest.raises(settings.SettingsError, match="cpu_precision"):
        settings.load_profile("demo")


def test_unknown_profile_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPSLM_PROFILE", "papr")
    with pytest.raises(
        settings.SettingsError, match="JPSLM_PROFILE='papr' is not a known profile; choose one of demo, paper"
    ):
        settings.load_profile()


def test_invalid_override_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPSLM_N_GRID", "[0, 100]")
    with pytest.raises(settings.SettingsError, match="n_grid"):
        settings.load_profile()


def test_cli_rejects_unknown_profile_without_traceback(data_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jpslm_assets.cli", "--profile", "nope", "demo"],
        capture_output=True,
        text=True,
        env={**os.environ, "JPSLM_DATA_DIR": str(data_dir)},
    )
    assert result.returncode == 2
    assert "JPSLM_PROFILE='nope' is not a known profile" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_ui_refuses_a_port_in_use_before_starting_dagster(data_dir: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "jpslm_assets.cli", "ui", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JPSLM_DATA_DIR": str(data_dir)},
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert f"jpslm ui --port {port + 1}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "dagster dev" not in result.stdout  # refused before starting anything


def test_cli_ui_warns_when_serving_beyond_this_machine(data_dir: Path) -> None:
    from jpslm_assets.cli import _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.20")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # a busy port: nothing starts
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "jpslm_assets.cli", "ui", "--host", "0.0.0.0", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "JPSLM_DATA_DIR": str(data_dir)},
        )
    assert result.stderr.startswith("warning: --host 0.0.0.0 serves the UI beyond this machine"), result.stderr
    assert "127.0.0.1 (the default)" in result.stderr
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["missing", "garbage", "no tables"])
def test_cli_lineage_on_a_missing_or_damaged_store_is_one_error_line(
    data_dir: Path, tmp_path: Path, damage: str
) -> None:
    database = tmp_path / "store.duckdb"
    if damage == "garbage":
        database.write_bytes(b"not a database" * 1000)
    elif damage == "no tables":
        import duckdb

        duckdb.connect(str(database)).close()
    result = subprocess.run(
        [sys.executable, "-m", "jpslm_assets.cli", "lineage", "judge_scores_f16", "tiny-llama"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JPSLM_DATA_DIR": str(data_dir), "JPSLM_DUCKDB_PATH": str(database)},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(database) in lines[0]
    expected = {"missing": "does not exist yet", "garbage": "not a readable DuckDB database",
                "no tables": "materialize the assets that write it"}[damage]  # fmt: skip
    assert expected in lines[0]


@pytest.mark.integration
def test_cli_ui_starts_dagster_with_its_own_interpreter_without_path(data_dir: Path, tmp_path: Path) -> None:
    """`.venv/bin/jpslm ui` from a shell whose PATH lacks the environment's bin folder (no `dagster` on PATH):
    the UI comes up, on a home whose dagster.yaml turns telemetry and the onboarding dialog off."""
    import shutil

    import httpx
    import yaml

    from jpslm_assets_tests.dagster_processes import DagsterProcess, free_port

    script = Path(sys.executable).parent / "jpslm"
    if not script.exists():
        script = Path(shutil.which("jpslm") or "")
    assert script.is_file(), "the jpslm console script is not installed beside this interpreter"
    port = free_port()
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DAGSTER_", "VIRTUAL_ENV"))}
    env.update(PATH="/usr/bin:/bin", JPSLM_DATA_DIR=str(data_dir), DAGSTER_HOME=str(home))
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(script), "ui", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
            cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    ui = DagsterProcess("jpslm ui", process, log)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert ui.alive(), ui.log_tail()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"the UI did not answer within 180 s\n{ui.log_tail()}")
    finally:
        ui.stop()
    config = yaml.safe_load((home / "dagster.yaml").read_text("utf-8"))
    assert config["telemetry"] == {"enabled": False} and config["nux"] == {"enabled": False}
    assert "No such file or directory" not in log.read_text("utf-8", errors="replace")


def test_port_check_accepts_a_free_port_and_rejects_a_listening_one() -> None:
    from jpslm_assets.cli import port_problem

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.listen(1)
        problem = port_problem("127.0.0.1", port)
    assert problem is not None and f"port {port} on 127.0.0.1 is already in use" in problem
    assert port_problem("127.0.0.1", port) is None  # the listener is gone: the port is free again


def test_data_dir_that_is_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Works as root too: a path below a regular file can never be created.
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    monkeypatch.setenv("JPSLM_DATA_DIR", str(blocker / "data"))
    with pytest.raises(settings.SettingsError, match=r"blocker/data is not writable.*set JPSLM_DATA_DIR"):
        settings.data_dir()
    assert blocker.read_text() == "keep me"


def test_dagster_home_defaults_inside_data_dir_with_telemetry_off(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = settings.dagster_home()
    assert home == data_dir / "dagster_home"
    config = (home / "dagster.yaml").read_text()
    assert "telemetry:\n  enabled: false" in config
    instance = dg.DagsterInstance.from_config(str(home))
    assert instance.run_coordinator is not None


def _schema_heads(home: Path) -> dict[str, list[str]]:
    """``alembic_version`` rows of every SQLite database Dagster made in ``home``."""
    import sqlite3

    heads = {}
    for database in sorted(home.rglob("*.db")):
        with contextlib.closing(sqlite3.connect(database)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "alembic_version" in tables:
                heads[database.name] = [row[0] for row in connection.execute("SELECT * FROM alembic_version")]
    return heads


PREPARE = "import sys; from pathlib import Path; from jpslm_assets.cli import prepare_instance; prepare_instance(Path(sys.argv[1]))"


def test_processes_starting_at_once_on_a_fresh_dagster_home_create_its_storage_once(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The UI's web server and daemon, or a demo beside the UI, start together on a fresh DAGSTER_HOME; each
    database ends with one schema version, and the instance opens after."""
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = settings.dagster_home()
    processes = [
        subprocess.Popen([sys.executable, "-c", PREPARE, str(home)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    heads = _schema_heads(home)
    assert {"runs.db", "schedules.db"} <= set(heads), heads
    assert all(len(rows) == 1 for rows in heads.values()), heads
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs(limit=1) == []


def test_the_storage_is_created_only_under_the_lock(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process holds the lock (it is creating the storage), a second waits instead of creating
    the databases beside it; once the lock is free it finds them made, or makes them itself."""
    from filelock import FileLock

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = settings.dagster_home()
    lock = FileLock(str(home / INSTANCE_LOCK))
    with lock:
        waiting = subprocess.Popen([sys.executable, "-c", PREPARE, str(home)], cwd=ROOT)
        time.sleep(5)  # long enough to import Dagster and open the instance, were it not waiting
        assert waiting.poll() is None, "prepare_instance ran while another process held the lock"
        assert _schema_heads(home) == {} and not (home / INSTANCE_READY).exists()
    assert waiting.wait(timeout=300) == 0
    assert (home / INSTANCE_READY).exists()
    assert all(len(rows) == 1 for rows in _schema_heads(home).values())
    prepare_instance(home)  # ready: returns at once, changes nothing
    assert all(len(rows) == 1 for rows in _schema_heads(home).values())


def test_catalogue_holds_the_paper_models_and_demo_models() -> None:
    catalogue = load_catalogue()
    assert catalogue["swallow-8b"].hf_id == "tokyotech-llm/Llama-3-Swallow-8B-Instruct-v0.1"
    assert catalogue["qwen2.5-7b"].architecture == "Qwen2ForCausalLM"
    assert catalogue["tanuki-8b"].known_export_problems
    for key in ("tiny-llama", "tiny-qwen2", "smollm2-135m"):
        assert key in catalogue
    for key in ("tiny-llama", "tiny-qwen2"):
        config = catalogue[key].config
        assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0
    with pytest.raises(UnknownModelError, match="model 'llama-9000' is not in the catalogue"):
        model_entry("llama-9000")


def test_executor_defaults_to_multiprocess_and_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert execution.executor_config() == {"max_concurrent": 2}
    monkeypatch.setenv("JPSLM_MAX_CONCURRENT", "4")
    executor = execution.default_executor()
    assert executor.name == "jpslm_multiprocess"
    assert execution.executor_config() == {"max_concurrent": 4}
    monkeypatch.setenv("JPSLM_MAX_CONCURRENT", "many")
    with pytest.raises(ValueError, match="JPSLM_MAX_CONCURRENT='many' must be an integer"):
        execution.executor_config()
    monkeypatch.setenv("JPSLM_MAX_CONCURRENT", "2")
    monkeypatch.setenv("JPSLM_EXECUTOR", "in_process")
    assert execution.default_executor() is dg.in_process_executor
    monkeypatch.setenv("JPSLM_EXECUTOR", "slurm")
    with pytest.raises(ValueError, match="JPSLM_EXECUTOR='slurm'"):
        execution.default_executor()


def test_executor_runs_a_job_under_the_multiprocess_config(tmp_path: Path) -> None:
    @dg.op
    def one() -> int:
        return 1

    @dg.job(executor_def=execution.default_executor())
    def tiny_job() -> None:
        one()

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.execute_job(dg.reconstructable(_reconstructable_tiny_job), instance=instance)
        assert result.success
    assert tiny_job.executor_def.name == "jpslm_multiprocess"


def _reconstructable_tiny_job() -> dg.JobDefinition:
    @dg.op
    def one() -> int:
        return 1

    @dg.job(executor_def=execution.default_executor())
    def tiny_job() -> None:
        one()

    return tiny_job


def test_definitions_load_without_heavy_imports() -> None:
    code = (
        "import sys, json, jpslm_assets.definitions as d; "
        f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_dagster_definitions_validate_passes() -> None:
    result = subprocess.run(
        ["dagster", "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_asset_has_group_kinds_code_version_and_description() -> None:
    from jpslm_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    problems = []
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_materializable:
            continue
        spec = node.to_asset_spec() if hasattr(node, "to_asset_spec") else None
        name = key.to_user_string()
        if not node.group_name or node.group_name == "default":
            problems.append(f"{name}: no group")
        if not node.code_version:
            problems.append(f"{name}: no code_version")
        if not node.description:
            problems.append(f"{name}: no description")
        kinds = spec.kinds if spec is not None else node.kinds
        if not kinds:
            problems.append(f"{name}: no kinds")
    assert not problems, "\n".join(problems)


def test_readme_commands_and_ci_build_the_same_lean_llama_cpp() -> None:
    """Both README set-up commands and CI build llama-cpp-python with the same CMAKE_ARGS, whose include file
    exists and switches llama.cpp's `common` library off (llama-cpp-python forces it on; nothing loads it)."""
    import re
    import shlex

    readme = (ROOT / "README.md").read_text("utf-8")
    blocks = re.findall(r"```bash\n(.+?)\n```", readme, re.S)
    commands = [block for block in blocks if "pip install" in block and "torch==2.13.0" in block]
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    commands.append(next(line for line in ci.splitlines() if "pip install" in line))
    assert len(commands) == 3
    prefixes = {command.split(" pip install", 1)[0] for command in commands}
    assert len(prefixes) == 1, prefixes
    (assignment,) = shlex.split(prefixes.pop())
    name, value = assignment.split("=", 1)
    assert name == "CMAKE_ARGS"
    defines = dict(arg[2:].split("=", 1) for arg in value.split())
    assert defines["LLAVA_BUILD"] == "OFF"
    include = Path(defines["CMAKE_PROJECT_llama.cpp_INCLUDE"].replace("$PWD", str(ROOT)))
    assert include.is_file()
    statements = [line.strip() for line in include.read_text().splitlines() if not line.strip().startswith("#")]
    assert "set(LLAMA_BUILD_COMMON OFF)" in statements


def test_cli_demo_on_a_damaged_store_stops_before_any_run_with_one_error_line(data_dir: Path, tmp_path: Path) -> None:
    import duckdb

    database = tmp_path / "store.duckdb"
    with duckdb.connect(str(database)) as conn:
        conn.execute("CREATE SCHEMA qa")
        conn.execute("CREATE TABLE qa.pool AS SELECT range AS x, md5(range::VARCHAR) AS y FROM range(300000)")
    from jpslm_assets_tests.test_store import _damage_data_blocks

    _damage_data_blocks(database)
    env = {**os.environ, "JPSLM_DATA_DIR": str(data_dir), "JPSLM_DUCKDB_PATH": str(database)}
    env.pop("DAGSTER_HOME", None)
    result = subprocess.run(
        [sys.executable, "-m", "jpslm_assets.cli", "demo"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: DuckDB file {database} is damaged: table qa.pool"), result.stderr
    assert "materializing" not in result.stdout
