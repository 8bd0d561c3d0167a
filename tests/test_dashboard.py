"""The dashboard in a real headless browser (Debian's chromium, driven by selenium through chromedriver): it loads
with no console error, shows the cluster's nodes and partitions and the queues, and follows a node that stops.

``SHOALMQ_DASHBOARD_SCREENSHOT=path`` keeps a screenshot there (how ``docs/dashboard.png`` is made)."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_support import Cluster
from tests.support import EtcdProcess, MqttClient, wait_until

pytestmark = pytest.mark.timeout(150)

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromium-driver (Debian packages) are needed: make test"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def rows(driver: Any, table: str) -> list[list[str]]:
    """The table's cells as text, read in one go (the page rewrites them every refresh)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(r => [...r.cells].map(c => c.textContent))",
        f"#{table} tbody tr")


def text_of(driver: Any, element_id: str) -> str:
    return driver.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def test_the_dashboard_shows_the_cluster_live_and_follows_a_node_that_stops(
        etcd: EtcdProcess, tmp_path: Path, browser: Any, mqtt_client: Callable[..., MqttClient]) -> None:
    cluster = Cluster(etcd, tmp_path / "cluster", queues={"orders": 12, "billing": 4})
    try:
        a, b, c = (cluster.add(n) for n in ("n1", "n2", "n3"))
        cluster.wait_settled("orders", 12)
        cluster.wait_settled("billing", 4)
        publisher = mqtt_client(a.port)
        for i in range(60):
            publisher.publish(f"$queue/orders/k{i}", b"o")
        for i in range(8):
            publisher.publish(f"$queue/billing/k{i}", b"b")

        browser.get(a.http + "/")
        assert browser.title == "ShoalMQ"
        wait_until(lambda: [r[:2] for r in rows(browser, "members")] == [
            ["n1 (this node)", "ready"], ["n2", "ready"], ["n3", "ready"]], 20, "three ready nodes on the page")
        wait_until(lambda: text_of(browser, "partition-summary").startswith(
            "16 partition(s) of 2 queue(s) on 3 node(s)"), 20, "the partition map")
        wait_until(lambda: [r[:3] for r in rows(browser, "queues")] == [["billing", "4", "8"], ["orders", "12", "60"]],
                   20, "the queue table")
        assert int(browser.find_element("id", "map").get_attribute("data-partitions")) == 16
        shot = os.environ.get("SHOALMQ_DASHBOARD_SCREENSHOT")
        if shot:
            browser.save_screenshot(shot)
        browser.save_screenshot(str(tmp_path / "dashboard.png"))

        c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert c.proc.wait(60) == 0  # type: ignore[union-attr]
        wait_until(lambda: [r[0] for r in rows(browser, "members")] == ["n1 (this node)", "n2"], 30,
                   "the stopped node gone from the page")
        wait_until(lambda: "on 2 node(s)" in (summary := text_of(browser, "partition-summary")) and "n3" not in summary,
                   30, "the map redrawn")
        refreshes = int(browser.find_element("tag name", "body").get_attribute("data-refreshes"))
        wait_until(lambda: int(browser.find_element("tag name", "body").get_attribute("data-refreshes")) > refreshes,
                   10, "the page refreshing on its own")
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        cluster.stop()
