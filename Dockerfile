# syntax=docker/dockerfile:1
# Build: a full Rust toolchain, dependencies cached in their own layer.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY migrations ./migrations
# Compile the dependencies against a placeholder crate so that this layer survives code changes.
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
    && strip target/release/amethyst-credits

# Run: glibc, CA certificates (Stripe, the JWKS), no shell, an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/amethyst-credits /usr/local/bin/amethyst-credits
ENV BIND_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json
EXPOSE 8080
USER nonroot:nonroot
# On SIGTERM `serve` answers /ready with 503 for SHUTDOWN_DRAIN_SECONDS, then finishes the
# requests in flight and exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/amethyst-credits"]
CMD ["serve"]
