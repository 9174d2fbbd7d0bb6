//! The call page in a real `peercall node`: the page and its assets are served
//! without the token with the right content types and a strict Content-Security-
//! Policy, every `/v1/*` request needs the token, cross-origin requests are refused,
//! and `peercall page` prints the signed-in link.

mod common;

use std::process::Command;

use common::*;

/// Every directive the page's policy must hold: nothing but the node's own
/// scripts, styles and API, no framing, no form submission, Trusted Types.
const CSP_DIRECTIVES: [&str; 8] = [
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "frame-ancestors 'none'",
    "form-action 'none'",
    "base-uri 'none'",
    "require-trusted-types-for 'script'",
];

fn get_with(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http(d.admin(), "GET", path, headers, "").expect("GET")
}

fn assert_page_headers(r: &HttpResponse, path: &str, content_type: &str) {
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    assert_eq!(r.header("content-type"), Some(content_type), "{path}");
    let csp = r.header("content-security-policy").expect("a CSP");
    for directive in CSP_DIRECTIVES {
        assert!(csp.contains(directive), "{path}: {directive} in {csp}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{path}"
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{path}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{path}");
    assert!(
        r.header("access-control-allow-origin").is_none(),
        "{path}: no CORS"
    );
}

#[test]
fn page_is_served_strictly_and_the_api_needs_the_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("node");
    let mut node = Daemon::start(&dir);
    let token = node.token();
    let auth = format!("Bearer {token}");
    let admin = node.admin();

    // The page and its assets, open, each with its type and the policy.
    let page = node.get("/");
    assert_page_headers(&page, "/", "text/html; charset=utf-8");
    assert!(page.body.starts_with("<!doctype html>"));
    assert!(!page.body.contains(&token), "the page carries no secret");
    for (path, content_type, marker) in [
        (
            "/assets/app.js",
            "text/javascript; charset=utf-8",
            "/v1/contacts",
        ),
        ("/assets/app.css", "text/css; charset=utf-8", "--accent"),
        ("/assets/icon.svg", "image/svg+xml", "<svg"),
    ] {
        assert!(page.body.contains(path), "the page loads {path}");
        let r = node.get(path);
        assert_page_headers(&r, path, content_type);
        assert!(r.body.contains(marker), "{path}");
    }
    let r = node.get("/assets/missing.js");
    assert_eq!(r.status, 404);
    let r = node.get("/assets/..%2Fadmin.rs");
    assert_eq!(r.status, 404);

    // The API refuses every request without the token, unknown paths included
    // (401 before 404), and counts them.
    for (method, path) in [
        ("GET", "/v1/contacts"),
        ("GET", "/v1/lookup?q=bob"),
        ("GET", "/v1/events"),
        ("POST", "/v1/contacts"),
        ("DELETE", "/v1/contacts/bob"),
        ("GET", "/v1/calls"),
        ("POST", "/v1/calls"),
        ("POST", "/v1/webrtc/offer?call=1"),
        ("GET", "/v1/no-such-thing"),
    ] {
        let r = http(admin, method, path, &[], "{}").expect("request");
        assert_eq!(r.status, 401, "{method} {path} without token: {}", r.body);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{method} {path}"
        );
        let r =
            http(admin, method, path, &[("Authorization", "Bearer 00")], "{}").expect("request");
        assert_eq!(r.status, 401, "{method} {path} with a wrong token");
    }
    let m = node.get("/metrics");
    assert_eq!(
        metric(&m.body, "peercall_admin_unauthorized_total"),
        Some(18.0)
    );

    // With the token: the page's reads work, and the call API's absence is a plain
    // 404 (no JSON error body), which the page reads as "calls not available".
    let r = get_with(&node, "/v1/contacts", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["contacts"], serde_json::json!([]));
    let r = get_with(&node, "/v1/no-such-thing", &[("Authorization", &auth)]);
    assert_eq!(r.status, 404);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    // The page's own requests (same origin) pass.
    let own = format!("http://{admin}");
    let r = get_with(
        &node,
        "/v1/contacts",
        &[
            ("Authorization", &auth),
            ("Origin", &own),
            ("Sec-Fetch-Site", "same-origin"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // Other origins are refused, token or not; so are their preflights.
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Origin", "http://127.0.0.1:1")],
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
    ] {
        let mut with_token = headers.clone();
        with_token.push(("Authorization", &auth));
        for path in ["/v1/contacts", "/status"] {
            let r = get_with(&node, path, &with_token);
            assert_eq!(r.status, 403, "{path} {headers:?}: {}", r.body);
            assert!(r.header("access-control-allow-origin").is_none());
        }
    }
    let r = http(
        admin,
        "OPTIONS",
        "/v1/contacts",
        &[
            ("Origin", "http://evil.example"),
            ("Access-Control-Request-Method", "POST"),
            ("Access-Control-Request-Headers", "authorization"),
        ],
        "",
    )
    .expect("OPTIONS");
    assert_eq!(r.status, 403);
    assert!(r.header("access-control-allow-origin").is_none());
    // A link from elsewhere may open the page (it holds no secret), and only the page.
    let navigation = [
        ("Sec-Fetch-Site", "cross-site"),
        ("Sec-Fetch-Mode", "navigate"),
        ("Sec-Fetch-Dest", "document"),
    ];
    assert_eq!(get_with(&node, "/", &navigation).status, 200);
    assert_eq!(get_with(&node, "/assets/app.js", &navigation).status, 403);
    assert_eq!(get_with(&node, "/status", &navigation).status, 403);

    // JSON answers may not be framed or sniffed either.
    let r = node.get("/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.header("content-security-policy"),
        Some("default-src 'none'; frame-ancestors 'none'")
    );

    // `peercall page` prints the link that signs the browser in.
    let out = Command::new(env!("CARGO_BIN_EXE_peercall"))
        .args(["page", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run peercall page");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("http://{admin}/#token={token}")
    );

    node.stop();
    // The token never reached the log.
    assert!(!node.stderr().contains(&token));
    // Without a running node, `peercall page` says so.
    let out = Command::new(env!("CARGO_BIN_EXE_peercall"))
        .args(["page", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run peercall page");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no peercall node is running"),
        "{out:?}"
    );
}
