"""The report page in a real browser: headless Chromium driven over the DevTools protocol.

The page must load without console errors and without any network request, every image must
decode, and a completion holding ``<script>alert(1)</script>`` must show as text (no dialog,
no script element). Chromium is the Debian package ``chromium``; the session fixture installs
it with apt-get when it is missing and skips only when that is impossible.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from entropylens.report import build_report

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-quic", "--disable-extensions",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of the Chromium binary, installed from Debian's packages when missing."""
    path = _find_chromium()
    if path:
        return path
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and cannot be installed here (needs apt-get as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600,
                       capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env,
                       timeout=900, capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"could not install chromium: {exc}")
    path = _find_chromium()
    if not path:
        pytest.skip("chromium is not on PATH after installing it")
    return path


class Browser:
    """A headless Chromium and one page, spoken to over the DevTools protocol."""

    def __init__(self, binary: str, *, width: int = 1400, height: int = 900):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="entropylens-chromium-")
        self.process = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._port()
        deadline = time.time() + 30
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages or time.time() > deadline:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _port(self) -> int:
        marker = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while time.time() < deadline:
            if marker.exists() and marker.read_text().strip():
                return int(marker.read_text().split()[0])
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}")
            time.sleep(0.1)
        raise RuntimeError("chromium did not open its DevTools port in 60 s")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        deadline = time.time() + timeout
        while time.time() < deadline:
            message = json.loads(self.ws.recv())
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message
        raise TimeoutError(method)

    def open(self, path: Path) -> None:
        """Load a local file and wait for its load event and one idle moment."""
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        self.evaluate("new Promise(r => setTimeout(r, 200))", await_promise=True)

    def evaluate(self, expression: str, *, await_promise: bool = False):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=await_promise)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in (
                    "error", "assert"):
                errors.append(json.dumps(params.get("args")))
            elif event["method"] == "Runtime.exceptionThrown":
                errors.append(json.dumps(params.get("exceptionDetails")))
            elif event["method"] == "Log.entryAdded" and \
                    params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

    def network_requests(self) -> list[str]:
        """URLs requested other than the page file itself and inline ``data:`` URIs."""
        urls = [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]
        return [u for u in urls if not u.startswith(("file:", "data:"))]

    def dialogs(self) -> list[dict]:
        return [e for e in self.events if e["method"] == "Page.javascriptDialogOpening"]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:  # noqa: BLE001 - the browser may already be gone
            pass
        try:
            self.ws.close()
        finally:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(chromium):
    pytest.importorskip("websocket", reason="websocket-client is a dev dependency")
    instance = Browser(chromium)
    yield instance
    instance.close()


@pytest.fixture(scope="module")
def sample_report(sample_store, tmp_path_factory):
    return build_report(sample_store, tmp_path_factory.mktemp("browser") / "report")


IMAGES = """(() => Array.from(document.images).map(i => ({src: i.src.slice(0, 22),
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})))()"""


def test_sample_report_loads_clean_offline_and_decodes_every_image(browser, sample_report):
    browser.open(sample_report.html)
    assert browser.console_errors() == []
    assert browser.network_requests() == []
    images = browser.evaluate(IMAGES)
    assert len(images) == len(sample_report.model["figures"]) > 5
    for image in images:
        assert image["src"] == "data:image/png;base64,"
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
    assert browser.evaluate("document.scripts.length") == 0
    # the diagnosis heads the page: each run's status line and its entropy-with-performance
    # figure start on the first screen (900 px tall); every verdict links into the page
    tops = browser.evaluate("""Array.from(document.querySelectorAll('.diagnosis')).map(d =>
        [d.querySelector('.status').getBoundingClientRect().top,
         d.querySelector('img').getBoundingClientRect().top])""")
    assert len(tops) == len(sample_report.model["runs"]) == 2
    assert all(0 < status < 900 and 0 < image < 900 for status, image in tops), tops
    missing = browser.evaluate("""Array.from(document.querySelectorAll('#verdicts a.go'))
        .map(a => a.getAttribute('href').slice(1)).filter(id => !document.getElementById(id))""")
    assert missing == []
    browser.screenshot(Path(tempfile.gettempdir()) / "entropylens-report-first-screen.png")


def test_a_script_in_a_completion_shows_as_text(browser, tmp_path):
    from test_report import SCRIPT, tricky_store

    report = build_report(tricky_store(tmp_path / "store"), tmp_path / "report")
    browser.open(report.html)
    assert browser.dialogs() == []
    assert browser.console_errors() == []
    assert browser.network_requests() == []
    assert browser.evaluate("document.scripts.length") == 0
    texts = browser.evaluate(
        "Array.from(document.querySelectorAll('.tokens, .plain')).map(e => e.textContent)")
    assert any(SCRIPT in text for text in texts)
    assert browser.evaluate(f"document.body.innerText.includes({json.dumps(SCRIPT)})")
    marked = browser.evaluate("document.querySelectorAll('.tok.fork').length")
    assert marked > 0
