"""The Dagster UI in a real browser: Debian's Chromium, driven by Playwright, against ``dagster dev``.

The UI runs on 127.0.0.1 with the demo profile, a temporary data directory and DAGSTER_HOME. The upstream of
``training_subset`` is materialized first through the Python API into the same instance; the test then opens
the asset graph, opens the partitioned asset, launches one partition from the launch dialog and waits for
the run to succeed, and opens a figure asset to see its image. Screenshots stay in the test's tmp dir;
set ``JPSLM_SCREENSHOT_DIR`` to also copy them there (docs/img/asset-graph.png comes from that).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from jpslm_assets import settings
from jpslm_assets.common.figures import japanese_font_path
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.dagster_processes import (
    PortInUseError,
    ProcessStartError,
    free_port,
    start_dagster_ui,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
# Headless, and nothing that phones home: the machines running this have no internet.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PARTITIONED_ASSET = "training_subset"
FIGURE_ASSET = "figure_relation_types"

# Runs in a fresh interpreter so the code location reads this test's JPSLM_* / DAGSTER_HOME environment.
PREMATERIALIZE = """
import sys
import dagster as dg
from jpslm_assets.definitions import defs

graph = defs.resolve_asset_graph()
keys = dg.AssetSelection.assets(*sys.argv[1:]).upstream().resolve(graph)
keys -= {dg.AssetKey(sys.argv[1])}  # the partitioned asset itself is launched from the UI
result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
    instance=dg.DagsterInstance.get(), asset_selection=sorted(keys), raise_on_error=False
)
print("materialized", sorted(k.to_user_string() for k in keys), "success", result.success)
sys.exit(0 if result.success else 1)
"""


def _environment(data_dir: Path, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("JPSLM_")}
    env.update(
        {
            "JPSLM_PROFILE": "demo",
            "JPSLM_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(home),
            "DAGSTER_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def _fontconfig(folder: Path) -> Path:
    """A fontconfig file adding the font shipped with japanize-matplotlib, so Chromium draws Japanese
    text (descriptions, captions) without system-wide Japanese fonts."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "fonts.conf"
    config.write_text(
        '<?xml version="1.0"?>\n<!DOCTYPE fontconfig SYSTEM "fonts.dtd">\n<fontconfig>\n'
        '  <include ignore_missing="yes">/etc/fonts/fonts.conf</include>\n'
        f"  <dir>{japanese_font_path().parent}</dir>\n"
        f"  <cachedir>{folder / 'cache'}</cachedir>\n</fontconfig>\n",
        encoding="utf-8",
    )
    return config


def _keep(screenshot: Path) -> None:
    target = os.environ.get("JPSLM_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, Path(target) / screenshot.name)


def _assert_no_welcome_dialog(page: Page) -> None:
    """Dagster shows a one-time "Join the Dagster community" dialog over every page of a new DAGSTER_HOME
    unless its dagster.yaml says `nux: enabled: false`, which the project's home does."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=5000)
    except PlaywrightTimeoutError:
        return
    raise AssertionError("the onboarding dialog covers the page on a new DAGSTER_HOME")


def _expand_group(page: Page, group: str, asset: str) -> None:
    """Double-click a collapsed group node of the lineage graph until ``asset`` shows (the UI remembers
    expanded groups between visits, and a double-click on an expanded group collapses it again)."""
    from playwright.sync_api import expect

    graph = page.locator("svg")
    node = graph.get_by_text(asset, exact=True).first
    try:
        node.wait_for(state="visible", timeout=3000)
    except PlaywrightTimeoutError:
        graph.get_by_text(group, exact=True).first.dblclick()
    expect(node).to_be_visible()


@pytest.mark.browser
@pytest.mark.integration
def test_ui_shows_the_graph_and_launches_a_partition_that_succeeds(data_dir: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's Chromium is missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    home = tmp_path / "dagster_home"
    env = _environment(data_dir, home)
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        settings.dagster_home()  # the project's instance config (queued runs, telemetry off)
    finally:
        os.environ.pop("DAGSTER_HOME", None)
    partition = str(settings.load_profile("demo").n_grid[0])

    prepared = subprocess.run(
        [sys.executable, "-c", PREMATERIALIZE, PARTITIONED_ASSET, FIGURE_ASSET],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with (
        start_dagster_ui(
            target=["-m", "jpslm_assets.definitions"],
            env=env,
            log_path=tmp_path / "dagster-dev.log",
            cwd=ROOT,
        ) as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            env={**os.environ, "FONTCONFIG_FILE": str(_fontconfig(tmp_path / "fontconfig"))},
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)

        # 1. The asset graph: every stage group is a node; expanding `dataset` shows its assets.
        page.goto(f"{server.url}/asset-groups", wait_until="networkidle")
        _assert_no_welcome_dialog(page)
        graph = page.locator("svg")
        for group in ("kg", "dataset", "training", "evaluation", "export", "judging", "marts", "reports"):
            expect(graph.get_by_text(group, exact=True).first).to_be_visible()
        _expand_group(page, "dataset", PARTITIONED_ASSET)

        # 2. The partitioned asset: launch one partition from the dialog.
        page.goto(f"{server.url}/assets/{PARTITIONED_ASSET}", wait_until="networkidle")
        _assert_no_welcome_dialog(page)
        page.get_by_role("button", name="Materialize…").click()
        dialog = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {PARTITIONED_ASSET}")
        dialog.get_by_text("Select a partition or create one").click()
        page.get_by_title(partition, exact=True).click()
        page.keyboard.press("Escape")  # close the partition picker, keep the dialog
        launch = dialog.get_by_role("button", name="Launch 1 run")
        expect(launch).to_be_enabled()
        launch.click()
        run_link = page.locator("a[href*='/runs/']").filter(has_text="View").first
        expect(run_link).to_be_visible()
        run_id = (run_link.get_attribute("href") or "").rstrip("/").rsplit("/", 1)[-1]
        assert run_id

        # 3. The run page until the run succeeds.
        page.goto(f"{server.url}/runs/{run_id}", wait_until="networkidle")
        expect(page.get_by_text(f"partition: {partition}").first).to_be_visible()
        expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=300_000)
        run_png = shots / "partition-run.png"
        page.screenshot(path=str(run_png))
        _keep(run_png)

        # The graph again, now with the launched partition materialized: the picture for the docs.
        page.goto(f"{server.url}/asset-groups", wait_until="networkidle")
        _expand_group(page, "dataset", PARTITIONED_ASSET)
        time.sleep(2)  # let the layout animation settle before the picture
        graph_png = shots / "asset-graph.png"
        page.screenshot(path=str(graph_png))
        _keep(graph_png)

        # 4. A figure asset shows its image (base64 PNG in Markdown metadata).
        page.goto(f"{server.url}/assets/{FIGURE_ASSET}", wait_until="networkidle")
        page.get_by_text("[Show Markdown]").first.click()
        image = page.locator("img[src^='data:image/png;base64,']").first
        expect(image).to_be_visible()
        assert image.evaluate("img => img.complete && img.naturalWidth") >= 600
        figure_png = shots / "figure-metadata.png"
        page.screenshot(path=str(figure_png))
        _keep(figure_png)
        browser.close()
        # `dagster dev` shuts down cleanly on SIGTERM to its process group (no SIGKILL needed).
        assert server.stop() == "SIGTERM", server.log_tail()

    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = dg.DagsterInstance.get()
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/partition"] == partition
        instance.dispose()
    finally:
        os.environ.pop("DAGSTER_HOME", None)
    rows = DuckDBStore(path=str(data_dir / "jpslm.duckdb")).query(
        "SELECT count(*) AS rows FROM qa.training_subset WHERE n = ?", [int(partition)]
    )
    assert rows["rows"][0] > 0
    assert graph_png.stat().st_size > 20_000


@pytest.mark.integration
def test_ui_port_already_in_use_is_a_clear_error(tmp_path: Path) -> None:
    location = tmp_path / "empty_location.py"
    location.write_text("import dagster as dg\n\ndefs = dg.Definitions()\n", encoding="utf-8")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        arguments = {"target": ["-f", str(location)], "env": env, "cwd": tmp_path, "port": port}
        # Refused before anything starts, naming the port and the fix.
        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port} is already in use.*--port"):
            start_dagster_ui(log_path=tmp_path / "first.log", **arguments)  # type: ignore[arg-type]
        assert not (tmp_path / "first.log").exists()
        # Without the pre-check, `dagster dev` would keep its daemon running behind a dead webserver:
        # the failure is still reported as the port error, and the whole process group is stopped.
        started = time.monotonic()
        with pytest.raises(PortInUseError, match="address already in use"):
            start_dagster_ui(log_path=tmp_path / "second.log", check_port=False, **arguments)  # type: ignore[arg-type]
        assert time.monotonic() - started < 120
    leftovers = subprocess.run(["pgrep", "-f", str(location)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", f"processes left running: {leftovers.stdout}"


def test_a_ui_process_that_exits_is_reported_with_its_command_and_log(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    with pytest.raises(
        ProcessStartError, match=r"(?s)dagster-webserver --no-such-option .* exited with 2:.*No such option"
    ):
        start_dagster_ui(
            target=["--no-such-option"], env=env, log_path=tmp_path / "web.log", cwd=tmp_path,
            with_daemon=False, timeout=60,
        )  # fmt: skip
