"""Server time of `pagoda serve` for a 4×4 grid at the top stage: the median over repeated /api/sample requests.

    OMP_NUM_THREADS=2 .venv/bin/python bench/serve_latency.py --run runs/demo --out results/serve [--n 16 --requests 60]

Starts the server in this process on a free loopback port (pagoda.serve.make_server, the threads fixed by
OMP_NUM_THREADS / PAGODA_THREADS, else torch's default), warms it up (5 requests), then sends --requests requests one
after another, each with a new seed, as the page does on "next seed". Reports the median and 90th percentile of
  server   X-Server-Ms: request read -> PNG ready (what the page shows as "server")
  model    X-Compute-Ms: the worker's generate(0, n): z from (seed, i), one G call of n images
  trip     the client's round trip on loopback
with the load average before and after: run it alone (other processes' load inflates every figure). Writes
OUT/serve_latency.json.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time

import numpy as np
import torch

from common import environment, parser, print_table, write_results
from pagoda.serve import ServeConfig, make_server


def percentiles(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)), "min": float(min(values))}


def main() -> None:
    p = parser(__doc__, "serve")
    p.add_argument("--n", type=int, default=16, help="images per grid (4×4)")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--resolution", type=int, default=None, help="stage (default: the top one)")
    args = p.parse_args()
    load0 = os.getloadavg()
    srv = make_server(ServeConfig(checkpoint=args.run, port=0), quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
    rows = {"server": [], "model": [], "trip": []}
    try:
        for i in range(5 + args.requests):
            body = json.dumps({"seed": i, "n": args.n, "resolution": args.resolution})
            t0 = time.perf_counter()
            conn.request("POST", "/api/sample", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            trip = 1000 * (time.perf_counter() - t0)
            if r.status != 200:
                raise SystemExit(f"error: /api/sample answered {r.status}")
            if i >= 5:
                rows["server"].append(float(r.getheader("X-Server-Ms")))
                rows["model"].append(float(r.getheader("X-Compute-Ms")))
                rows["trip"].append(trip)
        resolution = int(r.getheader("X-Resolution"))
    finally:
        conn.close()
        srv.shutdown()
        srv.server_close()
        srv.app.close()
    stats = {k: percentiles(v) for k, v in rows.items()}
    payload = {"run": args.run, "n": args.n, "resolution": resolution, "requests": args.requests, "ms": stats,
               "loadavg_before": load0, "loadavg_after": os.getloadavg(), "environment": environment(torch.device("cpu"))}
    print_table(f"pagoda serve: {args.n} images at {resolution} px, {args.requests} requests, "
                f"{torch.get_num_threads()} threads, load {load0[0]:.2f} -> {payload['loadavg_after'][0]:.2f}",
                [{"what": k, **v} for k, v in stats.items()],
                [("what", "ms", ""), ("median", "median", ".1f"), ("p90", "p90", ".1f"), ("min", "min", ".1f")])
    write_results(args.out, "serve_latency", payload)


if __name__ == "__main__":
    main()
