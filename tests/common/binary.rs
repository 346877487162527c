//! The real binary, `amethyst-credits serve`, as a child process on a database and a port of
//! its own. The metrics recorder is global to a process, so counters read from a server that
//! shares its process with other tests may count their requests too; a server of its own
//! counts exactly what its test sent it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use super::{ISSUER, SECRET, TestUser, user_token};

/// A server process; stopped, and its database dropped, when dropped.
pub struct Binary {
    child: Child,
    /// `http://host:port` of the API.
    pub url: String,
    /// `http://host:port` of the `METRICS_BIND_ADDR` listener, when one was asked for.
    pub metrics_url: Option<String>,
    pub database: Database,
    pub client: reqwest::Client,
    /// Every line the server logged so far.
    logs: Arc<Mutex<Vec<String>>>,
}

/// A database of the tests' server that no `#[sqlx::test]` manages: created by the binary,
/// dropped with this value.
pub struct Database {
    pub url: String,
    admin_url: String,
    name: String,
    /// Dropped with this value; false for a handle on a database someone else owns.
    owned: bool,
}

impl Database {
    /// The URL of a database that does not exist yet.
    pub fn fresh() -> Database {
        let base = std::env::var("DATABASE_URL").expect("DATABASE_URL is set for the tests");
        Self::fresh_on(&base)
    }

    /// The URL of a database that does not exist yet, on the server of `url`.
    pub fn fresh_on(url: &str) -> Database {
        let (server, _) = url.rsplit_once('/').expect("the URL names a database");
        let name = format!("amethyst_bin_{}", Uuid::new_v4().simple());
        Database {
            url: format!("{server}/{name}"),
            admin_url: format!("{server}/postgres"),
            name,
            owned: true,
        }
    }

    /// `url`, a database this value does not own (the same database through a pooler, for
    /// one replica among several): left alone when dropped.
    pub fn attached(url: &str) -> Database {
        let (server, name) = url.rsplit_once('/').expect("the URL names a database");
        Database {
            url: url.to_owned(),
            admin_url: format!("{server}/postgres"),
            name: name.to_owned(),
            owned: false,
        }
    }

    /// Another handle on this database, for a second server: the first one drops it.
    pub fn shared(&self) -> Database {
        Database {
            url: self.url.clone(),
            admin_url: self.admin_url.clone(),
            name: self.name.clone(),
            owned: false,
        }
    }

    /// Creates and migrates it with the binary's `migrate` verb.
    pub fn migrate(&self) {
        let output = self.verb(&["migrate"]);
        assert!(
            output.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs a verb of the binary against this database.
    pub fn verb(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_amethyst-credits"))
            .args(args)
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &self.url)
            .env("LOG_FORMAT", "json")
            .output()
            .expect("the binary runs")
    }

    /// A pool connected as the owner, for setting up and inspecting state.
    pub async fn owner(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .expect("the owner connects")
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on: a thread of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut admin) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await
                {
                    let _ =
                        sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

impl Binary {
    /// `serve` on a fresh database, with the tests' token secret, no rate limit, and `env` on top.
    pub async fn serve(env: &[(&str, &str)]) -> Binary {
        Self::serve_on(Database::fresh(), env).await
    }

    /// `serve` on `database` (created and migrated by the server if need be).
    pub async fn serve_on(database: Database, env: &[(&str, &str)]) -> Binary {
        let mut command = Command::new(env!("CARGO_BIN_EXE_amethyst-credits"));
        command
            .arg("serve")
            // Away from any .env a developer keeps in the checkout.
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &database.url)
            .env("DATABASE_MAX_CONNECTIONS", "5")
            .env("BIND_ADDR", "127.0.0.1:0")
            .env("SUPABASE_JWT_SECRET", SECRET)
            .env("JWT_ISSUER", ISSUER)
            .env("RATE_LIMIT_PER_MINUTE", "0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("METRICS_BIND_ADDR")
            .env_remove("METRICS_TOKEN")
            .env_remove("SUPABASE_URL")
            .env_remove("SUPABASE_JWKS_URL")
            .env_remove("STRIPE_WEBHOOK_SECRET")
            .env_remove("STRIPE_SECRET_KEY");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("the binary starts");

        // The addresses are logged; the rest of the log is drained so the server never blocks.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<(String, String)>();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line.clone());
                let entry: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if let (Some(message), Some(address)) =
                    (entry["message"].as_str(), entry["address"].as_str())
                {
                    let _ = tx.send((message.to_owned(), address.to_owned()));
                } else if entry.is_null() || entry["level"] == "ERROR" {
                    eprintln!("server: {line}");
                }
            }
        });
        let mut metrics_url = None;
        let url = loop {
            let (message, address) = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the server logs its address within 60 s");
            match message.as_str() {
                "serving /metrics" => metrics_url = Some(format!("http://{address}")),
                "listening" => break format!("http://{address}"),
                _ => {}
            }
        };
        Binary {
            child,
            url,
            metrics_url,
            database,
            client: super::http_client(),
            logs,
        }
    }

    /// Every line the server has logged so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the process to end (for at most 60 s): whether it exited
    /// successfully.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..600 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the server did not stop within 60 s of SIGTERM");
    }

    /// Signs a user up the way Supabase Auth does, in the server's database.
    pub async fn user(&self) -> TestUser {
        let id = Uuid::new_v4();
        let email = format!("user-{}@example.com", &id.to_string()[..8]);
        let owner = self.database.owner().await;
        sqlx::query("insert into auth.users (id, email) values ($1, $2)")
            .bind(id)
            .bind(&email)
            .execute(&owner)
            .await
            .expect("auth user inserted");
        owner.close().await;
        TestUser {
            id,
            token: user_token(id, &email),
            email,
        }
    }

    /// Gives `user` credits straight through SQL: nothing the server counts.
    pub async fn grant(&self, user: Uuid, amount: i32) {
        let owner = self.database.owner().await;
        sqlx::query("select public.add_credits($1, $2, 'system', 'test grant')")
            .bind(user)
            .bind(amount)
            .execute(&owner)
            .await
            .expect("credits granted");
        owner.close().await;
    }

    /// Sends SIGTERM, as an orchestrator stopping the process does, and returns at once.
    pub fn send_sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }

    /// A request to the API.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url))
    }

    /// `GET /metrics` on the API's address; asserts a 200 and answers the text.
    pub async fn scrape(&self) -> String {
        let response = self
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .expect("the server answers");
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of one series (`name{labels}` exactly as rendered) in a Prometheus text
/// exposition, or `None` when the series is absent.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|value| value.trim().parse().expect("a sample value is a number"))
    })
}
