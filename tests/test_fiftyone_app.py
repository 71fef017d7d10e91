"""`diffumask app` served for real and opened in headless Chromium.

The CLI runs as a subprocess (as a user runs it) on 127.0.0.1 with the plugin installed;
the test asks the App's server for its operators and runs one through it the way the
App's forms do, then opens the page in Debian's chromium (driven by playwright with
`executable_path`; no browser is ever downloaded), waits for the grid to show every
sample with its mask, saves a screenshot, and stops the App with SIGINT.

Skipped, with the reason, only when chromium or playwright is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fiftyone", reason="the fiftyone extra is not installed")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

from fiftyone_data import make_store  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
REPO = Path(__file__).resolve().parents[1]
PLUGIN = "@diffumask/diffumask"
COUNT = 6
OPERATOR_LABELS = [
    "DiffuMask: filter samples",
    "DiffuMask: re-refine masks",
    "DiffuMask: tag and exclude bad samples",
    "DiffuMask: per-class mask statistics",
    "DiffuMask: export to VOC or COCO",
]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the app exited early with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """The App's server answers from its own process, possibly before the CLI has
    printed its banner, so the banner is awaited on its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if process.poll() is not None:
            raise AssertionError(f"the app exited early with code {process.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not printed within {timeout:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fo-app")
    store = root / "store"
    make_store(store, COUNT)
    plugins = root / "plugins"
    env = {
        **os.environ,
        "FIFTYONE_PLUGINS_DIR": str(plugins),
        "FIFTYONE_DEFAULT_DATASET_DIR": str(root / "fiftyone"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    cli = [sys.executable, "-c", "from diffumask_datasets.cli import main; main()"]
    installed = subprocess.run(
        [*cli, "plugin", "install"], env=env, capture_output=True, text=True, timeout=120
    )
    assert installed.returncode == 0, installed.stderr
    port = free_port()
    log = root / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*cli, "app", str(store), "--address", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_http(url, process, timeout=180)
        wait_for_line(log, "FiftyOne App:", process, timeout=60)
        yield {"url": url, "process": process, "log": log, "root": root}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def dataset_name(log: Path) -> str:
    match = re.search(r"\(dataset '([^']+)'\)", log.read_text())
    assert match, log.read_text()
    return match.group(1)


def test_app_serves_the_dataset_and_its_operators(served_app):
    log = served_app["log"].read_text()
    assert f"FiftyOne App: {COUNT} samples of" in log
    assert "127.0.0.1" in log
    name = dataset_name(served_app["log"])
    listed = post(served_app["url"] + "operators", {"dataset_name": name})
    ours = {op["uri"] for op in listed["operators"] if op["uri"].startswith(PLUGIN)}
    assert len(ours) >= 4 and f"{PLUGIN}/rerefine_samples" in ours
    assert not [e for e in listed.get("errors", []) if "diffumask" in json.dumps(e)]

    # the form check the App runs as the user types: an out-of-range threshold is invalid
    form = post(
        served_app["url"] + "operators/resolve-type",
        {
            "operator_uri": f"{PLUGIN}/rerefine_samples",
            "dataset_name": name,
            "target": "inputs",
            "params": {"threshold": 1.5, "field": "t150"},
        },
    )
    threshold = form["type"]["properties"]["threshold"]
    assert threshold["invalid"] is True
    assert "outside [0, 1]" in threshold["error_message"]

    executed = post(
        served_app["url"] + "operators/execute",
        {
            "operator_uri": f"{PLUGIN}/filter_samples",
            "dataset_name": name,
            "params": {"classes": ["dog"]},
        },
    )
    assert executed["result"]["count"] == 4  # dog is in prompts 1, 2, 4, 5 of six


def test_browser_shows_the_grid_with_masks(served_app, tmp_path):
    url = served_app["url"]
    shot = tmp_path / "fiftyone_app.png"
    blocked = []
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh profile every run, cleaned by pytest
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            # the App asks for web fonts; nothing may leave the machine
            def only_local(route):
                if route.request.url.startswith((url, "data:", "blob:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", only_local)
            page = context.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.get_by_text(f"{COUNT} samples").first.wait_for(timeout=120_000)
            # one canvas per sample tile once images and masks are drawn
            page.wait_for_function(
                f"document.querySelectorAll('canvas').length >= {COUNT}", timeout=120_000
            )
            tiles = page.evaluate("document.querySelectorAll('canvas').length")
            dismiss = page.get_by_text("Dismiss")
            if dismiss.count():
                dismiss.first.click()
            page.wait_for_timeout(1500)  # let the last mask overlays paint
            page.screenshot(path=str(shot))
            body = page.inner_text("body")
            # the operator browser (the ` key) lists the plugin's operators
            page.locator("body").click(position={"x": 700, "y": 700})
            page.keyboard.press("Backquote")
            page.get_by_placeholder("Search operations by name...").fill("DiffuMask")
            page.get_by_text("DiffuMask: re-refine masks").first.wait_for(timeout=30_000)
            browser_text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "fiftyone_operators.png"))
        finally:
            context.close()
    assert tiles >= COUNT
    assert "ground_truth" in body and "attention_bird" in body
    assert shot.stat().st_size > 10_000
    shown = [label for label in OPERATOR_LABELS if label in browser_text]
    assert len(shown) >= 4, browser_text
    keep = os.environ.get("DIFFUMASK_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, Path(keep) / png.name)
    assert all("127.0.0.1" not in b for b in blocked)


def test_app_stops_on_interrupt(served_app):
    process = served_app["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    assert "stopped" in served_app["log"].read_text()
