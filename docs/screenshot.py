"""How ``docs/dashboard.png`` is made: ``.venv/bin/python docs/screenshot.py [PATH]``.

A 3-node cluster on a throwaway etcd (replication factor 3), three queues (orders 12 partitions, billing 4,
emails 8), publishers on all three and a consumer on orders, then Debian's chromium (headless, through selenium)
on the first node's dashboard, given a few seconds of traffic so that the rate charts have something to show.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_support import Cluster, Drain, LoadPublisher  # noqa: E402
from tests.support import EtcdProcess, wait_until  # noqa: E402


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "dashboard.png"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="shoalmq-shot-") as tmp:
        work = Path(tmp)
        etcd = EtcdProcess(work / "etcd")
        etcd.start()
        cluster = Cluster(etcd, work / "cluster", queues={"orders": 12, "billing": 4, "emails": 8},
                          args=["--replication-factor", "3"])
        loads: list[LoadPublisher] = []
        drain = None
        driver = None
        try:
            nodes = [cluster.add(n) for n in ("n1", "n2", "n3")]
            for queue, count in (("orders", 12), ("billing", 4), ("emails", 8)):
                wait_until(lambda q=queue, c=count: len(cluster.owners(q)) == c, 30, f"{queue} led")
            loads = [LoadPublisher(nodes[i].port, queue).start()
                     for i, queue in enumerate(("orders", "billing", "emails"))]
            drain = Drain(nodes[2].port, "orders")
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
            for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1400,1000", f"--user-data-dir={work / 'chromium'}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options,
                                      service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
            driver.get(nodes[0].http + "/")
            wait_until(lambda: int(driver.execute_script("return document.body.dataset.refreshes || 0")) >= 30,
                       90, "thirty refreshes of the page (45 s of traffic on the rate charts)")
            driver.save_screenshot(str(target))
            print(f"saved {target}")
        finally:
            if driver is not None:
                driver.quit()
            for load in loads:
                load.stop()
            if drain is not None:
                drain.stop()
            cluster.stop()
            etcd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
