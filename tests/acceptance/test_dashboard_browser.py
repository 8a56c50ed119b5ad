"""The dashboard in a real browser: the system's headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``make test`` / ``.ci/run``), driven by Selenium, opens the site
from disk (``file://``, no server) and must show no console error, load nothing from the network,
list every alive atom, sort the table, and render an atom page's contexts and plots.

A screenshot of each page is kept under ``test-artifacts/dashboard/`` (ignored by git). Without
Chromium the test is skipped, unless ``WRITESAE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes
that a failure.
"""

import os
import shutil
from pathlib import Path

import pytest

import writesae_lens  # noqa: F401
from hooked_ssm import HookedSSM
from writesae_lens.cli import load_sae
from writesae_lens.dashboard import DashboardConfig, build_dashboard
from writesae_lens.interventions.tokens import token_windows, toy_validation_texts
from writesae_lens.demo import toy_sae_id

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
REQUIRED = os.environ.get("WRITESAE_REQUIRE_BROWSER") == "1"


def _missing(reason: str) -> None:
    message = f"{reason}: install it with `apt-get install -y chromium chromium-driver` (Debian) and `pip install selenium`."
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        _missing("headless Chromium or its driver is not on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which could download a driver) never runs.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    model = HookedSSM.from_pretrained("toy-gdn")
    sae = load_sae("writesae-toy-gdn/" + toy_sae_id(site="write"))
    tokens = token_windows(model, toy_validation_texts(), 64, 3)
    out = tmp_path_factory.mktemp("dashboard")
    data = build_dashboard(model, sae, tokens, out, config=DashboardConfig(n_contexts=4, min_firings=10), progress=False,
                           substitution_rows=[dict(atom=a, prompt=p, position=5, kl_atom=0.1 * p, kl_delete=0.2, kl_random=0.5)
                                              for a in range(512) for p in range(4)])
    return out, data


def _open(driver, path: Path, plot: str) -> list[dict]:
    """Load ``path``, wait until Plotly has drawn ``#plot``, and return the console's messages."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(f"return !!document.querySelector('#{plot} .main-svg')"))
    return driver.get_log("browser")


def _no_errors_nor_network(driver, log: list[dict]) -> None:
    errors = [entry for entry in log if entry["level"] == "SEVERE"]
    assert not errors, errors
    # Every script, stylesheet and link resolves to a file (no CDN), and Plotly came from assets/.
    urls = driver.execute_script("return Array.from(document.querySelectorAll('script[src], link[href], a[href]'))"
                                 ".map(e => e.src || e.href)")
    assert urls and all(url.startswith("file://") for url in urls), urls
    assert driver.execute_script("return typeof window.Plotly") == "object"


def test_index_and_atom_page_in_chromium(browser, site):
    from selenium.webdriver.common.by import By

    out, data = site
    atoms = data["atoms"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    log = _open(browser, out / "index.html", "overview")
    _no_errors_nor_network(browser, log)
    rows = browser.find_elements(By.CSS_SELECTOR, "#atoms tbody tr")
    assert len(rows) == len(atoms) == int(browser.find_element(By.ID, "n-alive").text) > 1
    # Sorting by firings (descending on the first click) puts the most frequent atom first.
    header = next(th for th in browser.find_elements(By.CSS_SELECTOR, "#atoms thead th") if th.text == "firings")
    header.click()
    firings = [int(td.text) for td in browser.find_elements(By.CSS_SELECTOR, "#atoms tbody tr td:nth-child(3)")]
    assert firings == sorted((a["n_firings"] for a in atoms), reverse=True)
    browser.save_screenshot(str(ARTIFACTS / "index.png"))

    atom = atoms[0]
    log = _open(browser, out / "atoms" / f"{atom['atom']}.html", "histogram")
    _no_errors_nor_network(browser, log)
    for plot in ("logits", "substitution"):
        assert browser.execute_script(f"return !!document.querySelector('#{plot} .main-svg')"), plot
    top = browser.find_elements(By.CSS_SELECTOR, "#top-contexts .context")
    read = browser.find_elements(By.CSS_SELECTOR, "#read-contexts .context")
    assert len(top) == len(atom["top_contexts"]) > 0 and len(read) == len(atom["read_contexts"]) > 0
    tokens = top[0].find_elements(By.CSS_SELECTOR, ".tok")
    assert len(tokens) == len(atom["top_contexts"][0]["tokens"])
    assert len(top[0].find_elements(By.CSS_SELECTOR, ".tok.focus")) == 1
    assert "n = 4" in browser.find_element(By.ID, "win-rate").text
    browser.save_screenshot(str(ARTIFACTS / "atom.png"))
    assert (ARTIFACTS / "atom.png").stat().st_size > 10_000
