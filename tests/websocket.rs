//! Upgrade pass-through: a WebSocket handshake goes through the gateway to a real WebSocket
//! echo server, and frames flow both ways on the upgraded connection.

mod common;

use common::{config_for, Gateway};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server on a free loopback port; runs until the test ends.
async fn echo_server() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        if ws.send(message).await.is_err() {
                            return;
                        }
                    } else if message.is_close() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn websocket_frames_pass_both_ways() {
    let origin = echo_server().await;
    let gateway = Gateway::start(&config_for(
        &[&format!("http://127.0.0.1:{origin}")],
        r#"
[[routes]]
path = "/ws"
rate_limit = { limits = [ { rate = "100/second", key = "ip" } ] }
"#,
    ));
    let (mut ws, response) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gateway.port))
            .await
            .expect("the handshake passes through the gateway");
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.expect("an answer").unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
}
