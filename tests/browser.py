"""A real browser for the tests: headless Chromium driven through Selenium.

The browser and its driver are the system's (Debian: ``apt-get install
chromium chromium-driver``; .ci/run does): Selenium is given the driver's path,
so its Selenium Manager never looks for one, nor downloads anything. Without
them the tests that need a browser skip, saying how to install it, unless
``FLEXSERVE_TEST_BROWSER=required`` (set by .ci/run), when they fail.

The browser's console log is kept (``browser_problems``), so a test can see a
Content-Security-Policy violation or a script error on the pages it visited.
``screenshot`` saves what the browser shows when ``FLEXSERVE_SCREENSHOT_DIR``
is set (docs/dashboard.md: how the documentation's screenshots are made).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from installed import find_binary, unavailable

HOW_TO_ENABLE = (
    "Chromium or its driver is not installed: the tests in a real browser did not run. "
    "Install them (Debian: apt-get install chromium chromium-driver; .ci/run does) to run them."
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WAIT = 30.0  # seconds a test waits for a page, at most (a wait, not a measurement)


NO_SELENIUM = "Selenium is not installed: the tests in a real browser did not run (pip install -e '.[test]')."


def find_browser() -> tuple[str, str] | None:
    """(the browser, its driver), if both are installed."""
    driver = find_binary("chromedriver")
    browser = next((found for name in BROWSERS if (found := find_binary(name))), None)
    return (browser, driver) if browser and driver else None


def require_browser() -> tuple[str, str]:
    """The browser and its driver; else skip (or fail where they are required)."""
    found = find_browser()
    missing = (HOW_TO_ENABLE if found is None
               else NO_SELENIUM if importlib.util.find_spec("selenium") is None else None)
    if missing is not None:
        unavailable("BROWSER", missing)
    assert found is not None
    return found


def new_driver(width: int = 1280, height: int = 1600) -> Any:
    """A headless Chromium WebDriver, its console log kept. Quit it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = require_browser()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}",
                     # Nothing but the pages the tests open: no updates, no sync, no first-run.
                     "--no-first-run", "--disable-background-networking", "--disable-sync",
                     "--disable-component-update", "--disable-default-apps", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def forget_everything(driver: Any) -> None:
    """A blank page, no cookies (of any host or path), an empty console log."""
    driver.get("about:blank")
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.get_log("browser")  # reading the log empties it


def _favicon_missing(entry: dict[str, Any]) -> bool:
    """Chromium asks every host for /favicon.ico on its own; the gateway has none."""
    message = str(entry.get("message", ""))
    return entry.get("source") == "network" and "/favicon.ico - " in message and "status of 404" in message


def browser_problems(driver: Any) -> list[dict[str, Any]]:
    """The console's errors and warnings since it was last read (Chromium
    reports a Content-Security-Policy violation there, as SEVERE), and any
    entry that names the Content Security Policy whatever its level; not the
    missing favicon, which no page asked for."""
    return [entry for entry in driver.get_log("browser")
            if (entry.get("level") in ("SEVERE", "WARNING")
                or "content security policy" in str(entry.get("message", "")).lower())
            and not _favicon_missing(entry)]


def wait_for_page(driver: Any, old: Any) -> None:
    """Wait until the browser has left the page ``old`` (an element of it) and
    loaded the next one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    # Mid-navigation, ChromeDriver may answer with an "unhandled inspector error"
    # ("Node with given id does not belong to the document") rather than a stale
    # element: asked again, it answers.
    wait = WebDriverWait(driver, WAIT, ignored_exceptions=(WebDriverException,))
    wait.until(expected_conditions.staleness_of(old))
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def sign_in(driver: Any, base_url: str, key: str) -> None:
    """Open ``/dashboard``, type ``key`` into the sign-in form and send it, as a
    person would; returns once the answer's page has loaded."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base_url}/dashboard")
    field = driver.find_element(By.CSS_SELECTOR, 'form[action="/dashboard/login"] input[name="key"]')
    assert field.get_attribute("type") == "password"
    field.send_keys(key)
    button = driver.find_element(By.CSS_SELECTOR, 'form[action="/dashboard/login"] button[type="submit"]')
    button.click()
    wait_for_page(driver, button)


def screenshot(driver: Any, name: str) -> Path | None:
    """Save the whole page as ``$FLEXSERVE_SCREENSHOT_DIR/NAME.png`` (as wide
    as the window, as tall as the page); nothing when that is not set."""
    from selenium.webdriver.common.by import By

    folder = os.environ.get("FLEXSERVE_SCREENSHOT_DIR")
    if not folder:
        return None
    path = Path(folder) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.find_element(By.TAG_NAME, "html").screenshot(str(path)), path
    return path
