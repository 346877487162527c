#!/usr/bin/env python3
"""User-space instructions per request of one build, counted by callgrind: unlike CPU time,
the same build, inputs and environment give the same count whatever else the machine is
doing, so two builds compare in one run each. Kernel work (the sockets) is not counted.

Run it on the database a `bench/run --users 30000` left seeded (the tokens are for users 1 to
--users); see bench/README.md, "Fifth pass".

    bench/instructions <binary> [--scenarios health,me,spend] [--connections 16] [--duration 10]

Under valgrind SHA-256 runs without the CPU's SHA instructions, so a token check (the cache
key, the HMAC) counts several times what it costs natively."""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--scenarios", default="health,me,spend")
    parser.add_argument("--users", type=int, default=30_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--database", default="amethyst_bench")
    args = parser.parse_args()
    for name in args.scenarios.split(","):
        if bench.SCENARIOS[name]["mode"] not in ("plain", "get", "spend"):
            raise SystemExit(f"{name}: only plain, get and spend scenarios are counted here")

    work = Path(tempfile.mkdtemp(prefix="amethyst-instructions-"))
    port = bench.free_port()
    env = dict(os.environ)
    env.pop("RUST_BACKTRACE", None)
    env.update({
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{args.database}",
        "BIND_ADDR": f"127.0.0.1:{port}", "SUPABASE_JWT_SECRET": bench.SECRET,
        "STRIPE_WEBHOOK_SECRET": bench.WEBHOOK_SECRET, "RATE_LIMIT_PER_MINUTE": "0",
        "DATABASE_MAX_CONNECTIONS": "16", "LOG_FORMAT": "json", "RUST_LOG": "warn",
    })
    out = work / "callgrind.out"
    service = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", args.binary, "serve", "--no-migrate"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the service did not start under valgrind")
            time.sleep(0.5)
        tokens = bench.write_tokens(work / "tokens", range(1, args.users + 1), int(time.time()))
        nothing = work / "none"
        nothing.write_text("-\n")
        for name in args.scenarios.split(","):
            spec = bench.SCENARIOS[name]
            url = f"http://127.0.0.1:{port}{spec['path']}"
            data = nothing if spec["mode"] == "plain" else tokens
            bench.run_wrk(url, spec["mode"], data, args.connections, 1, 2)  # warm-up, not counted
            subprocess.run(["callgrind_control", "-z", str(service.pid)], check=True, capture_output=True)
            http = bench.run_wrk(url, spec["mode"], data, args.connections, 1, args.duration)
            subprocess.run(["callgrind_control", "-d", name, str(service.pid)], check=True, capture_output=True)
            dump = max(glob.glob(f"{out}.*"), key=os.path.getmtime)
            total = int(re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M).group(1))
            print(f"{name}: {http['requests']} requests, {http['errors']} errors, "
                  f"{total / http['requests']:,.0f} instructions per request ({dump})", flush=True)
    finally:
        service.terminate()
        service.wait()


if __name__ == "__main__":
    main()
