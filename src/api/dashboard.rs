//! The web dashboard: a static page (HTML, CSS and JavaScript built into the binary) that every
//! node serves at `/`, with its files under `/assets/`. The page itself holds no data: the
//! browser polls `/api/nodes`, `/api/stats`, `/api/models`, `/api/keys` and `/v1/models` and
//! streams chats from `/v1/chat/completions`, sending the API key it asked the user for. So the
//! page and its files are served without a key, and nothing here keeps state.
//!
//! Files are revalidated on every load (`no-cache` with an `ETag` computed at compile time), so
//! an upgraded node never serves a stale script next to a new page.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
    /// A hash of `body`, computed at compile time.
    hash: u64,
}

const fn embed(name: &'static str, content_type: &'static str, body: &'static str) -> Asset {
    Asset { name, content_type, body, hash: fnv1a(body.as_bytes()) }
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JAVASCRIPT: &str = "text/javascript; charset=utf-8";
const SVG: &str = "image/svg+xml";

const INDEX: Asset = embed("index.html", HTML, include_str!("../../assets/dashboard/index.html"));

/// Everything under `/assets/`.
const ASSETS: &[Asset] = &[
    embed("dashboard.css", CSS, include_str!("../../assets/dashboard/dashboard.css")),
    embed("dashboard.js", JAVASCRIPT, include_str!("../../assets/dashboard/dashboard.js")),
    embed("api.js", JAVASCRIPT, include_str!("../../assets/dashboard/api.js")),
    embed("dom.js", JAVASCRIPT, include_str!("../../assets/dashboard/dom.js")),
    embed("format.js", JAVASCRIPT, include_str!("../../assets/dashboard/format.js")),
    embed("chat.js", JAVASCRIPT, include_str!("../../assets/dashboard/chat.js")),
    embed("membership.js", JAVASCRIPT, include_str!("../../assets/dashboard/membership.js")),
    embed("models.js", JAVASCRIPT, include_str!("../../assets/dashboard/models.js")),
    embed("keys.js", JAVASCRIPT, include_str!("../../assets/dashboard/keys.js")),
    embed("favicon.svg", SVG, include_str!("../../assets/dashboard/favicon.svg")),
];

/// The page may only run its own scripts and talk to its own origin: the API key lives in the
/// page, so no injected script or third-party origin may reach it.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the dashboard page.
pub async fn index(headers: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &headers);
    let response_headers = response.headers_mut();
    response_headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_POLICY));
    response_headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /assets/{file}`: one of the dashboard's files; any other name is the API's 404.
pub async fn asset(method: Method, uri: Uri, headers: HeaderMap) -> Result<Response, ApiError> {
    let name = uri.path().strip_prefix("/assets/").unwrap_or_default();
    let found = ASSETS.iter().find(|asset| asset.name == name);
    let asset = found.ok_or_else(|| ApiError::RouteNotFound { method, path: uri.path().to_owned() })?;
    Ok(serve(asset, &headers))
}

fn serve(asset: &Asset, request_headers: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let mut response = if matches_etag(request_headers, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(CONTENT_TYPE, HeaderValue::from_static(asset.content_type))], asset.body).into_response()
    };
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(ETAG, value);
    }
    response
}

/// Whether the browser's cached copy (`If-None-Match`) is this version.
fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    let Some(offered) = headers.get(IF_NONE_MATCH).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    offered.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

/// 64-bit FNV-1a: enough to tell versions of a file apart, and computable in a `const`.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut index = 0;
    while index < bytes.len() {
        hash ^= bytes[index] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        index += 1;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> Uri {
        uri.parse().unwrap()
    }

    async fn body_text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn index_is_html_with_a_strict_policy() {
        let response = index(HeaderMap::new()).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], HTML);
        assert!(response.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().contains("script-src 'self'"));
        assert!(body_text(response).await.contains("<title>llmesh</title>"));
    }

    #[tokio::test]
    async fn assets_have_their_content_types() {
        for (name, content_type) in
            [("dashboard.css", CSS), ("dashboard.js", JAVASCRIPT), ("favicon.svg", SVG)]
        {
            let response =
                asset(Method::GET, request(&format!("/assets/{name}")), HeaderMap::new()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{name}");
            assert_eq!(response.headers()[CONTENT_TYPE], content_type, "{name}");
            assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
        }
    }

    #[tokio::test]
    async fn unknown_asset_is_the_api_404() {
        let error = asset(Method::GET, request("/assets/secret.toml"), HeaderMap::new()).await.unwrap_err();
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.body().error.code, Some("unknown_url"));
        let traversal = asset(Method::GET, request("/assets/..%2Fmod.rs"), HeaderMap::new()).await;
        assert!(traversal.is_err());
    }

    #[tokio::test]
    async fn a_cached_copy_is_revalidated_with_its_etag() {
        let first = asset(Method::GET, request("/assets/dashboard.js"), HeaderMap::new()).await.unwrap();
        let etag = first.headers()[ETAG].clone();
        let mut headers = HeaderMap::new();
        headers.insert(IF_NONE_MATCH, etag);
        let again = asset(Method::GET, request("/assets/dashboard.js"), headers).await.unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert!(body_text(again).await.is_empty());

        let mut stale = HeaderMap::new();
        stale.insert(IF_NONE_MATCH, HeaderValue::from_static("\"0000000000000000\""));
        let refreshed = asset(Method::GET, request("/assets/dashboard.js"), stale).await.unwrap();
        assert_eq!(refreshed.status(), StatusCode::OK);
    }

    /// Every `/assets/...` the page links and every module a script imports is embedded.
    #[test]
    fn every_referenced_file_is_embedded() {
        let mut referenced = Vec::new();
        for source in std::iter::once(INDEX.body).chain(ASSETS.iter().map(|asset| asset.body)) {
            for marker in ["/assets/", "from './"] {
                for (start, _) in source.match_indices(marker) {
                    let rest = &source[start + marker.len()..];
                    let end = rest.find(['"', '\'', '?', ')']).unwrap_or(rest.len());
                    referenced.push(rest[..end].to_string());
                }
            }
        }
        assert!(referenced.iter().any(|name| name == "dashboard.js"), "{referenced:?}");
        for name in referenced {
            assert!(ASSETS.iter().any(|asset| asset.name == name), "{name} is referenced but not embedded");
        }
    }
}
