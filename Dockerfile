# Builds every orderflow binary once; each compose service runs one of them.
FROM rust:1.94-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p topology -p migrate -p dlq -p publisher -p payment-gateway-sim \
      -p order-worker -p inventory-worker -p payment-worker -p notification-worker \
 && mkdir /out \
 && cp target/release/topology target/release/migrate target/release/dlq \
       target/release/publisher target/release/payment-gateway-sim \
       target/release/order-worker target/release/inventory-worker \
       target/release/payment-worker target/release/notification-worker /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER nobody
