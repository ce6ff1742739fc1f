# Multi-stage build: compile with the Rust toolchain, run on a slim Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/tierproxy --create-home tierproxy
COPY --from=build /src/target/release/tierproxy /usr/local/bin/tierproxy
COPY conf/tierproxy.example.toml /etc/tierproxy/tierproxy.toml
USER tierproxy
WORKDIR /var/lib/tierproxy
# Listen on all interfaces inside the container; override with env or a mounted file.
ENV TIERPROXY_LISTEN=0.0.0.0:6380 \
    TIERPROXY_ADMIN_LISTEN=0.0.0.0:9121
EXPOSE 6380 9121
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9121/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/tierproxy"]
CMD ["--config", "/etc/tierproxy/tierproxy.toml"]
