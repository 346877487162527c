#!/usr/bin/env python3
"""The benchmark: the service under HTTP load (wrk) beside pgbench running (a) the statements
the service sends for the same request and (b) the smallest SQL that does the job, on the same
database in the same run. See bench/README.md; run it with bench/run."""

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SECRET = "bench-only-jwt-secret-that-is-at-least-32-characters"
WEBHOOK_SECRET = "whsec_bench_only"
PACK_ID = "00000000-0000-4000-9000-000000000001"
BALANCE = 1_000_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def user_id(n: int) -> str:
    """Seeded users have ids the pgbench scripts can rebuild from a number."""
    return f"00000000-0000-4000-8000-{n:012d}"


def log(message: str) -> None:
    print(f"[bench {dt.datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


class Database:
    def __init__(self, args):
        self.host, self.port, self.user, self.name = args.pg_host, args.pg_port, args.pg_user, args.database

    def url(self, name=None) -> str:
        return f"postgres://{self.user}@{self.host}:{self.port}/{name or self.name}"

    def psql(self, sql: str, db=None, capture=False) -> str:
        out = subprocess.run(
            ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", db or self.name],
            input=sql, text=True, check=True, capture_output=True,
        )
        return out.stdout.strip() if capture else ""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Es256Keys:
    """`--token-alg es256`: a P-256 key of the run's own, its public half published as a JWKS
    on loopback the way Supabase Auth publishes a project's signing keys, and the service
    pointed at it (`SUPABASE_JWKS_URL`). Needs Python's `cryptography`."""

    KID = "bench-es256"

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import ec
        import http.server
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        body = json.dumps({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.KID,
            "x": b64url(numbers.x.to_bytes(32, "big")), "y": b64url(numbers.y.to_bytes(32, "big")),
        }]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/auth/v1/.well-known/jwks.json"

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
        r, s = decode_dss_signature(self.key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# Set by main() for --token-alg es256; tokens are HS256 with SECRET otherwise.
ES256: Es256Keys | None = None


def jwt(claims: dict) -> str:
    if ES256 is not None:
        header = {"alg": "ES256", "typ": "JWT", "kid": ES256.KID}
    else:
        header = {"alg": "HS256", "typ": "JWT"}
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    message = f"{head}.{body}".encode()
    if ES256 is not None:
        sig = ES256.sign(message)
    else:
        sig = hmac.new(SECRET.encode(), message, hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def user_token(n: int, now: int) -> str:
    uid = user_id(n)
    return jwt({
        "aud": "authenticated", "exp": now + 6 * 3600, "iat": now, "sub": uid,
        "email": f"bench{n}@example.com", "phone": "", "role": "authenticated", "aal": "aal1",
        "app_metadata": {"provider": "email", "providers": ["email"]}, "user_metadata": {},
        "session_id": f"00000000-0000-4000-a000-{n:012d}", "is_anonymous": False,
    })


def write_tokens(path: Path, numbers, now: int) -> Path:
    path.write_text("".join(user_token(n, now) + "\n" for n in numbers))
    return path


def service_token(now: int) -> str:
    return jwt({"aud": "authenticated", "exp": now + 6 * 3600, "iat": now, "sub": user_id(0),
                "role": "service_role"})


def write_hold_users(path: Path, numbers, now: int) -> Path:
    """The service_role token on the first line (holds are the generation backend's), then the
    user ids to reserve for."""
    path.write_text(service_token(now) + "\n" + "".join(f"{user_id(n)}\n" for n in numbers))
    return path


def lots_users(users: int) -> range:
    """The users whose balance is 20 live lots (the last tenth, at most 1,000)."""
    count = max(1, min(1000, users // 10))
    return range(users - count + 1, users + 1)


def write_user_tokens(path: Path, numbers, now: int) -> Path:
    """"<user id>\t<token>" lines: scenario.lua finds a session's caller by the user id that the
    session's body names."""
    path.write_text("".join(f"{user_id(n)}\t{user_token(n, now)}\n" for n in numbers))
    return path


def signed_events(path: Path, count: int, users: int, seed: int) -> Path:
    """Distinct, signed checkout.session.completed events, as Stripe sends them."""
    now = int(time.time())
    lines = []
    for i in range(count):
        n = (i * 7919 + seed) % users + 1
        key = f"{seed}_{i}"
        body = json.dumps({
            "id": f"evt_bench_{key}", "object": "event", "api_version": "2025-03-31.basil",
            "created": now, "livemode": False, "pending_webhooks": 1, "type": "checkout.session.completed",
            "request": {"id": None, "idempotency_key": None},
            "data": {"object": {
                "id": f"cs_bench_{key}", "object": "checkout.session", "mode": "payment",
                "payment_status": "paid", "status": "complete", "client_reference_id": user_id(n),
                "customer": None, "customer_details": {"email": f"bench{n}@example.com"},
                "payment_intent": f"pi_bench_{key}", "amount_total": 999, "currency": "usd",
                "metadata": {"user_id": user_id(n), "pack_id": PACK_ID, "credits": "100"},
                "success_url": "https://app.example/success", "cancel_url": "https://app.example/cancel",
                "created": now, "livemode": False, "subscription": None, "invoice": None,
            }},
        }, separators=(",", ":"))
        sig = hmac.new(WEBHOOK_SECRET.encode(), f"{now}.{body}".encode(), hashlib.sha256).hexdigest()
        lines.append(f"t={now},v1={sig}\t{body}\n")
    path.write_text("".join(lines))
    return path


def seed(db: Database, users: int, history_users: int, filler_rows: int) -> None:
    log(f"seeding {users} users, {history_users} of them with 1,000 transactions, {filler_rows} filler rows")
    db.psql(f"""
        insert into auth.users (id, email, created_at)
        select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 'bench' || n || '@example.com',
               now() - interval '400 days'
          from generate_series(1, {users}) n;
        -- Every user: one grant of a large balance, old enough to sit behind all history.
        insert into public.credit_transactions (user_id, amount, balance_after, source, description, created_at)
        select id, {BALANCE}, {BALANCE}, 'system', 'bench balance', now() - interval '400 days'
          from public.profiles order by id;
        update public.profiles set credits = {BALANCE};
        -- History users: 999 more rows each, ledger order matching time order.
        insert into public.credit_transactions (user_id, amount, balance_after, source, description, created_at)
        select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 1, {BALANCE} + g, 'ad_view', null,
               now() - (1000 - g) * interval '1 minute'
          from generate_series(1, {history_users}) n, generate_series(1, 999) g
         order by n, g;
        update public.profiles set credits = {BALANCE} + 999
         where id in (select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid
                        from generate_series(1, {history_users}) n);
        -- Every balance is lots (docs/api.md, "Lots and expiry"): one never-expiring lot each.
        insert into public.credit_lots (user_id, source, amount, remaining, priority, expires_at)
        select id, 'system', credits, credits, 20, null from public.profiles where credits > 0;
        insert into public.credit_packs (id, name, credits, kind, stripe_price_id, unit_amount, currency, active)
        values ('{PACK_ID}', 'Bench pack', 100, 'one_time', 'price_bench', 999, 'usd', true);
    """)
    lots = lots_users(users)
    log(f"giving users {lots.start}..{lots.stop - 1} 20 live lots each")
    db.psql(f"""
        -- Their balance as 20 lots of mixed priorities and expiries (all in the future); the
        -- sum is the balance, so the ledger invariant holds.
        delete from public.credit_lots
         where user_id in (select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid
                             from generate_series({lots.start}, {lots.stop - 1}) n);
        insert into public.credit_lots (user_id, source, amount, remaining, priority, expires_at)
        select p.id, case when g % 2 = 0 then 'ad_view' else 'admin' end,
               case when g = 20 then p.credits - 19 * (p.credits / 20) else p.credits / 20 end,
               case when g = 20 then p.credits - 19 * (p.credits / 20) else p.credits / 20 end,
               10 + (g % 3) * 10, case when g % 4 = 0 then null else now() + g * interval '1 day' end
          from public.profiles p, generate_series(1, 20) g
         where p.id in (select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid
                          from generate_series({lots.start}, {lots.stop - 1}) n);
    """)
    add_filler(db, users, history_users, filler_rows)


def add_filler(db: Database, users: int, history_users: int, filler_rows: int) -> None:
    """Rows for users without history (zero-sum pairs: +1 then -1), so the table grows while
    every balance and the ledger invariant stay as they are."""
    if filler_rows <= 0:
        return
    others = max(1, users - history_users)
    pairs = filler_rows // 2
    log(f"adding {2 * pairs} filler transactions")
    batch = 1_000_000
    done = 0
    while done < pairs:
        size = min(batch, pairs - done)
        db.psql(f"""
            insert into public.credit_transactions (user_id, amount, balance_after, source, description, created_at)
            select ('00000000-0000-4000-8000-' || lpad(({history_users} + 1 + (i % {others}))::text, 12, '0'))::uuid,
                   case when s = 1 then 1 else -1 end,
                   case when s = 1 then {BALANCE} + 1 else {BALANCE} end,
                   case when s = 1 then 'ad_view' else 'spend' end, null,
                   now() - interval '300 days' + i * interval '1 millisecond'
              from generate_series({done}, {done + size - 1}) i, generate_series(1, 2) s
             order by i, s;
        """)
        done += size
    # Every table the seed filled gets its statistics, as autovacuum would give them within a
    # minute. Without them on credit_lots the planner read a user's next expiries by walking
    # every user's expiring lots (GET /v1/me 3.5 times slower at 1M users than at 100k).
    db.psql("vacuum analyze public.credit_transactions; analyze public.profiles; "
            "analyze public.credit_lots; analyze public.credit_holds;")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, binary: Path, db: Database, pool: int, database_url: str | None = None,
                 wrapper: tuple = (), ready_within: float = 30):
        """`wrapper` runs the binary under another program (bench/instructions: valgrind)."""
        self.port = free_port()
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": database_url or db.url(), "BIND_ADDR": f"127.0.0.1:{self.port}", "SUPABASE_JWT_SECRET": SECRET,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "RATE_LIMIT_PER_MINUTE": "0",
            "DATABASE_MAX_CONNECTIONS": str(pool), "LOG_FORMAT": "json", "RUST_LOG": "warn",
            # POST /v1/ads/views (the ad_view scenario) answers only in the client mode; every
            # other mode refuses it with 409 ad_session_required. Ad sessions work in it too,
            # paid on completion as in the default session mode.
            "ADS_VERIFICATION": "client",
        })
        if ES256 is not None:
            env["SUPABASE_JWKS_URL"] = ES256.url
        started = time.monotonic()
        self.process = subprocess.Popen([*wrapper, str(binary), "serve", "--no-migrate"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if self.process.poll() is not None:
                raise SystemExit("the service exited during start-up")
            if time.monotonic() - started > ready_within:
                raise SystemExit(f"the service did not become ready within {ready_within:.0f} s")
            time.sleep(0.002)
        self.startup_ms = (time.monotonic() - started) * 1000

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def reset_peak_rss(self) -> None:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=40)


class RoundTripCounter:
    """A TCP proxy between the service and PostgreSQL that counts round trips: every `Sync`
    (the end of an extended-protocol exchange, pipelined or not) and every simple `Query` the
    service sends is one wait for the server's ReadyForQuery. pg_stat_statements is not
    loaded on these servers (it needs shared_preload_libraries and a restart), and
    pg_stat_database counts transactions, not statements; counting the wire is exact and
    needs nothing from the server. TLS is off on this leg (sslmode=disable) so the messages
    can be read."""

    def __init__(self, db: "Database"):
        self.target = (db.host, db.port)
        self.trips = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start():
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=lambda: self.loop.run_until_complete(start()), daemon=True).start()
        ready.wait(10)

    def url(self, db: "Database") -> str:
        return f"postgres://{db.user}@127.0.0.1:{self.port}/{db.name}?sslmode=disable"

    async def _client(self, client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection(*self.target)

        async def upstream():
            # Startup: length-prefixed messages without a type byte, until the real start-up
            # message (anything but an SSL or GSS encryption request).
            while True:
                head = await client_reader.readexactly(8)
                length, code = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
                rest = await client_reader.readexactly(length - 8)
                server_writer.write(head + rest)
                await server_writer.drain()
                if code not in (80877103, 80877104):
                    break
            while True:
                head = await client_reader.readexactly(5)
                body = await client_reader.readexactly(int.from_bytes(head[1:], "big") - 4)
                if head[:1] in (b"S", b"Q"):
                    self.trips += 1
                server_writer.write(head + body)
                await server_writer.drain()

        async def downstream():
            while data := await server_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()

        try:
            await asyncio.gather(upstream(), downstream())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for writer in (server_writer, client_writer):
                writer.close()


def run_wrk(url: str, mode: str, data: Path, connections: int, threads: int, duration: int) -> dict:
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s", "--timeout", "10s",
         "-s", str(BENCH / "scenario.lua"), url, "--", mode, str(data), str(threads)],
        text=True, capture_output=True, check=True,
    ).stdout
    match = re.search(r"WRK_JSON (\{.*\})", out)
    if not match:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    stats = json.loads(match.group(1))
    seconds = stats["duration_us"] / 1e6
    errors = stats["non_2xx"] + stats["connect_errors"] + stats["read_errors"] + stats["write_errors"] + stats["timeouts"]
    return {
        "requests": stats["requests"], "rps": stats["requests"] / seconds, "p50_ms": stats["p50_us"] / 1000,
        "p90_ms": stats["p90_us"] / 1000, "p99_ms": stats["p99_us"] / 1000, "max_ms": stats["max_us"] / 1000,
        "errors": errors, "non_2xx": stats["non_2xx"],
    }


def run_pgbench(db: Database, script: Path, variables: dict, clients: int, duration: int) -> dict:
    command = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(duration),
               "-h", db.host, "-p", str(db.port), "-U", db.user, "-f", str(script)]
    for key, value in {"i": 0, "clients": clients, **variables}.items():
        command += ["-D", f"{key}={value}"]
    out = subprocess.run(command + [db.name], text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(f"pgbench {script.name} failed:\n{out.stdout}\n{out.stderr}")
    tps = re.search(r"tps = ([0-9.]+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return {"tps": float(tps.group(1)) if tps else 0.0, "failed": int(failed.group(1)) if failed else 0}


# Each scenario: the HTTP request, and the two pgbench scripts (bench/pgbench/<name>_a.sql is the
# service's own statements, <name>_b.sql the smallest SQL for the job).
SCENARIOS = {
    # No token, no database: what the layers and the runtime cost on their own.
    "health": {"title": "GET /health", "path": "/health", "mode": "plain", "users": "none", "pgbench": False},
    "me": {"title": "GET /v1/me", "path": "/v1/me", "mode": "get", "users": "all"},
    "transactions": {"title": "GET /v1/me/transactions?limit=20", "path": "/v1/me/transactions?limit=20",
                     "mode": "get", "users": "history"},
    "spend": {"title": "POST /v1/credits/spend", "path": "/v1/credits/spend", "mode": "spend", "users": "all"},
    "spend_hot": {"title": "POST /v1/credits/spend (one user)", "path": "/v1/credits/spend", "mode": "spend",
                  "users": "one", "script": "spend"},
    "ad_view": {"title": "POST /v1/ads/views", "path": "/v1/ads/views", "mode": "ad_view", "users": "thirds"},
    # Two requests per pass (open, then complete); a pgbench transaction is the whole pass.
    "ad_session": {"title": "POST /v1/ads/sessions + …/complete", "path": "/v1/ads/sessions",
                   "mode": "ad_session", "users": "thirds", "requests_per_transaction": 2},
    "webhook": {"title": "POST /v1/webhooks/stripe", "path": "/v1/webhooks/stripe", "mode": "webhook", "users": "all"},
    # A spend over a balance of 20 live lots: compare with `spend` in the same run.
    "spend_lots": {"title": "POST /v1/credits/spend (20 lots)", "path": "/v1/credits/spend", "mode": "spend",
                   "users": "lots", "pgbench": False},
    # The generation backend: reserve 1 credit, then capture it; both requests count.
    "reserve_capture": {"title": "POST /v1/holds + …/capture", "path": "/v1/holds", "mode": "hold",
                        "users": "all", "requests_per_transaction": 2, "pgbench": False},
}
WRITES = {"spend", "spend_hot", "ad_view", "ad_session", "webhook", "spend_lots", "reserve_capture"}


def scenario_inputs(name: str, spec: dict, args, work: Path, now: int):
    """The wrk data file and the pgbench variables (user number ranges) for a scenario."""
    users, history = args.users, min(args.history_users, args.users)
    if spec["users"] == "none":
        path = work / f"{name}.none"
        path.write_text("-\n")
        return path, {}
    if spec["users"] == "history":
        return write_tokens(work / f"{name}.tokens", range(1, history + 1), now), {"first": 1, "last": history}
    if spec["users"] == "lots":
        lots = lots_users(users)
        return write_tokens(work / f"{name}.tokens", lots, now), {"first": lots.start, "last": lots.stop - 1}
    if spec["mode"] == "hold":
        return write_hold_users(work / f"{name}.users", range(1, users + 1), now), {"first": 1, "last": users}
    if spec["users"] == "one":
        return write_tokens(work / f"{name}.tokens", [1], now), {"first": 1, "last": 1}
    if spec["users"] == "thirds":
        # Ad views are limited to 10 a day (and open ad sessions to 3 a user): wrk and each
        # pgbench script get their own users.
        third = max(1, users // 3)
        write = write_user_tokens if spec["mode"] == "ad_session" else write_tokens
        return write(work / f"{name}.tokens", range(1, third + 1), now), {"first": third + 1, "last": users}
    if spec["mode"] == "webhook":
        count = max(1000, args.duration * 6000)
        return signed_events(work / f"{name}.events", count, users, int(now)), {"first": 1, "last": users}
    # Random users' scenarios: each request another user's token, drawn from the first
    # --token-users users (all by default), so that how often a token comes back can be set.
    token_users = min(users, args.token_users or users)
    return write_tokens(work / f"{name}.tokens", range(1, token_users + 1), now), {"first": 1, "last": users}


def measure(args, db: Database, service: Service, names, work: Path) -> list:
    rows = []
    now = int(time.time())
    for name in names:
        spec = SCENARIOS[name]
        data, variables = scenario_inputs(name, spec, args, work, now)
        if spec["users"] == "thirds":
            third = max(1, args.users // 3)
            a_vars = {"first": third + 1, "last": 2 * third}
            b_vars = {"first": 2 * third + 1, "last": args.users}
        else:
            a_vars = b_vars = variables
        script = spec.get("script", name)
        # Only where the same requests stay valid: a warm-up would use up ad limits, holds and
        # single-use webhook events before the measurement.
        if args.warmup and spec["mode"] in ("plain", "get", "spend"):
            log(f"{name}: warm-up, {args.warmup} s")
            run_wrk(f"http://127.0.0.1:{service.port}{spec['path']}", spec["mode"], data,
                    args.connections, args.wrk_threads, args.warmup)
        log(f"{name}: wrk {args.connections} connections for {args.duration} s")
        service.reset_peak_rss()
        cpu_before, wall_before = service.cpu_seconds(), time.monotonic()
        http = run_wrk(f"http://127.0.0.1:{service.port}{spec['path']}", spec["mode"], data,
                       args.connections, args.wrk_threads, args.duration)
        cpu_spent = service.cpu_seconds() - cpu_before
        cpu = cpu_spent / (time.monotonic() - wall_before) / NCPU
        rss = service.peak_rss_mb()
        if spec.get("pgbench", True) and not args.no_pgbench:
            log(f"{name}: pgbench (a) and (b), {args.pgbench_clients} clients")
            a = run_pgbench(db, BENCH / "pgbench" / f"{script}_a.sql", a_vars, args.pgbench_clients, args.duration)
            b = run_pgbench(db, BENCH / "pgbench" / f"{script}_b.sql", b_vars, args.pgbench_clients, args.duration)
        else:
            a = b = {"tps": 0.0, "failed": 0}
        # The ratios compare like with like: a pgbench transaction that does the job of several
        # requests counts as that many.
        per = spec.get("requests_per_transaction", 1)
        row = {
            "scenario": name, "title": spec["title"], "connections": args.connections, **http,
            "pgbench_a_tps": a["tps"], "pgbench_b_tps": b["tps"], "pgbench_failed": a["failed"] + b["failed"],
            "requests_per_transaction": per,
            "ratio_a": http["rps"] / (a["tps"] * per) if a["tps"] else None,
            "ratio_b": http["rps"] / (b["tps"] * per) if b["tps"] else None,
            "peak_rss_mb": rss, "cpu_share": cpu, "write": name in WRITES,
            # The service's own CPU (user + system, from /proc/<pid>/stat) per request served.
            "cpu_us_per_request": cpu_spent * 1e6 / http["requests"] if http["requests"] else None,
        }
        rows.append(row)
        log(f"{name}: {row['rps']:.0f} req/s, {row['cpu_us_per_request'] or 0:.0f} µs CPU/req, "
            f"p99 {row['p99_ms']:.1f} ms, (a) {a['tps']:.0f} tps, (b) {b['tps']:.0f} tps")
    return rows


def count_round_trips(args, db: Database, binary: Path, names, work: Path) -> dict:
    """Database round trips per request, scenario by scenario: a second service, whose pool
    connects through the counting proxy, serves a short light run after a warm-up (which
    prepares its statements on every pooled connection)."""
    counter = RoundTripCounter(db)
    service = Service(binary, db, 2, database_url=counter.url(db))
    trips = {}
    now = int(time.time()) + 1  # other webhook events than the main run's
    try:
        for name in names:
            spec = SCENARIOS[name]
            data, _ = scenario_inputs(name, spec, args, work, now)
            url = f"http://127.0.0.1:{service.port}{spec['path']}"
            run_wrk(url, spec["mode"], data, 2, 1, 1)
            before = counter.trips
            http = run_wrk(url, spec["mode"], data, 2, 1, args.probe_duration)
            trips[name] = (counter.trips - before) / http["requests"] if http["requests"] else None
            log(f"{name}: {trips[name]:.2f} database round trips per request ({http['requests']} requests, "
                f"{http['errors']} errors)")
    finally:
        service.stop()
    return trips


def table(rows: list) -> str:
    head = ("scenario", "conns", "req/s", "p50 ms", "p99 ms", "errors", "pgbench a", "pgbench b",
            "svc/a", "svc/b", "RSS MB", "CPU", "CPU µs/req", "DB trips/req")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ratio = lambda v: f"{v * 100:.0f} %" if v else "–"
        lines.append("| " + " | ".join([
            r["title"], str(r["connections"]), f"{r['rps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
            str(r["errors"]), f"{r['pgbench_a_tps']:.0f}", f"{r['pgbench_b_tps']:.0f}", ratio(r["ratio_a"]),
            ratio(r["ratio_b"]), f"{r['peak_rss_mb']:.1f}", f"{r['cpu_share'] * 100:.0f} %",
            f"{r['cpu_us_per_request']:.0f}" if r.get("cpu_us_per_request") is not None else "–",
            f"{r['db_round_trips']:.2f}" if r.get("db_round_trips") is not None else "–",
        ]) + " |")
    return "\n".join(lines)


def verify(binary: Path, db: Database) -> bool:
    env = dict(os.environ, DATABASE_URL=db.url())
    out = subprocess.run([str(binary), "verify"], env=env, text=True, capture_output=True, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        log("verify FAILED after the run:\n" + out.stdout)
    return out.returncode == 0


def prepare(args, db: Database, binary: Path, filler_rows: int) -> None:
    log(f"creating database {db.name}")
    db.psql(f'drop database if exists "{db.name}" with (force); create database "{db.name}";', db="postgres")
    env = dict(os.environ, DATABASE_URL=db.url(), LOG_FORMAT="json", RUST_LOG="warn")
    subprocess.run([str(binary), "migrate"], env=env, check=True, cwd=tempfile.gettempdir())
    seed(db, args.users, min(args.history_users, args.users), filler_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--history-users", type=int, default=1000, help="users with 1,000 transactions")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=0,
                        help="seconds of the same load before each measurement, not counted (scenarios "
                             "that read or spend only): the steady state of a service whose "
                             "clients reuse their tokens, the token cache holding them by then, "
                             "rather than its first seconds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--pool", type=int, default=16, help="the service's database pool")
    parser.add_argument("--pgbench-clients", type=int, default=16)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--scaling", action="store_true",
                        help="every scenario at each data size of --scaling-plan")
    parser.add_argument("--scaling-plan", default="100000:1.1e6,1000000:1e7",
                        help="users:transactions pairs, comma-separated")
    parser.add_argument("--database", default="amethyst_bench")
    parser.add_argument("--pg-host", default=os.environ.get("PGHOST", "127.0.0.1"))
    parser.add_argument("--pg-port", type=int, default=int(os.environ.get("PGPORT", "5432")))
    parser.add_argument("--pg-user", default=os.environ.get("PGUSER", "postgres"))
    parser.add_argument("--service-database-url",
                        help="the service's DATABASE_URL (default: the benchmark database over TCP); "
                             "e.g. postgres://postgres@localhost/amethyst_bench?host=/var/run/postgresql "
                             "for the Unix socket")
    parser.add_argument("--token-alg", choices=["hs256", "es256"], default="hs256",
                        help="how the users' tokens are signed: the project's HS256 secret, or an "
                             "ES256 key the run publishes as a JWKS (Supabase's asymmetric keys)")
    parser.add_argument("--token-users", type=int, default=0,
                        help="the random-user scenarios (me, spend, ...) send the tokens of only "
                             "this many users (default: all), each request one of them at random")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--binary", help="measure this build of the service (no build)")
    parser.add_argument("--probe-duration", type=int, default=2,
                        help="seconds of the light run that counts database round trips per request")
    parser.add_argument("--no-probe", action="store_true", help="do not count database round trips")
    parser.add_argument("--no-pgbench", action="store_true",
                        help="the service alone (CPU per request), without the pgbench comparisons")
    args = parser.parse_args()
    global ES256
    if args.token_alg == "es256":
        ES256 = Es256Keys()

    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = Path(args.binary) if args.binary else target / "release" / "amethyst-credits"
    if not args.skip_build and not args.binary:
        log("building the release binary")
        subprocess.run(["cargo", "build", "--release", "--locked"], cwd=ROOT, check=True)
    db = Database(args)
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    machine = {"cpus": NCPU, "postgres": db.psql("show server_version", db="postgres", capture=True),
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                        capture_output=True).stdout.strip()}
    # The service's own settings that change its CPU per request (README, "Configuration").
    machine["service_env"] = {k: os.environ[k] for k in ("TOKIO_WORKER_THREADS", "JWT_CACHE_SIZE")
                              if k in os.environ}
    if args.binary:
        machine["note"] = f"measured {args.binary}, not necessarily built from this commit"

    with tempfile.TemporaryDirectory(prefix="amethyst-bench-") as tmp:
        work = Path(tmp)
        if args.scaling:
            run_scaling(args, db, binary, work, stamp, machine)
            return
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        prepare(args, db, binary, filler_rows=0)
        service = Service(binary, db, args.pool, database_url=args.service_database_url)
        log(f"service ready in {service.startup_ms:.0f} ms")
        try:
            rows = measure(args, db, service, names, work)
        finally:
            service.stop()
        if not args.no_probe:
            trips = count_round_trips(args, db, binary, names, work)
            for row in rows:
                row["db_round_trips"] = trips.get(row["scenario"])
        ledger_ok = verify(binary, db)
        report = {"kind": "scenarios", "at": stamp, "machine": machine, "settings": vars(args),
                  "startup_ms": service.startup_ms, "ledger_ok": ledger_ok, "rows": rows}
        path = results_dir / f"{stamp}.json"
        path.write_text(json.dumps(report, indent=2))
        print(table(rows))
        print(f"\nstart to first /ready: {service.startup_ms:.0f} ms; verify after the run: "
              f"{'passed' if ledger_ok else 'FAILED'}; results: {path.relative_to(ROOT)}")


def run_scaling(args, db: Database, binary: Path, work: Path, stamp: str, machine: dict) -> None:
    """Every scenario at growing data sizes (`--scaling-plan`; by default 100k users and about
    1.1M transactions, then 1M users and 10M transactions), and how each scenario's latency
    and CPU per request move from the smallest size to the largest."""
    points = []
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    plan = []
    for item in args.scaling_plan.split(","):
        users, rows_target = (int(float(x)) for x in item.split(":"))
        plan.append((users, min(args.history_users, users), rows_target))
    for point, (users, history, rows_target) in enumerate(plan):
        args.users = users
        args.history_users = history
        base_rows = users + history * 999
        started = time.monotonic()
        prepare(args, db, binary, filler_rows=max(0, rows_target - base_rows))
        seed_s = time.monotonic() - started
        total = int(db.psql("select count(*) from public.credit_transactions", capture=True))
        service = Service(binary, db, args.pool, database_url=args.service_database_url)
        try:
            measured = measure(args, db, service, names, work)
        finally:
            service.stop()
        for row in measured:
            row.update({"point": point, "users": users, "transactions": total, "seed_seconds": seed_s})
            points.append(row)
        log(f"{users} users, {total} transactions done (seeded in {seed_s:.0f} s)")
    ledger_ok = verify(binary, db)
    report = {"kind": "scaling", "at": stamp, "machine": machine, "settings": vars(args), "rows": points,
              "ledger_ok": ledger_ok}
    path = BENCH / "results" / f"{stamp}-scaling.json"
    path.write_text(json.dumps(report, indent=2))
    head = "| users | transactions | scenario | req/s | p50 ms | p99 ms | errors | CPU µs/req | svc/a |"
    print(head + "\n|---|---|---|---|---|---|---|---|---|")
    for r in points:
        ratio = f"{r['ratio_a'] * 100:.0f} %" if r["ratio_a"] else "–"
        print(f"| {r['users']} | {r['transactions']} | {r['title']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['errors']} | {r['cpu_us_per_request'] or 0:.0f} | {ratio} |")
    # How each scenario moves from the smallest data size to the largest.
    first = {r["scenario"]: r for r in points if r["point"] == 0}
    last = {r["scenario"]: r for r in points if r["point"] == len(plan) - 1}
    print(f"\n| scenario | p50 × | p99 × | req/s × | CPU/req × |  ({points[0]['transactions']} → "
          f"{points[-1]['transactions']} transactions)\n|---|---|---|---|---|")
    for name in names:
        a, b = first.get(name), last.get(name)
        if not a or not b:
            continue
        times = lambda x, y: f"{y / x:.2f}" if x else "–"
        print(f"| {a['title']} | {times(a['p50_ms'], b['p50_ms'])} | {times(a['p99_ms'], b['p99_ms'])} | "
              f"{times(a['rps'], b['rps'])} | {times(a['cpu_us_per_request'], b['cpu_us_per_request'])} |")
    print(f"\nverify after the run: {'passed' if ledger_ok else 'FAILED'}; results: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (bench/run installs it)")
    main()
