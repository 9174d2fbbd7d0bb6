//! The call page the node serves at its admin address: `GET /` and its assets under
//! `/assets/`, plain HTML, CSS and JavaScript compiled into the binary
//! (`include_str!`), with no build step and nothing loaded from elsewhere. The
//! WebRTC echo diagnostic (`/webrtc/echo`, feature `webrtc`) is built and served
//! the same way.
//!
//! The page carries no secrets, so it is served without the token; everything it
//! does goes through the token-protected `/v1/*` API. The person signs in with the
//! node's admin token (pasted, or in the URL fragment `#token=…`, which browsers
//! never send to a server: `peercall page` prints such a link); the page keeps it
//! in `sessionStorage` for the tab's life and removes it from the address bar.
//!
//! Every page response carries [`PAGE_CSP`]: scripts and styles only from the node
//! itself, no inline code, no framing, requests only to the node, and Trusted Types
//! enforced (the page builds its DOM with `textContent` only). Cross-origin requests
//! to the API are refused by the admin router (see `admin::same_origin`).

use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The Content-Security-Policy of the page and its assets.
///
/// - `default-src 'none'`: nothing is allowed unless listed below.
/// - `script-src 'self'`, `style-src 'self'`: only the node's own files; no inline
///   script or style, no `eval`.
/// - `connect-src 'self'`: `fetch` only to the admin API that served the page.
/// - `img-src 'self'`: the favicon.
/// - `media-src mediastream: blob:`: the call's audio comes from a WebRTC stream.
/// - `base-uri 'none'`, `form-action 'none'`: no `<base>` hijack, and the forms
///   (handled in script) can never submit the token anywhere.
/// - `frame-ancestors 'none'`: no clickjacking through frames.
/// - `require-trusted-types-for 'script'; trusted-types 'none'`: DOM XSS sinks
///   (`innerHTML` and the like) are closed.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self'; media-src mediastream: blob:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
    trusted-types 'none'";

/// The policy for everything else the admin API answers (JSON, text): nothing in it
/// may run or load anything, and it may not be framed.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its name under `/assets/` (the page itself is `/`).
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static str,
}

/// The page, served at `/`.
pub const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("page/index.html"),
};

/// The echo diagnostic, served at `/webrtc/echo` (feature `webrtc`).
#[cfg(any(feature = "webrtc", test))]
pub const ECHO: Asset = Asset {
    name: "echo.html",
    content_type: "text/html; charset=utf-8",
    body: include_str!("page/echo.html"),
};

/// The files under `/assets/`: the call page's, then the echo diagnostic's.
pub const ASSETS: [Asset; 5] = [
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("page/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("page/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("page/icon.svg"),
    },
    Asset {
        name: "echo.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("page/echo.js"),
    },
    Asset {
        name: "echo.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("page/echo.css"),
    },
];

/// The response for an asset, with the page's headers: no caching (a new binary
/// serves new files at the same names), no type sniffing, no referrer, an isolated
/// browsing context.
fn serve(asset: &Asset) -> Response {
    let headers: [(HeaderName, HeaderValue); 7] = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, asset.body).into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    serve(&INDEX)
}

/// `GET /webrtc/echo`: the echo diagnostic.
#[cfg(feature = "webrtc")]
pub async fn echo() -> Response {
    serve(&ECHO)
}

/// `GET /assets/{name}`: one of [`ASSETS`], 404 otherwise.
pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve(asset),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no such asset\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_self_contained_and_load_only_their_assets() {
        for page in [INDEX, ECHO] {
            // No inline script or style: the CSP would block them.
            let html = page.body;
            assert!(
                !html.contains("<script>") && !html.contains("style="),
                "inline code in {}",
                page.name
            );
            assert!(!html.contains("<style"), "inline style sheet");
        }
        for asset in ASSETS {
            let reference = format!("\"/assets/{}\"", asset.name);
            assert!(
                INDEX.body.contains(&reference) || ECHO.body.contains(&reference),
                "{} referenced",
                asset.name
            );
        }
        // Nothing from elsewhere, in any file (an SVG names its XML namespace with
        // a URL, which is a name, never fetched).
        for asset in ASSETS.iter().chain([&INDEX, &ECHO]) {
            let body = asset
                .body
                .replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            for external in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(
                    !body.contains(external),
                    "{} mentions {external}",
                    asset.name
                );
            }
        }
    }

    #[test]
    fn scripts_use_no_dom_sinks_or_eval() {
        for js in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "console.log",
            ] {
                assert!(!js.body.contains(sink), "{} uses {sink}", js.name);
            }
        }
    }

    #[test]
    fn policy_is_strict() {
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'none'",
        ] {
            assert!(PAGE_CSP.contains(directive), "{directive}");
        }
        assert!(!PAGE_CSP.contains("unsafe"), "no unsafe-* source");
        assert!(HeaderValue::from_str(PAGE_CSP).is_ok());
    }
}
