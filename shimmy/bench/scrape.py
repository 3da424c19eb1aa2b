"""Does scraping /metrics slow publishers?  One-way throughput of shimmy (64 B and 4 KiB, copy
path) through a daemon with ``metrics_listen`` set, with nobody scraping and with a scraper
fetching /metrics SCRAPES_PER_S times a second (a hundred times Prometheus's usual 15 s
interval), repetitions interleaved.  The collector only reads shared-memory words, so the two
should be equal within the run's noise; on a 2-core machine the scrape's own CPU (HTTP and
text rendering in the daemon) still competes with the pinned workers, which this measures too.
"""

from __future__ import annotations

import copy
import threading
import time
import urllib.request

from . import harness, throughput

SIZES = [64, 4096]
SCRAPES_PER_S = 10.0


class Scraper:
    def __init__(self, url: str, per_s: float):
        self.url = url
        self.period = 1.0 / per_s
        self.scrapes = 0
        self.seconds = 0.0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-scraper", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as resp:
                self.bytes += len(resp.read())
            took = time.perf_counter() - t0
            self.scrapes += 1
            self.seconds += took
            self._stop.wait(max(self.period - took, 0))

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def run(ctx) -> dict:
    daemon = harness.Daemon({"metrics_listen": "127.0.0.1:0"}).start()
    sub_ctx = copy.copy(ctx)
    sub_ctx.daemon = daemon.socket
    url = daemon.metrics_url()
    v = dict(transport="shimmy", variant="copy", label="shimmy publish/bytes(msg)", opts={})
    pair = (harness.Worker("scrape-tx", ctx.cpu_a), harness.Worker("scrape-rx", ctx.cpu_b))
    runs: dict = {}
    scrape_s: list[float] = []
    try:
        for rep in range(ctx.reps):
            for size in SIZES:
                for scraped in (False, True):
                    if scraped:
                        with Scraper(url, SCRAPES_PER_S) as sc:
                            r = throughput.measure(sub_ctx, v, pair, size)
                        r["scrapes"] = sc.scrapes
                        if sc.scrapes:
                            scrape_s.append(sc.seconds / sc.scrapes)
                    else:
                        r = throughput.measure(sub_ctx, v, pair, size)
                    runs.setdefault((size, scraped), []).append(r)
            ctx.log(f"  scrape rep {rep + 1}/{ctx.reps} done")
    finally:
        harness.close_all(pair)
        daemon.stop()
    med = harness.median
    results = []
    for (size, scraped), rs in sorted(runs.items()):
        rate = med([r["n"] / r["rx_elapsed_s"] for r in rs])
        results.append({
            "transport": "shimmy", "variant": "scraped" if scraped else "unobserved",
            "label": f"shimmy, /metrics scraped {SCRAPES_PER_S:g}/s" if scraped
            else "shimmy, nobody scraping", "size": size, "reps": len(rs), "msgs_per_s": rate,
            "cpu_us_per_msg_tx": med([r["tx_cpu_s"] / r["n"] * 1e6 for r in rs]),
            "cpu_us_per_msg_rx": med([r["rx_cpu_s"] / r["n"] * 1e6 for r in rs]),
            "scrapes": sum(r.get("scrapes", 0) for r in rs), "runs": rs})
    for r in results:
        if r["variant"] == "scraped":
            base = next(x for x in results if x["size"] == r["size"] and x is not r)
            r["ratio_to_unobserved"] = r["msgs_per_s"] / base["msgs_per_s"]
    return {"results": results, "failed": {},
            "scrape_ms_median": med(scrape_s) * 1e3 if scrape_s else None,
            "placement": f"sender on CPU {ctx.cpu_a}, receiver on CPU {ctx.cpu_b}; scraper "
                         "thread in the benchmark's parent process, unpinned"}
