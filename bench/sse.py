"""The live balance under load: many idle event streams on one process, and how long a spend
takes to reach its user's stream while they are open. Run through bench/sse (see README.md).

Every stream is a plain HTTP/1.0 connection (the answer is then the bare event stream, with no
chunked framing to undo) held by one asyncio client. Spends go through one psql session in
autocommit; psql prints the function's answer once the spend is committed, so the time from
that answer to the event's arrival is the delay from commit to stream. The time from sending
the spend is reported too (it adds the spend's own execution).
"""

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

SECRET = "bench-only-jwt-secret-that-is-at-least-32-characters"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(user: str) -> str:
    now = int(time.time())
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "aud": "authenticated", "role": "authenticated",
                           "iat": now, "exp": now + 4 * 3600}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def psql(url: str, sql: str) -> str:
    return subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url, "-c", sql],
                          check=True, capture_output=True, text=True).stdout


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Streams:
    """The open streams: each reads its events and resolves the waiter of a transaction."""

    def __init__(self, port: int):
        self.port = port
        self.waiters: dict[str, asyncio.Future] = {}
        self.opened = 0
        # Users whose stream is open: the spends pick among them.
        self.connected: list[str] = []
        self.failed = 0

    async def open(self, user: str, ready: asyncio.Semaphore) -> None:
        async with ready:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(f"GET /v1/me/events HTTP/1.0\r\nHost: bench\r\n"
                             f"Authorization: Bearer {token(user)}\r\n\r\n".encode())
                await writer.drain()
                status = await reader.readline()
                if b" 200 " not in status:
                    raise RuntimeError(status.decode(errors="replace").strip())
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass
                first = await self.event(reader)
                if first is None or first[0] != "balance":
                    raise RuntimeError(f"first event: {first}")
            except Exception as err:  # noqa: BLE001 - counted and reported
                self.failed += 1
                if self.failed <= 3:
                    print(f"a stream failed to open: {err}", file=sys.stderr)
                return
            self.opened += 1
            self.connected.append(user)
        while True:
            event = await self.event(reader)
            if event is None:
                return
            name, data = event
            if name == "transaction":
                waiter = self.waiters.pop(user, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result((time.perf_counter(), data))

    @staticmethod
    async def event(reader):
        name, data = None, None
        while True:
            line = await reader.readline()
            if not line:
                return None
            line = line.rstrip(b"\n").decode()
            if line == "":
                if data is not None:
                    return name, json.loads(data)
                name, data = None, None
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()


class Spender:
    """One psql session in autocommit: a spend's answer comes once it is committed."""

    async def start(self, url: str):
        self.proc = await asyncio.create_subprocess_exec(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

    async def spend(self, user: str) -> float:
        self.proc.stdin.write(f"select (public.spend_credits('{user}', 1, 'bench', null)).seq;\n".encode())
        await self.proc.stdin.drain()
        await self.proc.stdout.readline()
        return time.perf_counter()


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--spends", type=int, default=1000)
    parser.add_argument("--database", default="amethyst_bench_sse")
    parser.add_argument("--server", default=os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args()

    base = args.server.rsplit("/", 1)[0]
    url = f"{base}/{args.database}"
    binary = os.environ.get("AMETHYST_BINARY") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "amethyst-credits")
    psql(args.server, f'drop database if exists "{args.database}" with (force)')
    subprocess.run([binary, "migrate"], check=True, env={**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"},
                   capture_output=True)
    print(f"seeding {args.streams} users", file=sys.stderr)
    psql(url, f"""
      insert into auth.users (id, email)
        select gen_random_uuid(), 'sse-' || i || '@bench.example' from generate_series(1, {args.streams}) i;
      select count(public.add_credits(p.id, 1000000, 'system', 'bench')) from public.profiles p;""")
    users = psql(url, "select id from public.profiles order by id").split()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [binary, "serve", "--no-migrate"],
        env={**os.environ, "DATABASE_URL": url, "BIND_ADDR": f"127.0.0.1:{port}",
             "SUPABASE_JWT_SECRET": SECRET, "RATE_LIMIT_PER_MINUTE": "0", "LOG_FORMAT": "json",
             "RUST_LOG": "warn", "DATABASE_MAX_CONNECTIONS": "10"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                    c.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                    if b" 200 " in c.recv(100):
                        break
            except OSError:
                pass
            await asyncio.sleep(0.25)
        await asyncio.sleep(1)
        idle_kib = rss_kib(server.pid)
        reset_peak(server.pid)

        streams = Streams(port)
        ready = asyncio.Semaphore(64)
        started = time.perf_counter()
        # Kept: the event loop holds only weak references to tasks.
        tasks = [asyncio.create_task(streams.open(user, ready)) for user in users]
        while streams.opened + streams.failed < len(users):
            await asyncio.sleep(0.2)
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(2)
        streams_kib = rss_kib(server.pid)
        print(f"{streams.opened} streams open ({streams.failed} failed) in {open_seconds:.1f} s; "
              f"RSS {idle_kib / 1024:.1f} MiB -> {streams_kib / 1024:.1f} MiB", file=sys.stderr)

        spender = Spender()
        await spender.start(url)
        from_commit, from_send = [], []
        loop = asyncio.get_running_loop()
        for i in range(args.spends):
            user = random.choice(streams.connected)
            waiter = loop.create_future()
            streams.waiters[user] = waiter
            sent = time.perf_counter()
            committed = await spender.spend(user)
            arrived, data = await asyncio.wait_for(waiter, 30)
            assert data["amount"] == -1, data
            from_commit.append(max(0.0, arrived - committed) * 1000)
            from_send.append((arrived - sent) * 1000)
            await asyncio.sleep(0.005)
        peak_kib = rss_kib(server.pid, "VmHWM")
        final_kib = rss_kib(server.pid)
        spender.proc.stdin.close()
        await spender.proc.wait()

        result = {
            "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            # The machine is shared: how busy it was while measuring.
            "load_average_1m": round(os.getloadavg()[0], 2),
            "streams": streams.opened,
            "streams_failed": streams.failed,
            "open_seconds": round(open_seconds, 2),
            "rss_mib_no_streams": round(idle_kib / 1024, 1),
            "rss_mib_with_streams": round(streams_kib / 1024, 1),
            "rss_kib_per_stream": round((streams_kib - idle_kib) / max(1, streams.opened), 1),
            "rss_mib_after_spends": round(final_kib / 1024, 1),
            "peak_rss_mib": round(peak_kib / 1024, 1),
            "spends": len(from_commit),
            "commit_to_event_ms": {"p50": round(statistics.median(from_commit), 2),
                                   "p99": round(percentile(from_commit, 99), 2),
                                   "max": round(max(from_commit), 2)},
            "send_to_event_ms": {"p50": round(statistics.median(from_send), 2),
                                 "p99": round(percentile(from_send, 99), 2),
                                 "max": round(max(from_send), 2)},
        }
        print(json.dumps(result, indent=2))
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        name = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-sse.json"
        with open(os.path.join(ROOT, "bench", "results", name), "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    finally:
        server.terminate()
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
        psql(args.server, f'drop database if exists "{args.database}" with (force)')


if __name__ == "__main__":
    asyncio.run(main())
