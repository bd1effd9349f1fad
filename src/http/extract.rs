//! Request extractors that fail in the contract's error format.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, EXPECT};
use axum::http::request::Parts;
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;

/// The most bytes a request body may have.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// How much of a body past [`MAX_BODY_BYTES`] is read, all told, and
/// dropped before the 413, and for how long at most. A client that did not
/// ask to wait (`Expect: 100-continue`) is still sending when the limit is
/// reached; closing on its unread bytes resets the connection, and it sees a
/// broken pipe instead of the 413. Past these, the connection is closed all
/// the same.
const REFUSED_BODY_BYTES: usize = 32 * 1024 * 1024;
/// How long a refused body is read at most (see [`REFUSED_BODY_BYTES`]).
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a body that came too slowly (408) is read after it was refused,
/// at most, for bytes the client had on their way, rather than
/// [`DRAIN_TIME`] (review BQ: the 408 came 5 s after the read timeout, after
/// a client with the same 30 s timeout had given up). A client refused for
/// its pace while it still sends, and that reads only once all is sent, may
/// see a reset rather than the 408; it did with the 5 s read too whenever
/// more than 5 s of its body remained (review BR).
const SLOW_BODY_DRAIN_TIME: std::time::Duration = std::time::Duration::from_millis(200);

/// The slowest pace a body may keep once the read timeout has passed: each
/// byte received moves the body's deadline on by 1/16 384 s, so a steady
/// upload on a slow link finishes (10 MiB at 2 Mbit/s takes 42 s; review AY
/// saw a fixed 30 s refuse one at 92 %), while a client that trickles a byte
/// now and then is cut off after the read timeout. Credit earned this way
/// never outlasts a silence longer than the read timeout (review BB: 10 MiB
/// sent at once and then nothing held the connection for 11 minutes).
pub const MIN_BODY_BYTES_PER_SECOND: u64 = 16 * 1024;

/// When the next piece of a body of which `received` bytes arrived must
/// come: the read timeout after `start`, plus a second for every
/// [`MIN_BODY_BYTES_PER_SECOND`] received, but no later than the read
/// timeout after the last piece (`last_arrival`).
fn body_deadline(
    start: tokio::time::Instant,
    last_arrival: tokio::time::Instant,
    read_timeout: std::time::Duration,
    received: usize,
) -> tokio::time::Instant {
    let received = u64::try_from(received).unwrap_or(u64::MAX);
    let earned = std::time::Duration::from_millis(received.saturating_mul(1000) / MIN_BODY_BYTES_PER_SECOND);
    (start + read_timeout + earned).min(last_arrival + read_timeout)
}

/// A request body as raw bytes, with 413 past [`MAX_BODY_BYTES`], 400 on a
/// broken stream and 408 when it arrives slower than the read timeout
/// allows (`--read-timeout`, counted from the end of the head, extended by
/// what arrives, and never a longer silence: `body_deadline`): a client that
/// sends a byte now and then must not hold a connection for ever.
pub struct Body(pub Bytes);

impl FromRequest<AppState> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let start = tokio::time::Instant::now();
        let path = req.uri().path().to_owned();
        // Compressed bodies are not decoded: say so rather than "not a JSON
        // object" about the compressed bytes (review AP). Told once the body
        // is read, as a 413 is, so the client sees the answer.
        let encoding = req
            .headers()
            .get(CONTENT_ENCODING)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_owned())
            .filter(|value| !value.eq_ignore_ascii_case("identity"));
        let waits_to_send = req
            .headers()
            .get(EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<usize>().ok());
        // A client that sent `Expect: 100-continue` (curl does past 1 MiB)
        // waits for our go-ahead: when its head announces too much, refuse
        // it there, so it uploads nothing.
        if waits_to_send && announced.is_some_and(|bytes| bytes > MAX_BODY_BYTES) {
            return Err(ApiError::PayloadTooLarge(too_large_message(&path)));
        }
        let mut stream = req.into_body().into_data_stream();
        if announced.is_some_and(|bytes| bytes > MAX_BODY_BYTES) {
            drain(stream, 0, DRAIN_TIME).await;
            return Err(ApiError::PayloadTooLarge(too_large_message(&path)));
        }
        // Sized by what the client announces, but not reserved on its word
        // alone: a head is cheap to send, 10 MiB is not cheap to hold.
        let mut body = Vec::with_capacity(announced.unwrap_or(0).min(64 * 1024));
        let mut last_arrival = start;
        loop {
            let deadline = body_deadline(start, last_arrival, state.read_timeout, body.len());
            let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
                // Read before the drain, which may take seconds more.
                let waited = start.elapsed();
                let received = body.len();
                drop(body);
                // As for a 413: the client may still be sending, and closing
                // on its unread bytes would show it a broken pipe instead.
                drain(stream, received, SLOW_BODY_DRAIN_TIME).await;
                return Err(ApiError::RequestTimeout(format!(
                    "the request body came too slowly: {received} bytes{} in {} s, where the server waits \
                     --read-timeout ({} s) plus a second for every {} bytes received, and never longer than \
                     --read-timeout for the next piece; send it at once, or raise the server's --read-timeout \
                     if the link is that slow",
                    announced.map_or_else(String::new, |bytes| format!(" of the {bytes} announced")),
                    waited.as_secs(),
                    state.read_timeout.as_secs(),
                    MIN_BODY_BYTES_PER_SECOND,
                )));
            };
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| ApiError::MalformedBody(format!("could not read the request body: {e}")))?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                let read = body.len() + chunk.len();
                drop(body);
                drain(stream, read, DRAIN_TIME).await;
                return Err(ApiError::PayloadTooLarge(too_large_message(&path)));
            }
            body.extend_from_slice(&chunk);
            last_arrival = tokio::time::Instant::now();
        }
        if let Some(encoding) = encoding {
            return Err(ApiError::MalformedBody(format!(
                "the body is sent with Content-Encoding {encoding:?}, which Tally does not decode; send the JSON \
                 uncompressed, without that header"
            )));
        }
        Ok(Body(Bytes::from(body)))
    }
}

/// Reads and drops what is left of a refused body of which `read` bytes
/// were read, up to [`REFUSED_BODY_BYTES`] in all and `for_at_most`.
async fn drain(
    mut rest: impl futures_util::Stream<Item = Result<Bytes, axum::Error>> + Unpin,
    read: usize,
    for_at_most: std::time::Duration,
) {
    let mut left = REFUSED_BODY_BYTES.saturating_sub(read);
    let reading = async {
        while let Some(Ok(chunk)) = rest.next().await {
            match left.checked_sub(chunk.len()) {
                Some(still) => left = still,
                None => break,
            }
        }
    };
    // Whatever stopped it, the 413 or 408 goes out next.
    let _ = tokio::time::timeout(for_at_most, reading).await;
}

/// The 413 for a body over [`MAX_BODY_BYTES`] sent to `path`: what to do
/// depends on the endpoint. Only `POST /v1/entries` takes batches; every
/// other body is one small object, whose largest part can only be a
/// consume's `metadata` (at most 4 KiB).
fn too_large_message(path: &str) -> String {
    let limit = format!(
        "the request body is over {} MiB ({MAX_BODY_BYTES} bytes)",
        MAX_BODY_BYTES / 1024 / 1024
    );
    match path {
        "/v1/entries" => format!("{limit}; split the entries into smaller batches"),
        "/v1/quota/consume" => format!(
            "{limit}, and a consume is one entry of a few hundred bytes: its metadata may hold at most 4096 bytes \
             as compact JSON; send less metadata"
        ),
        _ => format!("{limit}, and {path} takes one small JSON object; check what is being sent"),
    }
}

/// Parses a JSON object body, answering 400 with serde's located message.
///
/// Every body in the contract is an object. serde's derived structs also
/// accept an array of the fields in declaration order, which would let a
/// client depend on our field order and slip past `deny_unknown_fields`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    require_object(bytes)?;
    serde_json::from_slice(bytes).map_err(malformed_json)
}

/// 400 unless the body is a JSON object (by its first byte past whitespace:
/// serde finds everything else wrong with it).
pub fn require_object(bytes: &[u8]) -> Result<(), ApiError> {
    let first = bytes.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if first == Some(&b'{') {
        return Ok(());
    }
    let what = match first {
        None => "empty",
        Some(b'[') => "a JSON array",
        Some(0xEF) => "preceded by a byte order mark (remove it)",
        Some(_) => "not a JSON object",
    };
    Err(ApiError::MalformedBody(format!(
        "the body is {what}; send a JSON object ({{\"field\": value, …}}) as the API documents"
    )))
}

/// The 400 for a body serde could not read as this endpoint's JSON.
pub fn malformed_json(e: serde_json::Error) -> ApiError {
    ApiError::MalformedBody(format!(
        "the body is not valid JSON for this endpoint: {}",
        without_type_names(&e.to_string())
    ))
}

/// [`malformed_json`] naming the part of the body at fault (`entries[3]`).
pub fn malformed_json_in(place: &str, e: serde_json::Error) -> ApiError {
    ApiError::MalformedBody(format!(
        "the body is not valid JSON for this endpoint: {place}: {}",
        without_type_names(&e.to_string())
    ))
}

/// serde names our Rust types ("expected struct EntryInput"); a client
/// knows them as objects. Only serde's own "expected struct" is rewritten,
/// not words of the client's that happen to read "struct".
fn without_type_names(message: &str) -> String {
    const SERDE: &str = "expected struct ";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(SERDE) {
        out.push_str(&rest[..at]);
        out.push_str("expected ");
        let after = &rest[at + SERDE.len()..];
        let name_len = after
            .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .unwrap_or(after.len());
        if name_len == 0 {
            out.push_str("struct ");
        } else {
            out.push_str("an object");
        }
        rest = &after[name_len..];
    }
    out.push_str(rest);
    out
}

/// Path parameters, read by axum's `Path`, with the contract's error body
/// when one cannot be read (percent-encoding that is not UTF-8, say):
/// axum's own rejection is plain text.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(unreadable_path)
    }
}

/// The 422 for a path axum could not read. The one way a client gets here
/// is percent-encoding that does not decode to UTF-8 (`%FF`); the message
/// names the part of the path, and what it must be, instead of axum's text.
fn unreadable_path(rejection: axum::extract::rejection::PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;
    use axum::extract::rejection::PathRejection;
    let key = match &rejection {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::InvalidUtf8InPathParam { key } => Some(key.clone()),
            _ => None,
        },
        _ => None,
    };
    let Some(key) = key else {
        return ApiError::invalid("path", format!("the path cannot be read: {}", rejection.body_text()));
    };
    let what = match key.as_str() {
        "account" => "an account is 1 to 128 characters of A-Za-z0-9_.:@-, which need no percent-encoding",
        "resource" => "resources are named in the catalog (GET /v1/plans)",
        "feature" => "features are named in the catalog (GET /v1/plans)",
        "id" => "an entry id is a whole number",
        _ => "percent-encode the UTF-8 bytes of the text meant",
    };
    ApiError::invalid(
        "path",
        format!(
            "the {key} in the path is not text: its percent-encoding (such as %FF) does not decode to UTF-8; {what}"
        ),
    )
}

/// Query parameters as text, so each one is parsed with a clear 422. A
/// parameter given twice is a 422 too: keeping one of them silently (say
/// `resource=a&resource=b`) would answer a question the client did not ask.
pub struct QueryParams(pub std::collections::HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::MalformedBody(format!("the query string is malformed: {e}")))?;
        // The decoding is lossy: bytes that are not UTF-8 (`%FF`) become
        // U+FFFD, which would then be echoed as '�' (review AP). Unless the
        // client sent that character itself, refuse as the path does.
        let raw = parts.uri.query().unwrap_or_default();
        let sent_fffd = raw.contains('\u{FFFD}') || raw.to_ascii_uppercase().contains("%EF%BF%BD");
        if !sent_fffd
            && let Some((name, _)) = pairs
                .iter()
                .find(|(n, v)| n.contains('\u{FFFD}') || v.contains('\u{FFFD}'))
        {
            let which = if name.contains('\u{FFFD}') {
                "a query parameter's name".to_owned()
            } else {
                format!("the value of query parameter {name:?}")
            };
            return Err(ApiError::invalid(
                "query",
                format!(
                    "{which} is not text: its percent-encoding (such as %FF) does not decode to UTF-8; \
                     percent-encode the UTF-8 bytes of the text"
                ),
            ));
        }
        let mut params = std::collections::HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if params.contains_key(&name) {
                return Err(ApiError::invalid(
                    "query",
                    format!("query parameter {name:?} is given more than once; give it once"),
                ));
            }
            params.insert(name, value);
        }
        Ok(QueryParams(params))
    }
}

/// For an endpoint that takes no query parameters: any is a 422, as an
/// unknown one is on the endpoints that take some. Ignored, a
/// `POST /v1/entries?dry_run=1` would record what the client meant to try.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        if parts.uri.query().is_some_and(|q| !q.is_empty()) {
            let QueryParams(query) = QueryParams::from_request_parts(parts, state).await?;
            super::params::reject_unknown(&query, &[])?;
        }
        Ok(NoQuery)
    }
}

#[cfg(test)]
mod tests {
    use super::without_type_names;

    #[test]
    fn serde_messages_name_objects_not_rust_types() {
        assert_eq!(
            without_type_names("invalid type: integer `1`, expected struct EntryInput at line 1 column 14"),
            "invalid type: integer `1`, expected an object at line 1 column 14"
        );
        assert_eq!(
            without_type_names("expected struct CheckRequest with 4 elements"),
            "expected an object with 4 elements"
        );
        assert_eq!(without_type_names("missing field `account`"), "missing field `account`");
        assert_eq!(
            without_type_names("unknown field `struct x`, expected one of `account`"),
            "unknown field `struct x`, expected one of `account`"
        );
    }
}
