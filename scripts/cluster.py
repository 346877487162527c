#!/usr/bin/env python3
"""Replicas behind PgBouncer in transaction mode, on this machine; run through scripts/cluster
(which installs PgBouncer and wrk and builds the release binary). See the header there."""

import argparse
import base64
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
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECRET = "cluster-only-jwt-secret-that-is-at-least-32-characters"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def url(database: str, port: int = PG["port"]) -> str:
    return f"postgres://{PG['user']}@{PG['host']}:{port}/{database}"


def psql(sql: str, database: str = "postgres", port: int = PG["port"]) -> str:
    out = subprocess.run(
        ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", PG["host"], "-p", str(port),
         "-U", PG["user"], "-d", database],
        input=sql, text=True, check=True, capture_output=True)
    return out.stdout.strip()


def token(user: str, now: int) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({
        "aud": "authenticated", "exp": now + 6 * 3600, "iat": now, "sub": user,
        "email": f"{user[-12:]}@example.com", "role": "authenticated", "aal": "aal1",
        "session_id": user, "is_anonymous": False}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


class PgBouncer:
    """Transaction mode, as Debian ships PgBouncer 1.18, in a directory of its own."""

    def __init__(self, pool_size: int, work: Path):
        self.port = free_port()
        (work / "userlist.txt").write_text(f'"{PG["user"]}" ""\n')
        (work / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={PG['host']} port={PG['port']}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {work / 'userlist.txt'}\n"
            "pool_mode = transaction\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"max_client_conn = 2000\ndefault_pool_size = {pool_size}\n"
            f"admin_users = {PG['user']}\nstats_users = {PG['user']}\n"
            "logfile =\npidfile =\n")
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"]
        if os.geteuid() == 0:
            command += ["-u", "postgres"]  # it refuses to run as root
        self.process = subprocess.Popen(command + [str(work / "pgbouncer.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("PgBouncer did not start")
                time.sleep(0.05)

    def stats(self, database: str) -> dict:
        """SHOW STATS for `database` from PgBouncer's admin console."""
        out = subprocess.run(
            ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", PG["user"], "-d", "pgbouncer",
             "--csv", "-c", "show stats"], text=True, check=True, capture_output=True).stdout
        lines = out.strip().splitlines()
        header = lines[0].split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("database") == database:
                return {k: int(v) for k, v in row.items() if v.isdigit()}
        return {}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


class Replica:
    def __init__(self, binary: Path, database_url: str, direct_url: str, mode: str, pool: int):
        self.port = free_port()
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": database_url, "DATABASE_DIRECT_URL": direct_url, "DATABASE_POOL_MODE": mode,
            "DATABASE_MAX_CONNECTIONS": str(pool), "BIND_ADDR": f"127.0.0.1:{self.port}",
            "SUPABASE_JWT_SECRET": SECRET, "RATE_LIMIT_PER_MINUTE": "0", "LOG_FORMAT": "json",
            "RUST_LOG": "warn", "SHUTDOWN_DRAIN_SECONDS": "0",
        })
        self.process = subprocess.Popen([str(binary), "serve", "--no-migrate"], env=env, cwd=tempfile.gettempdir(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("a replica did not become ready")
            time.sleep(0.02)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=40)


def wrk(port: int, mode: str, tokens: Path, connections: int, duration: int) -> subprocess.Popen:
    path = "/v1/credits/spend" if mode == "spend" else "/v1/me"
    return subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--timeout", "10s",
         "-s", str(ROOT / "scripts" / "cluster.lua"), f"http://127.0.0.1:{port}{path}", "--", mode, str(tokens)],
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def collect(process: subprocess.Popen) -> dict:
    out, err = process.communicate()
    match = re.search(r"CLUSTER_JSON (\{.*\})", out)
    if not match:
        raise SystemExit(f"wrk printed no summary:\n{out}\n{err}")
    stats = json.loads(match.group(1))
    stats["errors"] = sum(stats[k] for k in ("non_2xx", "connect_errors", "read_errors", "write_errors", "timeouts"))
    return stats


def load(replicas, mode: str, tokens: Path, connections: int, duration: int) -> dict:
    """The same load on every replica at once; totals."""
    runs = [collect(p) for p in [wrk(r.port, mode, tokens, connections, duration) for r in replicas]]
    seconds = max(r["duration_us"] for r in runs) / 1e6
    return {
        "requests": sum(r["requests"] for r in runs),
        "per_replica": [r["requests"] for r in runs],
        "errors": sum(r["errors"] for r in runs),
        "rps": sum(r["requests"] for r in runs) / seconds,
        "p50_ms": max(r["p50_us"] for r in runs) / 1000,
        "p99_ms": max(r["p99_us"] for r in runs) / 1000,
    }


def ledger_check(database: str) -> dict:
    off = int(psql("""select count(*) from public.profiles p
                       where p.credits <> coalesce((select sum(t.amount) from public.credit_transactions t
                                                    where t.user_id = p.id), 0)""", database))
    spends = int(psql("select count(*) from public.credit_transactions where source = 'spend'", database))
    return {"profiles_off_ledger": off, "spend_rows": spends}


def verify(binary: Path, direct_url: str) -> bool:
    env = dict(os.environ, DATABASE_URL=direct_url)
    out = subprocess.run([str(binary), "verify"], env=env, text=True, capture_output=True)
    if out.returncode != 0:
        log(f"verify failed:\n{out.stdout}{out.stderr}")
    return out.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", type=Path, required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--server-connections", type=int, default=10)
    parser.add_argument("--pool", type=int, default=10, help="DATABASE_MAX_CONNECTIONS of each replica")
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    database = f"amethyst_cluster_{os.getpid()}"
    direct = url(database)
    work = Path(tempfile.mkdtemp(prefix="amethyst-cluster-"))
    os.chmod(work, 0o755)
    psql(f'create database "{database}"')
    started = []
    try:
        subprocess.run([str(args.binary), "migrate"], env=dict(os.environ, DATABASE_URL=direct),
                       check=True, capture_output=True, cwd=tempfile.gettempdir())
        psql(f"""insert into auth.users (id, email)
                 select ('00000000-0000-4000-8000-' || lpad(n::text, 12, '0'))::uuid, 'user' || n || '@example.com'
                   from generate_series(1, {args.users}) n;
                 select count(public.add_credits(id, 1000000, 'system', 'cluster seed')) from public.profiles;""",
             database)
        now = int(time.time())
        tokens = work / "tokens"
        tokens.write_text("".join(token(f"00000000-0000-4000-8000-{n:012d}", now) + "\n"
                                  for n in range(1, args.users + 1)))

        bouncer = PgBouncer(args.server_connections, work)
        started.append(bouncer)
        through = url(database, bouncer.port)
        replicas = [Replica(args.binary, through, direct, "transaction", args.pool) for _ in range(args.replicas)]
        started += replicas
        log(f"PgBouncer (transaction mode, {args.server_connections} server connections) on {bouncer.port}; "
            f"{len(replicas)} replicas on " + ", ".join(str(r.port) for r in replicas) + f"; database {database}")
        if args.keep:
            print(json.dumps({"pgbouncer": through, "direct": direct,
                              "replicas": [f"http://127.0.0.1:{r.port}" for r in replicas],
                              "token": tokens.read_text().splitlines()[0]}, indent=2), flush=True)
            log("Ctrl-C stops everything")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return

        results = {}
        before = bouncer.stats(database)
        for mode in ("spend", "me"):
            log(f"{mode}: wrk, {args.connections} connections on each of {len(replicas)} replicas, {args.duration} s")
            results[mode] = load(replicas, mode, tokens, args.connections, args.duration)
        after = bouncer.stats(database)
        requests = results["spend"]["requests"] + results["me"]["requests"]
        xacts = after.get("total_xact_count", 0) - before.get("total_xact_count", 0)
        queries = after.get("total_query_count", 0) - before.get("total_query_count", 0)
        ledger = ledger_check(database)
        verified = verify(args.binary, direct)
        report = {
            "replicas": len(replicas), "pool_mode": "transaction", "server_connections": args.server_connections,
            "client_connections": args.pool * len(replicas), **results,
            "pgbouncer_per_request": {"transactions": round(xacts / max(requests, 1), 2),
                                      "queries": round(queries / max(requests, 1), 2)},
            # wrk stops counting at the deadline; spends answered after it are in the ledger.
            "spends_answered_2xx": results["spend"]["requests"] - results["spend"]["errors"],
            **ledger, "verify": "passed" if verified else "FAILED",
        }

        if args.compare:
            for replica in replicas:
                replica.stop()
                started.remove(replica)
            compare = {}
            for mode, database_url in (("session", direct), ("transaction", through)):
                one = Replica(args.binary, database_url, direct, mode, args.pool)
                started.append(one)
                for scenario in ("me", "spend"):
                    log(f"compare: one replica, {mode} mode, {scenario}")
                    compare[f"{mode}/{scenario}"] = load([one], scenario, tokens, args.connections, args.duration)
                one.stop()
                started.remove(one)
            report["one_replica"] = {k: {"rps": round(v["rps"]), "p50_ms": v["p50_ms"], "p99_ms": v["p99_ms"],
                                         "errors": v["errors"]} for k, v in compare.items()}
            ledger = ledger_check(database)
            report["after_compare"] = {**ledger, "verify": "passed" if verify(args.binary, direct) else "FAILED"}

        print(json.dumps(report, indent=2))
        results_dir = Path(__file__).resolve().parent.parent / "bench" / "results"
        results_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True, capture_output=True,
                                cwd=results_dir).stdout.strip()
        (results_dir / f"{stamp}-cluster.json").write_text(json.dumps({"commit": commit, **report}, indent=2) + "\n")
        failed = (report["spend"]["errors"] + report["me"]["errors"] > 0 or ledger["profiles_off_ledger"] > 0
                  or not verified or report["spend_rows"] < report["spends_answered_2xx"])
        sys.exit(1 if failed else 0)
    finally:
        for process in reversed(started):
            try:
                process.stop()
            except Exception:
                pass
        psql(f'drop database if exists "{database}" with (force)')
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
