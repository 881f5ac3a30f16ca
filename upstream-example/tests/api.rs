//! The example backend's API, tested through its real binary over a socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_upstream-example"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "upstream-example exited early"
            );
            assert!(Instant::now() < deadline, "upstream-example did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server { child, port }
    }

    /// One request on its own connection; returns (status, headers in lower case, body).
    fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, Vec<(String, String)>, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        (status, headers, body.to_owned())
    }

    fn json(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let (status, _, body) = self.call(method, path, &[], body);
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).unwrap()
        };
        (status, value)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn products_crud_with_validation() {
    let server = Server::start(&["--seed", "10"]);

    let (status, page) = server.json("GET", "/products?page=2&per_page=3", "");
    assert_eq!(status, 200);
    assert_eq!(page["total"], 10);
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    assert_eq!(page["items"][0]["id"], 4);
    assert_eq!(server.json("GET", "/products?per_page=1001", "").0, 400);
    assert_eq!(server.json("GET", "/products?page=0", "").0, 400);

    assert_eq!(server.json("GET", "/products/abc", "").0, 400);
    let (status, missing) = server.json("GET", "/products/999", "");
    assert_eq!(
        (status, missing["error"].as_str()),
        (404, Some("not_found"))
    );

    assert_eq!(server.json("POST", "/products", "{not json").0, 400);
    let (status, invalid) = server.json("POST", "/products", r#"{"name":"","price":-2}"#);
    assert_eq!(status, 422);
    let fields: Vec<&str> = invalid["fields"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["field"].as_str())
        .collect();
    assert!(
        fields.contains(&"name") && fields.contains(&"price") && fields.contains(&"stock"),
        "{invalid}"
    );

    let (status, headers, body) = server.call(
        "POST",
        "/products",
        &[],
        r#"{"name":"Kettle","price":30,"stock":4}"#,
    );
    assert_eq!(status, 201);
    let created: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(header(&headers, "location"), Some("/products/11"));
    assert_eq!(created["version"], 1);

    assert_eq!(
        server.json("PUT", "/products/11", r#"{"name":"Kettle"}"#).0,
        422,
        "PUT needs every field"
    );
    let (status, replaced) = server.json(
        "PUT",
        "/products/11",
        r#"{"name":"Kettle 2","price":31,"stock":5,"description":"steel"}"#,
    );
    assert_eq!((status, replaced["version"].as_i64()), (200, Some(2)));
    let (status, patched) = server.json("PATCH", "/products/11", r#"{"stock":0}"#);
    assert_eq!(
        (status, patched["stock"].as_i64(), patched["name"].as_str()),
        (200, Some(0), Some("Kettle 2"))
    );
    assert_eq!(server.json("PATCH", "/products/11", "{}").0, 422);

    let (status, headers, _) = server.call("GET", "/products/11", &[], "");
    assert_eq!(status, 200);
    let etag = header(&headers, "etag").expect("an ETag").to_owned();
    assert_eq!(etag, "\"11-3\"");
    let (status, _, body) = server.call("GET", "/products/11", &[("If-None-Match", &etag)], "");
    assert_eq!((status, body.as_str()), (304, ""));

    assert_eq!(server.json("DELETE", "/products/11", "").0, 204);
    assert_eq!(server.json("GET", "/products/11", "").0, 404);
    assert_eq!(server.json("DELETE", "/products/11", "").0, 404);

    let (status, headers, _) = server.call("PUT", "/products", &[], "");
    assert_eq!(status, 405);
    assert_eq!(header(&headers, "allow"), Some("GET, HEAD, POST"));

    let (_, stats) = server.json("GET", "/__stats", "");
    assert_eq!(
        stats["requests"]["GET /products/{id}"], 4,
        "an invalid id is refused before it counts"
    );
    assert_eq!(stats["requests"]["POST /products"], 3);
    assert_eq!(stats["requests"]["DELETE /products/{id}"], 2);
}

#[test]
fn seeds_half_a_million_products() {
    let server = Server::start(&["--seed", "500000"]);
    let (status, page) = server.json("GET", "/products?page=25000&per_page=20", "");
    assert_eq!(status, 200);
    assert_eq!(page["total"], 500000);
    assert_eq!(page["items"][19]["id"], 500000);
}

#[test]
fn db_latency_delays_database_calls() {
    let server = Server::start(&["--seed", "1", "--db-latency-ms", "300"]);
    let started = Instant::now();
    assert_eq!(server.json("GET", "/products/1", "").0, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(server.json("GET", "/health", "").0, 200);
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "health does not touch the database"
    );
}

#[test]
fn busy_address_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_upstream-example"))
        .args(["--listen", &addr.to_string(), "--seed", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on {addr}")));
}
