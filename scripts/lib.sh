# Shared by the scripts: make sure the local PostgreSQL answers.
ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    return 0
  fi
  echo "PostgreSQL is not answering on 127.0.0.1:5432; starting the local cluster" >&2
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  if [[ -z $version ]]; then
    echo "no local PostgreSQL cluster found: install PostgreSQL 14+ or set DATABASE_URL" >&2
    return 1
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && return 0
    sleep 1
  done
  echo "PostgreSQL did not come up" >&2
  return 1
}
