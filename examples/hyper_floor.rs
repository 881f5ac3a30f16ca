//! The floor under cachegate: a minimal hyper 1.x server with a hyper-util pooled client and
//! none of cachegate's work (no canonical path, routing, auth, cache lookup, metrics or logging).
//! It answers every GET with one fixed 102-byte JSON body (the size of an example product), as a
//! cache hit does, and proxies every other request to the upstream, as a write pass-through does.
//! `bench/cache` measures it beside cachegate (scenarios `floor` and `floor_write`) to separate
//! the HTTP engine's own per-request cost from cachegate's.
//!
//!   cargo run --release --example hyper_floor -- 127.0.0.1:8090 127.0.0.1:3000

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

const BODY: &[u8] = br#"{"description":"Seeded product number 1","id":1,"name":"Product 1","price":2.37,"stock":7,"version":1}"#;

type Out = BoxBody<Bytes, hyper::Error>;

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().expect("usage: hyper_floor LISTEN UPSTREAM");
    let upstream = args.next().expect("usage: hyper_floor LISTEN UPSTREAM");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        loop {
            let (stream, _) = listener.accept().await.expect("accept");
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (client, upstream) = (client.clone(), upstream.clone());
                    async move { Ok::<_, Infallible>(answer(req, &client, &upstream).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn answer(
    req: Request<Incoming>,
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
) -> Response<Out> {
    if req.method() == http::Method::GET {
        return Response::builder()
            .header("content-type", "application/json")
            .header("content-length", BODY.len())
            .body(
                Full::new(Bytes::from_static(BODY))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .expect("a response");
    }
    let (mut head, body) = req.into_parts();
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    head.uri = format!("http://{upstream}{target}").parse().expect("a URI");
    match client.request(Request::from_parts(head, body)).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => Response::builder()
            .status(502)
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .expect("a response"),
    }
}
