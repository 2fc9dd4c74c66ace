"""Open an MLflow UI link in a headless browser and save a PNG: a check that the links the harness prints land on the
runs (not on MLflow 3.x's GenAI "first trace" page).

    python scripts/mlflow_screenshot.py --store sqlite:///outputs/mlflow.db \
        --link 'http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning' --out shot.png
    (several --link: one server, PNGs shot.png, shot-2.png, ...)

Starts `mlflow ui` over the store on a free localhost port (never another host), rewrites the link's
`http://host:port` to it, and runs a headless Chromium (`apt-get install chromium-headless-shell` or `chromium`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"mlflow ui did not start on {url}") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="backend store URI, e.g. sqlite:///outputs/mlflow.db")
    p.add_argument("--link", required=True, action="append", help="a link the harness printed (its host:port is "
                                                                  "replaced); repeatable")
    p.add_argument("--out", default="mlflow_screenshot.png")
    p.add_argument("--size", default="1600,1000", help="window width,height")
    p.add_argument("--wait-ms", type=int, default=20000, help="virtual time for the page to load its data")
    p.add_argument("--artifacts", help="--default-artifact-root for mlflow ui (default: beside the SQLite file)")
    a = p.parse_args(argv)

    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        print(f"no headless browser found ({', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    links = [re.sub(r"^https?://[^/#]+", base, link) for link in a.link]
    outs = [Path(a.out) if i == 0 else Path(a.out).with_stem(f"{Path(a.out).stem}-{i + 1}") for i in range(len(links))]
    artifacts = a.artifacts
    if artifacts is None and a.store.startswith("sqlite:///"):
        artifacts = str(Path(a.store[len("sqlite:///"):]).parent / "mlartifacts")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", a.store, "--host", "127.0.0.1",
           "--port", str(port), *(["--default-artifact-root", artifacts] if artifacts else [])]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_up(base, server)
        for link, out in zip(links, outs):
            with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no UI state from the last page
                shot = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                       f"--user-data-dir={profile}", f"--window-size={a.size}",
                                       f"--virtual-time-budget={a.wait_ms}", f"--screenshot={out.resolve()}", link],
                                      capture_output=True, text=True, timeout=300)
            if shot.returncode != 0 or not out.exists():
                print(shot.stderr[-2000:], file=sys.stderr)
                return 1
            print(f"{link} -> {out}")
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
