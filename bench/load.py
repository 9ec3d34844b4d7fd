#!/usr/bin/env python
"""Load test of `retriever serve` on loopback: concurrent image queries for a fixed time, then stop.

Starts the server with the toy models (an index of the 256 toy captions, toyworld-coca as
generator), runs --clients concurrent clients posting toy-world PNGs for --seconds, and reports
throughput, latency percentiles, errors (non-200 answers or failed connections), and the
server's RSS at the end of each minute and its peak (VmHWM).

    python bench/load.py --clients 16 --seconds 120 --mode retrieve
"""

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
from common import machine

from retriever.models import toyworld


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--mode", default="retrieve")
    args = parser.parse_args()
    print(f"machine: {machine()}")

    images = []
    for image, _ in toyworld.sample(32, seed=1):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "toy.txt"
        corpus.write_text("\n".join(toyworld.all_captions()) + "\n")
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(
            [
                sys.executable,
                "-m",
                "retriever",
                "build-index",
                str(corpus),
                "--model",
                "toyworld",
                "--out",
                f"{tmp}/toy",
                "--quiet",
            ],
            env=env,
            check=True,
        )
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "retriever",
                "serve",
                "--index",
                f"{tmp}/toy",
                "--generator",
                "toyworld-coca",
                "--port",
                str(port),
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def client(n: int) -> None:
            with httpx.Client(timeout=60) as http:
                i = n
                while time.perf_counter() < stop_at:
                    start = time.perf_counter()
                    try:
                        r = http.post(
                            url + "/v1/query",
                            files={"image": ("q.png", images[i % len(images)], "image/png")},
                            data={"k": "10", "mode": args.mode},
                        )
                        ok = r.status_code == 200
                        detail = f"{r.status_code}"
                    except httpx.HTTPError as e:
                        ok, detail = False, type(e).__name__
                    with lock:
                        (latencies if ok else errors).append(time.perf_counter() - start if ok else detail)
                    i += args.clients

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        rss_by_minute = []
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            elapsed = time.perf_counter() - began
            if elapsed >= 60 * (len(rss_by_minute) + 1):
                rss_by_minute.append(rss_kib(server.pid))
        for t in threads:
            t.join()
        duration = time.perf_counter() - began
        peak = rss_kib(server.pid, "VmHWM")
        server.terminate()
        server.wait(10)
    lat = np.array(latencies) * 1e3
    print(
        f"{args.clients} clients, {duration:.0f}s, mode {args.mode}: {len(latencies)} answered, {len(errors)} errors"
        f"{' (' + ', '.join(sorted(set(errors))) + ')' if errors else ''}"
    )
    print(
        f"throughput {len(latencies) / duration:.1f} queries/s; latency p50 {np.percentile(lat, 50):.0f} ms, "
        f"p95 {np.percentile(lat, 95):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms"
    )
    print(
        f"server RSS at each minute: {', '.join(f'{r / 1024:.0f} MiB' for r in rss_by_minute) or '-'}; peak {peak / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
