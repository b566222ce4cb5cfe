#!/usr/bin/env python3
"""The web page of taskmoe-serve in a real headless Chromium: translate one pair, take a screenshot.

    .venv/bin/python scripts/serve_screenshot.py     # the demo model -> docs/img/serve_page.png
    .venv/bin/python scripts/serve_screenshot.py --pair de-fr --text "Ein Hund läuft im Schnee."

Starts the real `taskmoe-serve` on 127.0.0.1 (a free port; defaults: the demo's checkpoint, data
and SentencePiece model under work/demo), opens `/` in Debian's Chromium (/usr/bin/chromium,
driven by /usr/bin/chromedriver through Selenium; `apt-get install chromium chromium-driver`),
picks the pair, types, clicks Translate, waits for the answer and the expert table, and saves a
screenshot of the whole page. The server is always stopped. tests/test_serve_browser.py drives
the page with the same functions.
"""

import argparse
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research.bench.load import REPO, running  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


@contextmanager
def chromium(width: int = 1200, height: int = 1000, timeout: float = 60.0):
    """A headless Chromium with a fresh profile, quit (and its profile deleted) on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="taskmoe-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}",
                                      f"--window-size={width},{height}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            driver.set_page_load_timeout(timeout)
            driver.set_script_timeout(timeout)
            yield driver
        finally:
            driver.quit()


def open_page(driver, url: str, timeout: float = 60.0):
    """Load the page and wait until it has read /languages."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.ready === 'true' || "
                                   "!document.getElementById('error').hidden"))
    error = driver.find_element("id", "error")
    if error.is_displayed():
        raise AssertionError(f"the page shows an error after loading: {error.text}")


def translate_in_page(driver, source: str, target: str, text: str, timeout: float = 120.0,
                      use_keyboard: bool = False) -> dict:
    """Choose the pair, type, translate (click, or Ctrl+Enter), wait; what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    Select(driver.find_element(By.ID, "source")).select_by_value(source)
    Select(driver.find_element(By.ID, "target")).select_by_value(target)
    box = driver.find_element(By.ID, "text")
    box.clear()
    box.send_keys(text)
    driver.execute_script("document.body.dataset.state = ''")
    if use_keyboard:
        box.send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        driver.find_element(By.ID, "translate").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") in ("done", "error"))
    if driver.execute_script("return document.body.dataset.state") == "error":
        raise AssertionError(f"the page shows an error: {driver.find_element(By.ID, 'error').text}")
    # "done" is set once the sub-network panel of the pair (the detected one with auto) is drawn
    heading = driver.find_element(By.ID, "subnet-h").text
    if source != "auto" and not heading.endswith(f"{source}-{target}"):
        raise AssertionError(f"the sub-network panel shows {heading!r}, not {source}-{target}")
    route = driver.find_element(By.ID, "route")
    legs = []
    for leg in driver.find_elements(By.CSS_SELECTOR, "#experts .leg"):
        rows = [[c.text for c in row.find_elements(By.CSS_SELECTOR, "th, td")]
                for row in leg.find_elements(By.CSS_SELECTOR, "table.experts-table tbody tr")]
        legs.append({"leg": leg.get_attribute("data-leg"),
                     "title": leg.find_element(By.TAG_NAME, "h3").text,
                     "size": leg.find_element(By.CLASS_NAME, "size-text").text, "rows": rows})
    return {"output": driver.find_element(By.ID, "output").text,
            "route": route.text, "route_kind": route.get_attribute("data-kind"),
            "time": driver.find_element(By.ID, "time").text,
            "detected": driver.find_element(By.ID, "detected").text, "legs": legs}


def full_page_screenshot(driver, path: Path, width: int = 1200):
    """The whole page: the window grown until the page no longer scrolls (at most 4000 px)."""
    size = "return [document.documentElement.scrollHeight, window.innerHeight]"
    for _ in range(4):
        page, inner = driver.execute_script(size)
        if page <= inner:
            break
        outer = driver.get_window_size()["height"]
        driver.set_window_size(width, min(outer + page - inner, 4000))
        time.sleep(0.3)  # let the layout settle at the new size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    driver.save_screenshot(str(tmp))
    tmp.replace(path)


def main(argv=None):
    demo = REPO / "work" / "demo"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(demo / "checkpoints" / "checkpoint_last.pt"))
    p.add_argument("--data", default=str(demo / "multi30k" / "bin"))
    p.add_argument("--spm-model", default=str(demo / "multi30k" / "spm.model"),
                   help="'' for a model without SentencePiece")
    p.add_argument("--cache-dir", default=str(demo / "serve-cache"))
    p.add_argument("--pair", default="de-fr")
    p.add_argument("--text", default="Ein Mann fährt mit dem Fahrrad durch die Stadt.")
    p.add_argument("--out", default=str(REPO / "docs" / "img" / "serve_page.png"))
    p.add_argument("--server-args", default="", help="more taskmoe-serve flags")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).exists():
        sys.exit(f"serve_screenshot: {args.checkpoint} is missing: run `make demo` first")
    extra = ["--cache-dir", args.cache_dir, "--log-level", "warning", *args.server_args.split()]
    if args.spm_model:
        extra += ["--spm-model", args.spm_model]
    src, tgt = args.pair.split("-")
    log = Path(args.cache_dir) / "screenshot-server.log"
    with running(args.checkpoint, args.data, extra, log, 900) as server, chromium() as driver:
        open_page(driver, server.url)
        shown = translate_in_page(driver, src, tgt, args.text)
        full_page_screenshot(driver, Path(args.out))
    print(f"{args.pair}: {shown['output']!r} ({shown['route']}, {shown['time']}); "
          f"screenshot {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
