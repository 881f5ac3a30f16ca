//! The floor under cachegate: a bare pingora `ProxyHttp` with no routing, auth, cache lookup,
//! metrics or logging. It answers every GET from `request_filter` with one fixed 102-byte JSON
//! body (the size of an example product), as a cache hit does, and proxies every other request
//! to the upstream, as a write pass-through does. `bench/cache` measures it beside cachegate
//! (scenarios `floor` and `floor_write`) to separate pingora's own per-request cost from
//! cachegate's.
//!
//!   cargo run --release --example pingora_floor -- 127.0.0.1:8090 127.0.0.1:3000

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

const BODY: &[u8] = br#"{"description":"Seeded product number 1","id":1,"name":"Product 1","price":2.37,"stock":7,"version":1}"#;

struct Floor {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        if session.req_header().method != http::Method::GET {
            return Ok(false);
        }
        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        header.insert_header(http::header::CONTENT_LENGTH, BODY.len().to_string())?;
        header.insert_header(http::header::ETAG, "\"1-1\"")?;
        header.insert_header(http::header::AGE, "1")?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(Bytes::from_static(BODY)), true)
            .await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:8090".to_owned());
    let upstream = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let conf = ServerConf {
        threads: 1,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Floor { upstream });
    service.add_tcp(&address);
    server.add_service(service);
    server.run_forever();
}
