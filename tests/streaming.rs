//! Large bodies stream through the gateway in both directions, intact, without being buffered:
//! the gateway's peak memory grows by far less than the body size.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::{config_for, Client, Gateway, Upstream};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use sha2::{Digest, Sha256};

const SIZE: u64 = 200 * 1024 * 1024;
const CHUNK: u64 = 64 * 1024;
/// Peak RSS may grow by at most this much while 200 MiB pass each way.
const MAX_GROWTH_KIB: u64 = 48 * 1024;

/// Chunk `index` of the pattern the upstream's `/__bytes/{n}` serves: byte `i` is `i % 251`.
fn pattern_chunk(offset: u64, len: u64) -> Bytes {
    Bytes::from(
        (offset..offset + len)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn two_hundred_megabytes_stream_both_ways_with_flat_memory() {
    let upstream = Upstream::start();
    let gateway = Gateway::start(&config_for(
        &[&upstream.url()],
        "[limits]\nmax_request_body_bytes = \"1GiB\"\n",
    ));
    let client = Client::new();
    // Warm up, so the baseline includes the connection pools and buffers of a normal request.
    assert_eq!(
        client.get(&gateway.url("/products/1")).await.status,
        StatusCode::OK
    );
    let baseline = gateway.process.peak_rss_kib();
    assert!(baseline > 0, "reading /proc/PID/status failed");

    // Upload: generated lazily chunk by chunk, with a Content-Length, hashed as it is produced.
    let mut expected = Sha256::new();
    let chunks = (0..SIZE / CHUNK).map(move |i| -> Result<Frame<Bytes>, Infallible> {
        Ok(Frame::data(pattern_chunk(i * CHUNK, CHUNK)))
    });
    for i in 0..SIZE / CHUNK {
        expected.update(pattern_chunk(i * CHUNK, CHUNK));
    }
    let expected = hex(expected.finalize());
    let body = BoxBody::new(StreamBody::new(futures_util::stream::iter(chunks)));
    let req = Request::post(gateway.url("/__sink"))
        .header("content-length", SIZE.to_string())
        .body(body)
        .unwrap();
    let resp = client.request(req).await;
    assert_eq!(resp.status, StatusCode::OK);
    let received = resp.json();
    assert_eq!(received["bytes"], SIZE, "the origin received every byte");
    assert_eq!(
        received["sha256"],
        expected.as_str(),
        "the origin received the bytes intact"
    );

    // Download: hashed frame by frame as it arrives.
    let req = Request::get(gateway.url(&format!("/__bytes/{SIZE}")))
        .body(common::full(Bytes::new()))
        .unwrap();
    let resp = client.stream(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
    let mut body = resp.into_body();
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("reading the download");
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            hasher.update(data);
        }
    }
    assert_eq!(total, SIZE);
    assert_eq!(
        hex(hasher.finalize()),
        expected,
        "the download arrived intact"
    );

    let growth = gateway.process.peak_rss_kib().saturating_sub(baseline);
    assert!(
        growth < MAX_GROWTH_KIB,
        "peak memory grew by {growth} KiB while streaming {SIZE} bytes each way: something buffers whole bodies"
    );
}
