//! ElastiCache IAM authentication: generating the `AUTH` password.
//!
//! With IAM authentication, ElastiCache (Redis OSS / Valkey, node-based or serverless)
//! takes no stored password. A client authenticates as an IAM-enabled user with
//! `AUTH {user_id} {token}` (or `HELLO 3 AUTH {user_id} {token}`), where the token is a
//! SigV4 *presigned URL* for the request
//!
//! ```text
//! GET http://{cache_name}/?Action=connect&User={user_id}
//! ```
//!
//! (with `&ResourceType=ServerlessCache` appended for a serverless cache), signed for the
//! service `elasticache` in the cache's region, and with its leading `http://` removed.
//! `cache_name` is the replication group ID (or the serverless cache's name), not an
//! endpoint's host name. The user must have been created with IAM authentication mode,
//! and ElastiCache requires in-transit encryption (TLS) for IAM authentication.
//!
//! # The signing procedure (SigV4, query-string form)
//!
//! 1. Format the signing time as `YYYYMMDDTHHMMSSZ` (UTC); its first 8 characters are
//!    the date of the credential scope `{date}/{region}/elasticache/aws4_request`.
//! 2. Add the signing parameters to the query: `X-Amz-Algorithm=AWS4-HMAC-SHA256`,
//!    `X-Amz-Credential={access_key_id}/{scope}`, `X-Amz-Date`, `X-Amz-Expires=900`,
//!    `X-Amz-SignedHeaders=host`, and `X-Amz-Security-Token` when the credentials are
//!    temporary (have a session token). Keys and values are URI-encoded the SigV4 way:
//!    `A-Z a-z 0-9 - _ . ~` stay, every other byte of the UTF-8 becomes `%XX` (upper-case
//!    hex), `/` included.
//! 3. The canonical request is
//!    `GET\n/\n{query sorted by key}\nhost:{cache_name}\n\nhost\n{hex SHA-256 of ""}`.
//!    (Presigned URLs for S3 use `UNSIGNED-PAYLOAD`; botocore, the reference for this
//!    token, hashes the empty body for `elasticache`, and so does this module.)
//! 4. The string to sign is
//!    `AWS4-HMAC-SHA256\n{timestamp}\n{scope}\n{hex SHA-256 of the canonical request}`.
//! 5. The signing key is `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region),
//!    "elasticache"), "aws4_request")`, and the signature is the hex HMAC-SHA256 of the
//!    string to sign under it, appended as `&X-Amz-Signature={signature}`.
//!
//! The URL's query keeps botocore's order (operation parameters, then the signing
//! parameters, then the signature); only the canonical form is sorted. The tests check
//! the output byte for byte against botocore's own presigner.
//!
//! # Lifetimes
//!
//! A token is accepted for [`TOKEN_LIFETIME`] (15 minutes) after its signing time; it
//! only has to be valid when `AUTH` is sent, and the connection stays authenticated
//! afterwards. ElastiCache closes an IAM-authenticated connection after
//! [`CONNECTION_MAX_AGE`] (12 hours) unless it re-authenticates (`AUTH` or `HELLO` with
//! a fresh token) before then. A cached token should be replaced once it is older than
//! [`REFRESH_AFTER`], so that none is used close to its expiry.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// How long ElastiCache accepts a token after its signing time (`X-Amz-Expires`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// Age after which a cached token should be replaced by a fresh one: a third of the
/// lifetime is left as margin for clock skew and slow connects.
pub const REFRESH_AFTER: Duration = Duration::from_secs(600);

/// ElastiCache disconnects an IAM-authenticated connection this long after it
/// authenticated, unless it sent `AUTH`/`HELLO` with a fresh token in the meantime.
pub const CONNECTION_MAX_AGE: Duration = Duration::from_secs(12 * 60 * 60);

const SERVICE: &str = "elasticache";
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Hex SHA-256 of the empty string: the payload hash of the (body-less) request.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// AWS credentials: long-term (no session token) or temporary (with one).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    /// Shows the access key ID only: the secret and the session token stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRequest<'a> {
    /// The replication group ID, or the serverless cache's name (not a host name).
    pub cache_name: &'a str,
    /// The ElastiCache user ID (for IAM users it equals the user name).
    pub user_id: &'a str,
    /// The cache's AWS region, e.g. `us-east-1`.
    pub region: &'a str,
    /// Whether the cache is an ElastiCache Serverless cache.
    pub serverless: bool,
}

/// The IAM auth token for `req`, signed with `creds` at `now`: the password to send as
/// `AUTH {user_id} {token}`. It is valid for [`TOKEN_LIFETIME`] from `now` (sub-second
/// parts of `now` are dropped).
pub fn token(req: &TokenRequest, creds: &Credentials, now: SystemTime) -> String {
    let timestamp = amz_date(unix_seconds(now));
    let date = &timestamp[..8];
    let scope = format!("{date}/{}/{SERVICE}/aws4_request", req.region);
    let credential = format!("{}/{scope}", creds.access_key_id);
    let expires = TOKEN_LIFETIME.as_secs().to_string();

    // The URL's order (botocore's): the operation's parameters, then the signing ones.
    let mut params: Vec<(&str, &str)> = vec![("Action", "connect"), ("User", req.user_id)];
    if req.serverless {
        params.push(("ResourceType", "ServerlessCache"));
    }
    params.extend([
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", credential.as_str()),
        ("X-Amz-Date", timestamp.as_str()),
        ("X-Amz-Expires", expires.as_str()),
        ("X-Amz-SignedHeaders", "host"),
    ]);
    if let Some(session_token) = creds.session_token.as_deref() {
        params.push(("X-Amz-Security-Token", session_token));
    }
    let mut encoded: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    let query = join_query(&encoded);
    // The canonical query is sorted by encoded key (then value, for repeated keys).
    encoded.sort();
    let canonical_query = join_query(&encoded);

    // Like botocore, sign the host name lowercased (host names are case-insensitive) but
    // keep the name as given in the URL.
    let host = req.cache_name.to_ascii_lowercase();
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{host}\n\nhost\n{EMPTY_SHA256}");
    let to_sign = string_to_sign(&timestamp, &scope, &canonical_request);
    let key = signing_key(&creds.secret_access_key, date, req.region, SERVICE);
    let signature = signature(&key, &to_sign);
    format!("{}/?{query}&X-Amz-Signature={signature}", req.cache_name)
}

fn join_query(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// SigV4 URI encoding: unreserved characters stay, every other byte is `%XX`.
fn uri_encode(s: &str) -> String {
    const UPPER: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(UPPER[usize::from(b >> 4)]));
            out.push(char::from(UPPER[usize::from(b & 0x0f)]));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    const LOWER: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(LOWER[usize::from(b >> 4)]));
        out.push(char::from(LOWER[usize::from(b & 0x0f)]));
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; this cannot fail.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// The SigV4 signing key for one day, region and service.
fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_secret = format!("AWS4{secret}");
    let k_date = hmac_sha256(k_secret.as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, b"aws4_request")
}

fn string_to_sign(timestamp: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{timestamp}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    )
}

fn signature(signing_key: &[u8; 32], string_to_sign: &str) -> String {
    hex(&hmac_sha256(signing_key, string_to_sign.as_bytes()))
}

/// Whole seconds since the Unix epoch, rounded down (negative before 1970).
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let d = e.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            -secs - i64::from(d.subsec_nanos() > 0)
        }
    }
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for Unix seconds.
fn amz_date(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    );
    format!("{year:04}{month:02}{day:02}T{hour:02}{minute:02}{second:02}Z")
}

/// (year, month 1-12, day 1-31) of the proleptic Gregorian calendar for a count of days
/// since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Shift the epoch to 0000-03-01, so that a leap day is the last day of its year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March year, [0, 365]
    let mp = (5 * doy + 2) / 153; // month from March, [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// IAM authentication for upstream connections: a token per connection handshake, from
/// the standard AWS credential chain (environment, profile, web identity, ECS/EC2
/// metadata), cached and regenerated every [`REFRESH_AFTER`] so each one sent is valid.
pub struct IamAuth {
    pub user_id: String,
    cache_name: String,
    region: String,
    serverless: bool,
    provider:
        tokio::sync::OnceCell<aws_config::default_provider::credentials::DefaultCredentialsChain>,
    cached: std::sync::Mutex<Option<(String, std::time::Instant)>>,
}

impl std::fmt::Debug for IamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IamAuth")
            .field("user_id", &self.user_id)
            .field("cache_name", &self.cache_name)
            .field("region", &self.region)
            .field("serverless", &self.serverless)
            .finish_non_exhaustive()
    }
}

impl IamAuth {
    pub fn new(user_id: &str, cache_name: &str, region: &str, serverless: bool) -> IamAuth {
        IamAuth {
            user_id: user_id.into(),
            cache_name: cache_name.into(),
            region: region.into(),
            serverless,
            provider: tokio::sync::OnceCell::new(),
            cached: std::sync::Mutex::new(None),
        }
    }

    /// A token valid now (cached for [`REFRESH_AFTER`]).
    pub async fn token(&self) -> Result<String, String> {
        if let Some((t, at)) = self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if at.elapsed() < REFRESH_AFTER {
                return Ok(t.clone());
            }
        }
        use aws_sdk_s3::config::ProvideCredentials;
        let region = self.region.clone();
        let chain = self
            .provider
            .get_or_init(|| async move {
                aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .region(aws_sdk_s3::config::Region::new(region))
                    .build()
                    .await
            })
            .await;
        let c = chain
            .provide_credentials()
            .await
            .map_err(|e| format!("IAM auth: no AWS credentials: {e}"))?;
        let creds = Credentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: c.secret_access_key().to_string(),
            session_token: c.session_token().map(str::to_string),
        };
        let t = token(
            &TokenRequest {
                cache_name: &self.cache_name,
                user_id: &self.user_id,
                region: &self.region,
                serverless: self.serverless,
            },
            &creds,
            SystemTime::now(),
        );
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((t.clone(), std::time::Instant::now()));
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCESS_KEY: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    /// Fake, but with the characters real session tokens carry ('/', '+', '=').
    const SESSION_TOKEN: &str = "IQoJb3JpZ2luX2VjEXAMPLE//////////+SessionToken/ab+c==";

    fn at(unix_secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(unix_secs)
    }

    /// 2024-01-01T00:00:00Z
    const NEW_YEAR_2024: u64 = 1_704_067_200;

    fn creds(session_token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: ACCESS_KEY.to_string(),
            secret_access_key: SECRET.to_string(),
            session_token: session_token.map(str::to_string),
        }
    }

    fn request(serverless: bool) -> TokenRequest<'static> {
        TokenRequest {
            cache_name: "my-cache",
            user_id: "iam-user-01",
            region: "us-east-1",
            serverless,
        }
    }

    #[test]
    fn empty_payload_hash() {
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    }

    /// AWS General Reference, "Examples of how to derive a signing key for Signature
    /// Version 4".
    #[test]
    fn signing_key_matches_aws_example() {
        let key = signing_key(SECRET, "20120215", "us-east-1", "iam");
        assert_eq!(
            hex(&key),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    /// AWS General Reference, "Signature Version 4 signing process": the worked example
    /// (IAM `ListUsers`, 2015-08-30T12:36:00Z, header-signed) — canonical request hash,
    /// signing key and signature.
    #[test]
    fn signature_matches_aws_example() {
        let canonical_request = concat!(
            "GET\n",
            "/\n",
            "Action=ListUsers&Version=2010-05-08\n",
            "content-type:application/x-www-form-urlencoded; charset=utf-8\n",
            "host:iam.amazonaws.com\n",
            "x-amz-date:20150830T123600Z\n",
            "\n",
            "content-type;host;x-amz-date\n",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
        assert_eq!(
            sha256_hex(canonical_request.as_bytes()),
            "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59"
        );
        let to_sign = string_to_sign(
            "20150830T123600Z",
            "20150830/us-east-1/iam/aws4_request",
            canonical_request,
        );
        assert_eq!(
            to_sign,
            concat!(
                "AWS4-HMAC-SHA256\n",
                "20150830T123600Z\n",
                "20150830/us-east-1/iam/aws4_request\n",
                "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59",
            )
        );
        let key = signing_key(SECRET, "20150830", "us-east-1", "iam");
        assert_eq!(
            hex(&key),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
        assert_eq!(
            signature(&key, &to_sign),
            "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn uri_encoding() {
        assert_eq!(uri_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(uri_encode("a/b c+d=e&f"), "a%2Fb%20c%2Bd%3De%26f");
        assert_eq!(uri_encode("ü"), "%C3%BC");
    }

    // The expected tokens below came from botocore 1.43.11's own presigner
    // (`SigV4QueryAuth(creds, "elasticache", region, expires=900).add_auth(...)` with the
    // clock frozen), printed by `python3 scripts/iam_token_vector.py`.

    #[test]
    fn token_matches_botocore() {
        let got = token(&request(false), &creds(None), at(NEW_YEAR_2024));
        assert_eq!(
            got,
            concat!(
                "my-cache/?Action=connect&User=iam-user-01",
                "&X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "&X-Amz-Credential=AKIDEXAMPLE%2F20240101%2Fus-east-1%2Felasticache%2Faws4_request",
                "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host",
                "&X-Amz-Signature=470ef09631d5eb14adbdafcd80459f7197f0ee0f464030dbd38ff48c0d28092b",
            )
        );
    }

    #[test]
    fn token_with_session_token_matches_botocore() {
        let got = token(
            &request(false),
            &creds(Some(SESSION_TOKEN)),
            at(NEW_YEAR_2024),
        );
        assert_eq!(
            got,
            concat!(
                "my-cache/?Action=connect&User=iam-user-01",
                "&X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "&X-Amz-Credential=AKIDEXAMPLE%2F20240101%2Fus-east-1%2Felasticache%2Faws4_request",
                "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host",
                "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE",
                "%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2BSessionToken%2Fab%2Bc%3D%3D",
                "&X-Amz-Signature=cddc9b509ada5858b066584540e0714ee87b9a1e1a35f86258af1c023697f708",
            )
        );
    }

    #[test]
    fn serverless_token_matches_botocore() {
        let got = token(&request(true), &creds(None), at(NEW_YEAR_2024));
        assert_eq!(
            got,
            concat!(
                "my-cache/?Action=connect&User=iam-user-01&ResourceType=ServerlessCache",
                "&X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "&X-Amz-Credential=AKIDEXAMPLE%2F20240101%2Fus-east-1%2Felasticache%2Faws4_request",
                "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host",
                "&X-Amz-Signature=bd076242cf16510deb8950e68331f9e37e194fc9a567f0bfa0cb18068b4ab3b6",
            )
        );
    }

    /// Encoding of a user ID with reserved and non-ASCII characters, another region, and a
    /// mixed-case cache name (kept in the URL, signed lowercased, as botocore does).
    #[test]
    fn odd_inputs_match_botocore() {
        let req = TokenRequest {
            cache_name: "My-Cache",
            user_id: "odd user+/=~._-ü",
            region: "eu-west-2",
            serverless: false,
        };
        let got = token(&req, &creds(Some(SESSION_TOKEN)), at(NEW_YEAR_2024));
        assert_eq!(
            got,
            concat!(
                "My-Cache/?Action=connect&User=odd%20user%2B%2F%3D~._-%C3%BC",
                "&X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "&X-Amz-Credential=AKIDEXAMPLE%2F20240101%2Feu-west-2%2Felasticache%2Faws4_request",
                "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host",
                "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEXAMPLE",
                "%2F%2F%2F%2F%2F%2F%2F%2F%2F%2F%2BSessionToken%2Fab%2Bc%3D%3D",
                "&X-Amz-Signature=d42e6cc55d3b3df40157714be8e6361660f075ab4b4e2555b5ae7524a3fe7b87",
            )
        );
    }

    #[test]
    fn sub_second_time_is_truncated() {
        let exact = token(&request(false), &creds(None), at(NEW_YEAR_2024));
        let later = at(NEW_YEAR_2024) + Duration::from_millis(999);
        assert_eq!(token(&request(false), &creds(None), later), exact);
        let next = token(&request(false), &creds(None), at(NEW_YEAR_2024 + 1));
        assert_ne!(next, exact);
        assert!(next.contains("&X-Amz-Date=20240101T000001Z&"));
    }

    #[test]
    fn date_formatting() {
        let cases: [(i64, &str); 12] = [
            (0, "19700101T000000Z"),
            (-1, "19691231T235959Z"),
            (-2_208_988_800, "19000101T000000Z"),
            (951_782_400, "20000229T000000Z"),
            (951_868_799, "20000229T235959Z"),
            (1_704_067_200, "20240101T000000Z"),
            (1_709_210_096, "20240229T123456Z"),
            (2_147_483_647, "20380119T031407Z"),
            (2_147_483_648, "20380119T031408Z"),
            (4_107_542_399, "21000228T235959Z"),
            (4_107_542_400, "21000301T000000Z"),
            (253_402_300_799, "99991231T235959Z"),
        ];
        for (secs, want) in cases {
            assert_eq!(amz_date(secs), want, "{secs}");
        }
    }

    #[test]
    fn unix_seconds_rounds_down() {
        assert_eq!(unix_seconds(UNIX_EPOCH), 0);
        assert_eq!(unix_seconds(at(2_147_483_648)), 2_147_483_648);
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_millis(1_500)), 1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_millis(500)), -1);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(2)), -2);
        assert_eq!(
            amz_date(unix_seconds(at(1_709_210_096))),
            "20240229T123456Z"
        );
    }

    #[test]
    fn lifetimes() {
        assert_eq!(TOKEN_LIFETIME, Duration::from_secs(15 * 60));
        const { assert!(REFRESH_AFTER.as_secs() < TOKEN_LIFETIME.as_secs()) };
        const { assert!(TOKEN_LIFETIME.as_secs() < CONNECTION_MAX_AGE.as_secs()) };
    }

    #[test]
    fn debug_redacts_secrets() {
        let shown = format!("{:?}", creds(Some(SESSION_TOKEN)));
        assert!(shown.contains(ACCESS_KEY));
        assert!(!shown.contains(SECRET));
        assert!(!shown.contains("SessionToken"));
    }
}
