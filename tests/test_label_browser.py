"""The ranking page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium. One prompt is ranked with the keyboard (numbers,
a tie with `=`, arrows), one by dragging, then the server is killed with SIGKILL,
restarted, resumes at the first unranked prompt, and undo, skip and history work; the
JSONL written is checked after each step, and a response holding `<script>` must show as
text without running.

Skipped only when /usr/bin/chromium is absent and the CI variable is unset; under CI a
missing browser fails. Set FLAXLM_LABEL_SCREENSHOT=PATH to save the README's screenshot.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import missing, require

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

if not os.path.exists(CHROMIUM):
    missing(CHROMIUM, "apt-get install chromium chromium-driver")
require("selenium", "pip install selenium (the [test] extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCRIPT = "<script>window.pwned = 1</script><b>bold?</b>"
CANDIDATES = [
    {"prompt": "shout abc", "responses": ["ABc", "ABC", SCRIPT, "abc"]},
    {"prompt": "shout xyz", "responses": ["XYz", "XYZ", "xyz"]},
    {"prompt": "shout q", "responses": ["Q", "q"]},
]


def stop_server(proc: subprocess.Popen) -> None:
    """After SIGINT the server must exit 0 (Ctrl-C); a hang is killed and reported."""
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        output = proc.communicate()[0].decode(errors="replace")
        pytest.fail(f"flaxlm label ignored SIGINT for 30 s; its output:\n{output[-2000:]}")
    assert code == 0, code


def start_server(workdir: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """`flaxlm label` in a child process; returns it and the URL it printed."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrate.cli",
            "label",
            "--workdir",
            str(workdir),
            "--port",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"USER": "ann"},
    )
    deadline, seen = time.time() + 20, b""
    while time.time() < deadline and proc.poll() is None:  # raw reads: no hidden buffer
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
            for line in seen.decode().splitlines():
                if line.startswith("open http"):
                    return proc, line.split()[1]
    proc.kill()
    raise AssertionError(f"the server did not print its URL: {seen!r}")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="flaxlm-chromium-")
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1100,900",
    ):  # fmt: skip
        options.add_argument(flag)
    # A driver path given to the Service means Selenium Manager never runs (no download).
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)  # else each test leaves a 2.4 MB profile in /tmp


def records(workdir: pathlib.Path, name: str = "ranked.jsonl") -> list[dict]:
    path = workdir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(driver, predicate, what: str):
    return WebDriverWait(driver, 10, 0.05).until(lambda d: predicate(d), message=what)


def progress(driver) -> str:
    return driver.find_element(By.ID, "progress").text


def card(driver, k: int):
    return driver.find_element(By.CSS_SELECTOR, f'.card[data-r="{k}"]')


def tiers(driver) -> list[list[int]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#tiers .tier")
    return [[int(c.get_attribute("data-r")) for c in r.find_elements(By.CLASS_NAME, "card")]
            for r in rows]  # fmt: skip


def drag(driver, k: int, target) -> None:
    ActionChains(driver).click_and_hold(card(driver, k)).move_by_offset(8, 8).move_to_element(
        target
    ).release().perform()


def test_rank_by_keyboard_and_drag_kill_restart_undo(tmp_path, browser):
    (tmp_path / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
    proc, url = start_server(tmp_path)
    try:
        browser.get(url)
        wait_for(browser, lambda d: d.find_element(By.ID, "prompt").text == "shout abc", "prompt 1")
        assert progress(browser).startswith("prompt 1 of 3")
        assert browser.find_element(By.ID, "labeler").get_attribute("value") == "ann"
        # Model output is text: the script shows literally and never ran.
        assert card(browser, 2).find_element(By.CLASS_NAME, "text").text == SCRIPT
        assert browser.execute_script("return window.pwned") is None
        assert not browser.find_elements(By.CSS_SELECTOR, "#work script, #work b")

        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("2", "1", "3", "4")  # one row each, in that order
        assert tiers(browser) == [[1], [0], [2], [3]]
        body.send_keys(Keys.SHIFT + Keys.ARROW_UP)  # focused #4 joins the row above: a tie
        assert tiers(browser) == [[1], [0], [2, 3]]
        body.send_keys(Keys.ARROW_UP)  # focus to #3
        body.send_keys(Keys.SHIFT + Keys.ARROW_UP)  # out of the tie, above #4
        assert tiers(browser) == [[1], [0], [2], [3]]
        body.send_keys(Keys.SHIFT + Keys.ARROW_UP)  # ties with #1
        assert tiers(browser) == [[1], [0, 2], [3]]
        if os.environ.get("FLAXLM_LABEL_SCREENSHOT"):
            browser.set_window_size(900, 760)
            browser.save_screenshot(os.environ["FLAXLM_LABEL_SCREENSHOT"])
        body.send_keys(Keys.ENTER)
        wait_for(browser, lambda d: progress(d).startswith("prompt 2 of 3"), "prompt 2")
        first = records(tmp_path)
        assert [(r["prompt"], r["ranking"], r["labeler"]) for r in first] == [
            ("shout abc", [1, 0, 1, 2], "ann")
        ]

        body.send_keys(Keys.ENTER)  # nothing placed yet: refused on the page, nothing sent
        assert "3 not ranked yet" in browser.find_element(By.ID, "message").text
        # Prompt 2 by dragging: #2 into the ranking, #1 onto its row (tie), #3 above both.
        drag(browser, 1, browser.find_element(By.CSS_SELECTOR, '.gap[data-gap="0"]'))
        assert tiers(browser) == [[1]]
        drag(browser, 0, browser.find_element(By.CSS_SELECTOR, '.tier[data-tier="0"]'))
        assert tiers(browser) == [[1, 0]]
        drag(browser, 2, browser.find_element(By.CSS_SELECTOR, '.gap[data-gap="0"]'))
        assert tiers(browser) == [[2], [1, 0]]
        browser.find_element(By.ID, "submit").click()
        wait_for(browser, lambda d: progress(d).startswith("prompt 3 of 3"), "prompt 3")
        assert [r["ranking"] for r in records(tmp_path)] == [[1, 0, 1, 2], [1, 1, 0]]
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to flush anything: answers must be on disk
        proc.wait()

    assert len(records(tmp_path)) == 2
    proc, url = start_server(tmp_path)
    try:
        browser.get(url)  # a new token: the page resumes at the first unranked prompt
        wait_for(browser, lambda d: d.find_element(By.ID, "prompt").text == "shout q", "resume")
        assert progress(browser).startswith("prompt 3 of 3")
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("u")  # undo brings prompt 2 back with its ranking
        wait_for(browser, lambda d: d.find_element(By.ID, "prompt").text == "shout xyz", "undo")
        assert tiers(browser) == [[2], [0, 1]]
        assert len(records(tmp_path)) == 1
        body.send_keys(Keys.ENTER)
        wait_for(browser, lambda d: d.find_element(By.ID, "prompt").text == "shout q", "again")
        body.send_keys("1", "=", "2", Keys.ENTER)  # all tied: the server's message shows
        message = browser.find_element(By.ID, "message")
        wait_for(browser, lambda d: "all responses tied" in message.text, "tie refused")
        body.send_keys("s")
        wait_for(browser, lambda d: progress(d).startswith("all 3 answered"), "skip")
        assert [r["ranking"] for r in records(tmp_path)] == [[1, 0, 1, 2], [1, 1, 0]]
        assert [r["prompt"] for r in records(tmp_path, "skipped.jsonl")] == ["shout q"]
        body.send_keys("h")
        entries = "#history-list > li"
        wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, entries)) == 3, "history")
        latest = browser.find_element(By.CSS_SELECTOR, "#history-list > li")
        assert "skipped" in latest.text and "shout q" in latest.text
    finally:
        proc.send_signal(signal.SIGINT)
        stop_server(proc)
