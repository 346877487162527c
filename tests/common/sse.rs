//! A reader of `text/event-stream` answers, from the router in-process or from a server over
//! HTTP: events as the live balance stream sends them, comments (keep-alives) skipped.
#![allow(dead_code)]

use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use serde_json::Value;

/// One event: its `event:` name, its `id:` when it has one, and its `data:` as JSON.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub name: String,
    pub id: Option<String>,
    /// The `retry:` it carries, in milliseconds.
    pub retry: Option<u64>,
    pub data: Value,
}

impl SseEvent {
    /// The `id:` as the ledger sequence number it is.
    pub fn seq(&self) -> i64 {
        self.id
            .as_deref()
            .expect("the event has an id")
            .parse()
            .expect("the id is a number")
    }
}

enum Source {
    Router(Body),
    Http(reqwest::Response),
}

/// An open event stream.
pub struct EventStream {
    source: Source,
    buffer: String,
}

/// How long one event may take to come before a test gives up, so that a missing event fails
/// the test rather than hanging it. Not a measure of anything.
const GUARD: Duration = Duration::from_secs(20);

impl EventStream {
    pub fn from_router(body: Body) -> Self {
        EventStream {
            source: Source::Router(body),
            buffer: String::new(),
        }
    }

    pub fn from_http(response: reqwest::Response) -> Self {
        EventStream {
            source: Source::Http(response),
            buffer: String::new(),
        }
    }

    async fn chunk(&mut self) -> Option<Vec<u8>> {
        match &mut self.source {
            Source::Router(body) => loop {
                match body.frame().await? {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            return Some(data.to_vec());
                        }
                    }
                    Err(_) => return None,
                }
            },
            Source::Http(response) => response.chunk().await.ok().flatten().map(|b| b.to_vec()),
        }
    }

    /// The next event, or `None` once the server has ended the stream.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(GUARD, self.next_unguarded())
            .await
            .expect("an event (or the end of the stream) arrives")
    }

    async fn next_unguarded(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    return Some(event);
                }
            }
            let chunk = self.chunk().await?;
            self.buffer
                .push_str(&String::from_utf8(chunk).expect("UTF-8"));
        }
    }

    /// The next `count` events.
    pub async fn take(&mut self, count: usize) -> Vec<SseEvent> {
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            events.push(self.next().await.expect("the stream goes on"));
        }
        events
    }

    /// The next event, which must be a `transaction`.
    pub async fn transaction(&mut self) -> SseEvent {
        let event = self.next().await.expect("the stream goes on");
        assert_eq!(event.name, "transaction", "{event:?}");
        event
    }
}

fn parse(block: &str) -> Option<SseEvent> {
    let (mut name, mut id, mut retry, mut data) = (None, None, None, Vec::new());
    for line in block.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = Some(value.trim_start().to_owned());
        } else if let Some(value) = line.strip_prefix("id:") {
            id = Some(value.trim_start().to_owned());
        } else if let Some(value) = line.strip_prefix("retry:") {
            retry = Some(value.trim_start().parse().expect("retry is a number"));
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value).to_owned());
        }
        // `:` lines are comments (keep-alives).
    }
    if data.is_empty() {
        return None;
    }
    Some(SseEvent {
        name: name.unwrap_or_else(|| "message".to_owned()),
        id,
        retry,
        data: serde_json::from_str(&data.join("\n")).expect("data is JSON"),
    })
}
