//! Where spilled values live. An enum rather than a trait object: two real backends,
//! chosen by configuration.
//!
//! - [`DirStore`]: a local directory, the embedded default (no cloud account needed).
//!   Objects are written to a temporary file, fsynced, renamed into place and the
//!   directory fsynced, so an object is durable before its stub is written to Redis.
//! - [`S3Store`]: S3 through aws-sdk-s3, credentials and region from the standard AWS
//!   chain; path-style addressing whenever a custom endpoint is set (S3-compatible
//!   servers); optional server-side encryption; multipart upload above a size; the SDK's
//!   own timeouts and retries, inside the spill's overall timeout.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("object {0} not found")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
    #[error("timed out after {0} ms")]
    Timeout(u64),
    /// An S3 call that failed, with the kind of failure (see [`StoreError::kind`]).
    #[error("{msg}")]
    S3 { kind: &'static str, msg: String },
}

impl StoreError {
    /// A fixed label for metrics: `not_found`, `timeout`, `io`, and for S3 `denied`,
    /// `throttled`, `server`, `client`, `connection`, `other`.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::NotFound(_) => "not_found",
            StoreError::Io(_) => "io",
            StoreError::Timeout(_) => "timeout",
            StoreError::S3 { kind, .. } => kind,
        }
    }
}

pub enum Store {
    Dir(DirStore),
    S3(S3Store),
}

impl Store {
    pub fn describe(&self) -> String {
        match self {
            Store::Dir(d) => format!("dir:{}", d.root.display()),
            Store::S3(s) => format!("s3://{}", s.bucket),
        }
    }

    pub async fn put(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        match self {
            Store::Dir(d) => d.put(name, data).await,
            Store::S3(s) => s.put(name, data).await,
        }
    }

    /// Appends an object to `buf`, reading at most `max + 1` bytes of it (the caller
    /// knows its size from the stub, and tells a longer object by its length). The
    /// object's bytes land where the caller wants them (after a reply's header), instead
    /// of in a buffer of their own to be copied again.
    pub async fn get_into(
        &self,
        name: &str,
        buf: Vec<u8>,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        match self {
            Store::Dir(d) => d.get_into(name, buf, max).await,
            Store::S3(s) => s.get_into(name, buf, max).await,
        }
    }

    /// Bytes `start..start+len` of an object (the caller knows its size from the stub).
    pub async fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        match self {
            Store::Dir(d) => d.get_range(name, start, len).await,
            Store::S3(s) => s.get_range(name, start, len).await,
        }
    }

    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self {
            Store::Dir(d) => d.delete(name).await,
            Store::S3(s) => s.delete(name).await,
        }
    }

    /// Every object under `prefix`, with its last-modified time (for the sweeper).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, SystemTime)>, StoreError> {
        match self {
            Store::Dir(d) => d.list(prefix).await,
            Store::S3(s) => s.list(prefix).await,
        }
    }
}

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    sse: Option<aws_sdk_s3::types::ServerSideEncryption>,
    kms_key_id: Option<String>,
    multipart_threshold: usize,
    part_size: usize,
}

fn s3_err<E>(what: &str, e: aws_sdk_s3::error::SdkError<E>) -> StoreError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_s3::error::SdkError;
    let (kind, detail) = match &e {
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let kind = match status {
                401 | 403 => "denied",
                404 => "not_found",
                429 | 503 => "throttled",
                500..=599 => "server",
                _ => "client",
            };
            // S3's own code and message, as S3 wrote them (NoSuchBucket: The specified
            // bucket does not exist), not the SDK's debug dump.
            let err = s.err();
            let detail = match (err.code(), err.message()) {
                (Some(code), Some(msg)) => format!("{code}: {msg} (HTTP {status})"),
                (Some(code), None) => format!("{code} (HTTP {status})"),
                _ => format!("HTTP {status}: {}", chain(err)),
            };
            (kind, detail)
        }
        SdkError::TimeoutError(_) => ("timeout", "timed out".to_string()),
        SdkError::DispatchFailure(d) => (
            "connection",
            match d.as_connector_error() {
                Some(c) => format!("connection failed: {}", chain(c)),
                None => "connection failed".to_string(),
            },
        ),
        other => ("other", chain(other)),
    };
    StoreError::S3 {
        kind,
        msg: format!("S3 {what}: {detail}"),
    }
}

/// An error and its causes on one line: `a: b: c` (one-line RESP error text).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

impl S3Store {
    pub async fn new(cfg: &crate::config::L3Config) -> Result<S3Store, String> {
        use aws_config::retry::RetryConfig;
        use aws_config::timeout::TimeoutConfig;
        use std::time::Duration;
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeout.min(Duration::from_secs(3)))
                    .operation_attempt_timeout(timeout)
                    .operation_timeout(timeout)
                    .build(),
            );
        if !cfg.region.is_empty() {
            loader = loader.region(aws_config::Region::new(cfg.region.clone()));
        }
        let shared = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            b = b.region(aws_config::Region::new("us-east-1"));
        }
        if !cfg.endpoint_url.is_empty() {
            b = b.endpoint_url(cfg.endpoint_url.clone());
        }
        if !cfg.endpoint_url.is_empty() || shared.endpoint_url().is_some() {
            // S3-compatible servers (and loopback) do not do virtual-hosted buckets.
            b = b.force_path_style(true);
        }
        let sse = match cfg.sse.as_str() {
            "" => None,
            "AES256" => Some(aws_sdk_s3::types::ServerSideEncryption::Aes256),
            "aws:kms" => Some(aws_sdk_s3::types::ServerSideEncryption::AwsKms),
            other => return Err(format!("l3.sse: unknown {other:?}")),
        };
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            sse,
            kms_key_id: (!cfg.sse_kms_key_id.is_empty()).then(|| cfg.sse_kms_key_id.clone()),
            multipart_threshold: cfg.multipart_threshold_bytes as usize,
            part_size: cfg.part_size_bytes as usize,
        })
    }

    async fn put(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        if data.len() > self.multipart_threshold {
            return self.put_multipart(name, data).await;
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(name)
            .body(data.into())
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key_id.clone())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_err("PutObject", e))
    }

    async fn put_multipart(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(name)
            .set_server_side_encryption(self.sse.clone())
            .set_ssekms_key_id(self.kms_key_id.clone())
            .send()
            .await
            .map_err(|e| s3_err("CreateMultipartUpload", e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StoreError::Io("S3 CreateMultipartUpload: no upload id".into()))?
            .to_string();
        let result = async {
            let mut parts = Vec::new();
            for (i, chunk) in data.chunks(self.part_size.max(5 << 20)).enumerate() {
                let n = i as i32 + 1;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(name)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(data.slice_ref(chunk).into())
                    .send()
                    .await
                    .map_err(|e| s3_err("UploadPart", e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(part.e_tag().map(String::from))
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(name)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_err("CompleteMultipartUpload", e))
        }
        .await;
        // Some S3-compatible servers answer CompleteMultipartUpload in a shape the SDK
        // rejects although the object was assembled: believe the object, not the reply,
        // when it is there with exactly our size.
        let result = match result {
            Err(e) if self.size_of(name).await == Some(data.len() as i64) => {
                tracing::debug!(object = name, error = %e, "multipart completion reply unreadable; object verified by size");
                Ok(())
            }
            other => other,
        };
        if result.is_err() {
            // Parts of an abandoned upload are billed until aborted.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(name)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result.map(|_| ())
    }

    async fn size_of(&self, name: &str) -> Option<i64> {
        self.client
            .head_object()
            .bucket(&self.bucket)
            .key(name)
            .send()
            .await
            .ok()
            .and_then(|h| h.content_length())
    }

    async fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        let range = format!("bytes={}-{}", start, start + len - 1);
        let b = self.get_object(name, Some(range)).await?;
        if b.len() as u64 != len {
            return Err(StoreError::Io(format!(
                "S3 ranged read of {name}: {} bytes, asked for {len}",
                b.len()
            )));
        }
        Ok(b)
    }

    /// GetObject, its body's chunks copied into `buf` as they arrive (once: collecting
    /// them into one buffer first would copy them twice).
    async fn get_into(
        &self,
        name: &str,
        mut buf: Vec<u8>,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        let mut body = self.send_get(name, None).await?.body;
        let start = buf.len();
        let body_err = |e| StoreError::Io(format!("S3 GetObject body: {e}"));
        while let Some(chunk) = body.try_next().await.map_err(body_err)? {
            let room = (max + 1).saturating_sub((buf.len() - start) as u64) as usize;
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if chunk.len() >= room {
                break;
            }
        }
        Ok(buf)
    }

    /// GetObject, whole or one byte range, body collected.
    async fn get_object(&self, name: &str, range: Option<String>) -> Result<Bytes, StoreError> {
        self.send_get(name, range)
            .await?
            .body
            .collect()
            .await
            .map(|b| b.into_bytes())
            .map_err(|e| StoreError::Io(format!("S3 GetObject body: {e}")))
    }

    async fn send_get(
        &self,
        name: &str,
        range: Option<String>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput, StoreError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(name)
            .set_range(range)
            .send()
            .await
        {
            Ok(o) => Ok(o),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => Err(s3_err("GetObject", e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| s3_err("ListObjectsV2", e))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                let modified = o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((key.to_string(), modified));
            }
        }
        Ok(out)
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(name)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| s3_err("DeleteObject", e))
    }
}

pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    pub fn new(root: &Path) -> std::io::Result<DirStore> {
        std::fs::create_dir_all(root)?;
        Ok(DirStore {
            root: root.to_path_buf(),
        })
    }

    /// Object names are generated by us (prefix + hex), but a stub read from Redis is
    /// authenticated before its name is used; still, never leave the root.
    fn path(&self, name: &str) -> Result<PathBuf, StoreError> {
        if name.is_empty()
            || name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || name.contains('\0')
        {
            return Err(StoreError::Io(format!("invalid object name {name:?}")));
        }
        Ok(self.root.join(name))
    }

    async fn put(&self, name: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(name)?;
        tokio::task::spawn_blocking(move || write_durably(&path, &data))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .map_err(|e| StoreError::Io(e.to_string()))
    }

    async fn get_into(
        &self,
        name: &str,
        mut buf: Vec<u8>,
        max: u64,
    ) -> Result<Vec<u8>, StoreError> {
        use std::io::Read;
        let path = self.path(name)?;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::NotFound(name));
                }
                Err(e) => return Err(StoreError::Io(e.to_string())),
            };
            // Read straight into the buffer's spare room: no copy in user space.
            file.take(max.saturating_add(1))
                .read_to_end(&mut buf)
                .map_err(|e| StoreError::Io(e.to_string()))?;
            Ok(buf)
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
    }

    async fn get_range(&self, name: &str, start: u64, len: u64) -> Result<Bytes, StoreError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path(name)?;
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(name.to_string()))
            }
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        f.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact(&mut buf)
            .await
            .map_err(|e| StoreError::Io(format!("ranged read of {name}: {e}")))?;
        Ok(Bytes::from(buf))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut stack = vec![root.clone()];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let p = e.path();
                    let Ok(meta) = e.metadata() else { continue };
                    if meta.is_dir() {
                        stack.push(p);
                        continue;
                    }
                    let Ok(rel) = p.strip_prefix(&root) else {
                        continue;
                    };
                    let name = rel.to_string_lossy().replace('\\', "/");
                    // Our own files (the signing key) start with '.'; leftovers of
                    // interrupted writes (`*.tmpPID`) are garbage like any other object.
                    if name.starts_with('.') || !name.starts_with(&prefix) {
                        continue;
                    }
                    out.push((name, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
                }
            }
            out
        })
        .await
        .map_err(|e| StoreError::Io(e.to_string()))
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io(e.to_string())),
        }
    }
}

fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
