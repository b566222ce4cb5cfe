"""The web page of taskmoe-serve in a real headless browser: Debian's Chromium driven by Selenium,
against the real `taskmoe-serve` command on 127.0.0.1 over a tiny trained task-MoE (languages en,
de, fr; trained en-de, de-en, en-fr; so de-fr is served through en).

Needs /usr/bin/chromium and /usr/bin/chromedriver (`make test` installs them as root on Debian:
target system-deps) and the selenium package; skipped, saying why, without them. Bounded: every
wait has a deadline, and the server and the browser are stopped whatever happens."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

httpx = pytest.importorskip("httpx")
pytest.importorskip("selenium", reason="pip install selenium (make venv does)")
for _path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
    if not os.access(_path, os.X_OK):
        pytest.skip(f"{_path} is missing: apt-get install chromium chromium-driver (make "
                    "system-deps)", allow_module_level=True)
pytest.importorskip("ctranslate2")

from research.bench.load import running  # noqa: E402
from serve_screenshot import chromium, full_page_screenshot, open_page, translate_in_page  # noqa

TEXT = "e1 e5 e7 e2"  # tiny_data: en words e0..e11, de d0..d11, fr f0..f11


@pytest.fixture(scope="module")
def server(tiny_data, trained_tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("browser-serve")
    with running(trained_tiny, tiny_data,
                 ["--cache-dir", work / "cache", "--char-limit", "500", "--log-level", "warning"],
                 work / "server.log", timeout=300) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        yield srv


@pytest.fixture(scope="module")
def browser():
    with chromium(timeout=60) as driver:
        yield driver


def api_translate(url, q, source, target):
    answer = httpx.post(url + "/translate", json={"q": q, "source": source, "target": target},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_page_is_served_and_accessible(server, browser):
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # self-contained: no script, style or link fetched from anywhere else
    assert "<script src=" not in page.text and "http://" not in page.text \
        and "https://" not in page.text
    assert "/" not in {p for p in httpx.get(server.url + "/openapi.json").json()["paths"]}
    open_page(browser, server.url)
    assert browser.title == "taskmoe-serve"
    by_id = browser.find_element
    sources = [o.get_attribute("value") for o in by_id("id", "source").find_elements(
        "tag name", "option")]
    assert sources == ["auto", "en", "de", "fr"]
    for control in ("source", "target", "text"):  # every control has its label
        assert browser.find_elements("css selector", f"label[for='{control}']"), control
    assert by_id("id", "error").get_attribute("role") == "alert"
    assert by_id("id", "output").get_attribute("aria-live") == "polite"
    # fr was never a training source: the page offers no target rather than a broken pair
    from selenium.webdriver.support.ui import Select

    Select(by_id("id", "source")).select_by_value("fr")
    assert by_id("id", "target").get_attribute("disabled") == "true"
    assert by_id("id", "translate").get_attribute("disabled") == "true"


def test_direct_and_pivot_pairs_match_the_api(server, browser, tmp_path):
    open_page(browser, server.url)
    direct = translate_in_page(browser, "en", "de", TEXT)
    want = api_translate(server.url, TEXT, "en", "de")
    assert want["route"] == {"kind": "direct", "via": None}
    assert direct["output"] == want["translatedText"] and direct["output"].strip()
    assert direct["route"] == "direct" and direct["route_kind"] == "direct"
    assert direct["time"].endswith(" ms") or direct["time"].endswith(" s")
    [leg] = direct["legs"]
    assert leg["leg"] == "en-de" and "sub-network *-de" in leg["title"]
    assert "% of the full model" in leg["size"]
    layers = {row[0]: row for row in leg["rows"]}
    assert set(layers) == {"encoder.layers.1", "decoder.layers.1"}  # the tiny model's MoE layers
    info = httpx.get(server.url + "/pairs/en-de", timeout=30).json()
    kept = info["subnetworks"][0]["layers"][1]["kept"]["de"]
    shown = layers[info["subnetworks"][0]["layers"][1]["name"]][2]
    assert all(f"{e} ({w:.2f})" in shown for e, w in kept)  # the experts this pair keeps

    # pivot, translated with the keyboard (Ctrl+Enter)
    pivot = translate_in_page(browser, "de", "fr", "d1 d5 d7 d2", use_keyboard=True)
    want = api_translate(server.url, "d1 d5 d7 d2", "de", "fr")
    assert want["route"] == {"kind": "pivot", "via": "en"}
    assert pivot["output"] == want["translatedText"]
    assert pivot["route"] == "pivot via en" and pivot["route_kind"] == "pivot"
    assert [leg["leg"] for leg in pivot["legs"]] == ["de-en", "en-fr"]
    assert all(leg["rows"] for leg in pivot["legs"])
    # TASKMOE_SCREENSHOT=docs/img/serve_page.png keeps it (scripts/serve_screenshot.py does
    # the same on the demo model)
    shot = Path(os.environ.get("TASKMOE_SCREENSHOT") or tmp_path / "serve_page.png")
    full_page_screenshot(browser, shot)
    assert shot.stat().st_size > 10_000


def test_auto_detect_and_errors_are_shown(server, browser):
    open_page(browser, server.url)
    english = "the man and the dog"  # langid knows English function words
    auto = translate_in_page(browser, "auto", "de", english)
    want = httpx.post(server.url + "/translate", json={"q": english, "source": "auto",
                                                       "target": "de"}, timeout=60).json()
    assert auto["output"] == want["translatedText"]
    assert auto["detected"].startswith("English (en)")
    assert [leg["leg"] for leg in auto["legs"]] == ["en-de"]  # the detected pair's sub-network
    # an error of the API is shown in the alert box, with its hint, and the page keeps working
    with pytest.raises(AssertionError, match="could not detect the source language"):
        translate_in_page(browser, "auto", "de", "xyz", timeout=60)
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "give source" in error.text
    again = translate_in_page(browser, "en", "fr", TEXT)
    assert again["output"] == api_translate(server.url, TEXT, "en", "fr")["translatedText"]
    assert not browser.find_element("id", "error").is_displayed()
