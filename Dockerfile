# Multi-stage build: compile in the Rust image, run in slim Debian as a non-root user.
#   docker build -t cachegate .
#   docker run -p 8080:8080 -v $PWD/config/docker.toml:/etc/cachegate/cachegate.toml:ro cachegate
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cachegate
COPY --from=build /src/target/release/cachegate /usr/local/bin/cachegate
COPY --from=build /src/target/release/upstream-example /usr/local/bin/upstream-example
# A default configuration; mount your own over it.
COPY config/docker.toml /etc/cachegate/cachegate.toml
USER cachegate
# 8080: clients. 9901: the admin listener (health, readiness, metrics, reload).
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1
ENTRYPOINT ["cachegate"]
CMD ["run", "--config", "/etc/cachegate/cachegate.toml"]
