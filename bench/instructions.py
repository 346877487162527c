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
    os.environ.pop("RUST_BACKTRACE", None)  # a backtrace per error value is not the service's cost
    out = work / "callgrind.out"
    db = bench.Database(argparse.Namespace(database=args.database, pg_host="127.0.0.1", pg_port=5432,
                                           pg_user="postgres"))
    service = bench.Service(Path(args.binary), db, 16,
                            wrapper=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"),
                            ready_within=120)
    try:
        tokens = bench.write_tokens(work / "tokens", range(1, args.users + 1), int(time.time()))
        nothing = work / "none"
        nothing.write_text("-\n")
        for name in args.scenarios.split(","):
            spec = bench.SCENARIOS[name]
            url = f"http://127.0.0.1:{service.port}{spec['path']}"
            data = nothing if spec["mode"] == "plain" else tokens
            bench.run_wrk(url, spec["mode"], data, args.connections, 1, 2)  # warm-up, not counted
            subprocess.run(["callgrind_control", "-z", str(service.process.pid)], check=True, capture_output=True)
            http = bench.run_wrk(url, spec["mode"], data, args.connections, 1, args.duration)
            subprocess.run(["callgrind_control", "-d", name, str(service.process.pid)], check=True, capture_output=True)
            dump = max(glob.glob(f"{out}.*"), key=os.path.getmtime)
            total = int(re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M).group(1))
            print(f"{name}: {http['requests']} requests, {http['errors']} errors, "
                  f"{total / http['requests']:,.0f} instructions per request ({dump})", flush=True)
    finally:
        service.stop()


if __name__ == "__main__":
    main()
