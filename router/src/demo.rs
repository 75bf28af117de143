//! The demo chat page (`--serve-demo DIR`): static files from one directory under `/demo/`,
//! read on each request (off the async threads). Only plain names are served (letters, digits, `-`, `_`, `.`, and
//! `/` between them, no `..`), with a content type by extension; anything else is 404.

use std::path::Path;

use bytes::Bytes;
use common::ErrorCode;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use chat_server::http::{error, Body};

/// `/` and `/demo` send the browser to `/demo/`.
pub fn redirect() -> Response<Body> {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = StatusCode::FOUND;
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/demo/"));
    resp
}

/// The file at `rest` (the path after `/demo/`) in `dir`.
pub async fn file(dir: &Path, rest: &str) -> Response<Body> {
    let rest = if rest.is_empty() { "index.html" } else { rest };
    let plain = rest.split('/').all(|part| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    });
    let Some(kind) = plain.then(|| content_type(rest)).flatten() else {
        return error(ErrorCode::NotFound, "no such demo file");
    };
    let path = dir.join(rest);
    match tokio::task::spawn_blocking(move || std::fs::read(path)).await {
        Ok(Ok(bytes)) => Response::builder()
            .header(header::CONTENT_TYPE, kind)
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Full::new(Bytes::from(bytes)))
            .unwrap_or_else(|_| Response::new(Full::default())),
        _ => error(ErrorCode::NotFound, "no such demo file"),
    }
}

fn content_type(path: &str) -> Option<&'static str> {
    Some(match path.rsplit_once('.')?.1 {
        "html" => "text/html; charset=utf-8",
        "js" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "map" | "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_plain_names_inside_the_directory_are_served() {
        let dir = std::env::temp_dir().join(format!("chat-demo-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sdk")).expect("dir");
        std::fs::write(dir.join("index.html"), "<p>hi</p>").expect("write");
        std::fs::write(dir.join("sdk/index.js"), "export {}").expect("write");
        let ok = file(&dir, "").await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(file(&dir, "sdk/index.js").await.status(), StatusCode::OK);
        for bad in [
            "../etc/passwd",
            "sdk/../index.html",
            ".hidden.js",
            "sdk//index.js",
            "a b.js",
            "index",
            "missing.js",
        ] {
            assert_eq!(
                file(&dir, bad).await.status(),
                StatusCode::NOT_FOUND,
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
