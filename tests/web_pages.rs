//! A web page the operator's browser visits cannot drive a node that has no API key: no forged
//! `text/plain` POSTs to the operator routes, no requests from another origin, no DNS rebinding
//! onto a loopback node. Clients that are not browsers (no `Origin`, a loopback `Host`) and the
//! dashboard (same origin) are served as before. Through the real router (`oneshot`); the
//! operator routes need a running node behind them, started on loopback.

mod support;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use llmesh::api::{self, ApiConfig};
use llmesh::node::Node;
use serde_json::{Value, json};
use support::cluster::empty_node;
use support::fake_engine::{Answer, chat_body, send, setup};

const NODE: &str = "127.0.0.1:8080";

/// The API of a node listening on `NODE`, as `Node::spawn` configures it.
fn loopback_config() -> ApiConfig {
    ApiConfig { allowed_hosts: api::allowed_hosts(NODE.parse().unwrap(), &[]), ..ApiConfig::default() }
}

fn operator_app(node: &Node, config: ApiConfig) -> Router {
    api::node_app(node.router().clone(), config)
}

/// A request as a client sends it: `host`, and `origin` when a browser page sends it.
fn request(method: &str, path: &str, host: &str, origin: Option<&str>) -> axum::http::request::Builder {
    let builder = Request::builder().method(method).uri(path).header(header::HOST, host);
    match origin {
        Some(origin) => builder.header(header::ORIGIN, origin),
        None => builder,
    }
}

fn json_body(builder: axum::http::request::Builder, body: Value) -> Request<Body> {
    builder.header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap()
}

fn code(answer: &Answer, status: StatusCode) -> String {
    answer.error(status)["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn operator_posts_must_say_they_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let app = operator_app(&node, loopback_config());
    let forged_key = json!({"key": "llmesh://join/attacker"}).to_string();
    // What an HTML form or a no-preflight `fetch` can send to any site.
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut builder = request("POST", "/api/join", NODE, None);
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        let answer = send(app.clone(), builder.body(Body::from(forged_key.clone())).unwrap()).await;
        assert_eq!(
            code(&answer, StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "unsupported_media_type",
            "{content_type:?}"
        );
    }
    let revoke =
        request("POST", "/api/nodes/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/revoke", NODE, None)
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("{}"))
            .unwrap();
    send(app.clone(), revoke).await.error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let mint = request("POST", "/api/invitations", NODE, None).body(Body::from("{}")).unwrap();
    send(app.clone(), mint).await.error(StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // The same body as JSON reaches the handler, which judges the key.
    let answer =
        send(app.clone(), json_body(request("POST", "/api/join", NODE, None), json!({"key": "x"}))).await;
    assert_eq!(answer.error(StatusCode::BAD_REQUEST)["param"], "key");
    // Reading needs no Content-Type.
    assert_eq!(
        send(app, request("GET", "/api/nodes", NODE, None).body(Body::empty()).unwrap()).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn pages_of_other_origins_are_refused_on_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let app = operator_app(&node, loopback_config());
    for origin in ["http://evil.example", "http://127.0.0.1:8081", "https://localhost:8080", "null"] {
        let join =
            json_body(request("POST", "/api/join", NODE, Some(origin)), json!({"key": "llmesh://join/x"}));
        assert_eq!(
            code(&send(app.clone(), join).await, StatusCode::FORBIDDEN),
            "cross_origin_request",
            "{origin}"
        );
        let mint = json_body(request("POST", "/api/invitations", NODE, Some(origin)), json!({}));
        send(app.clone(), mint).await.error(StatusCode::FORBIDDEN);
        let read = request("GET", "/api/nodes", NODE, Some(origin)).body(Body::empty()).unwrap();
        send(app.clone(), read).await.error(StatusCode::FORBIDDEN);
    }

    // /v1 too: a page may POST text/plain there without asking, and spend the node's compute.
    let (app, engine) = setup(loopback_config());
    let chat = request("POST", "/v1/chat/completions", NODE, Some("http://evil.example"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(chat_body("fake-chat").to_string()))
        .unwrap();
    assert_eq!(code(&send(app, chat).await, StatusCode::FORBIDDEN), "cross_origin_request");
    assert!(engine.last_generate.lock().unwrap().is_none(), "the engine never saw the request");
}

#[tokio::test]
async fn the_dashboard_on_the_node_s_own_origin_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let app = operator_app(&node, loopback_config());
    for (host, origin) in [(NODE, "http://127.0.0.1:8080"), ("localhost:8080", "http://localhost:8080")] {
        // What Chromium sends for the dashboard's `postJson` and its GETs (no Origin on a
        // same-origin GET).
        let mint = json_body(request("POST", "/api/invitations", host, Some(origin)), json!({"uses": 1}));
        let answer = send(app.clone(), mint).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
        let read = request("GET", "/api/nodes", host, None).body(Body::empty()).unwrap();
        assert_eq!(send(app.clone(), read).await.status, StatusCode::OK);
        let page = request("GET", "/", host, None).body(Body::empty()).unwrap();
        assert_eq!(send(app.clone(), page).await.status, StatusCode::OK);
    }
    let (app, _) = setup(loopback_config());
    let chat = json_body(
        request("POST", "/v1/chat/completions", NODE, Some("http://127.0.0.1:8080")),
        chat_body("fake-chat"),
    );
    assert_eq!(send(app, chat).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_rebound_name_is_refused_on_a_loopback_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let app = operator_app(&node, loopback_config());
    // After DNS rebinding the page is "same origin" with itself: only the name gives it away.
    let rebound = "evil.example:8080";
    let origin = Some("http://evil.example:8080");
    let read = request("GET", "/api/nodes", rebound, origin).body(Body::empty()).unwrap();
    assert_eq!(code(&send(app.clone(), read).await, StatusCode::FORBIDDEN), "unknown_host");
    let read = request("GET", "/api/nodes", rebound, None).body(Body::empty()).unwrap();
    send(app.clone(), read).await.error(StatusCode::FORBIDDEN);
    let mint = json_body(request("POST", "/api/invitations", rebound, origin), json!({}));
    send(app.clone(), mint).await.error(StatusCode::FORBIDDEN);
    let revoke = json_body(
        request(
            "POST",
            "/api/nodes/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/revoke",
            rebound,
            origin,
        ),
        Value::Null,
    );
    send(app.clone(), revoke).await.error(StatusCode::FORBIDDEN);

    // A name the operator configured (a reverse proxy's) is answered.
    let configured = ApiConfig {
        allowed_hosts: api::allowed_hosts(NODE.parse().unwrap(), &["llmesh.example".into()]),
        ..ApiConfig::default()
    };
    let proxied = request("GET", "/api/nodes", "llmesh.example", Some("https://llmesh.example"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(operator_app(&node, configured), proxied).await.status, StatusCode::OK);
}

#[tokio::test]
async fn clients_that_are_not_browsers_are_served_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let app = operator_app(&node, loopback_config());
    // `llmesh nodes|invite` (ureq) and curl: the node's address as Host, no Origin.
    for host in [NODE, "localhost:8080", "[::1]:8080"] {
        let read = request("GET", "/api/nodes", host, None).body(Body::empty()).unwrap();
        assert_eq!(send(app.clone(), read).await.status, StatusCode::OK, "{host}");
    }
    let mint = json_body(request("POST", "/api/invitations", NODE, None), json!({"uses": 2}));
    assert_eq!(send(app.clone(), mint).await.json()["uses"], 2);
    // HTTP/1.0 clients may send no Host at all.
    let bare = Request::get("/api/stats").body(Body::empty()).unwrap();
    assert_eq!(send(app, bare).await.status, StatusCode::OK);
    // curl -d sends form encoding; /v1 still takes the JSON inside.
    let (app, _) = setup(loopback_config());
    let curl = request("POST", "/v1/chat/completions", NODE, None)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(chat_body("fake-chat").to_string()))
        .unwrap();
    assert_eq!(send(app, curl).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_running_node_answers_only_to_its_loopback_names() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let node = empty_node("target", &dir, Vec::new(), None).await;
    let address = node.http_address();
    let cases = [
        (address.to_string(), "HTTP/1.1 200"),
        (format!("localhost:{}", address.port()), "HTTP/1.1 200"),
        (format!("evil.example:{}", address.port()), "HTTP/1.1 403"),
    ];
    for (host, status) in cases {
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let request = format!("GET /api/nodes HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with(status), "{host}: {answer}");
    }
}
