//! The CLI's connection to a running gateway through its Kafka listener: framing, version
//! negotiation (ApiVersions first, then the highest version both sides speak per API), SASL
//! authentication when the gateway asks for it, a timeout on every request, typed errors, and the
//! queries several commands share (metadata, offsets, commits).

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{
    list_offsets_request, metadata_request, offset_commit_request, offset_fetch_request, ApiKey, ApiVersionsRequest,
    ApiVersionsResponse, GroupId, ListOffsetsRequest, MetadataRequest, OffsetCommitRequest, OffsetFetchRequest,
    RequestHeader, ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sasl::{Mechanism, SaslClient, Step};

/// Largest response frame accepted (fetches ask for at most a few MiB).
const FRAME_BYTES_MAX: usize = 64 << 20;
/// ApiVersions versions this client tries: 3 (KIP-511 client name), else 0.
const API_VERSIONS_MAX: i16 = 3;

pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const UNSUPPORTED_VERSION: i16 = 35;

/// Who to authenticate as when the gateway has `[auth]` on.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub mechanism: Mechanism,
}

/// Why talking to the gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the gateway at {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("the gateway at {addr} did not answer {api} within {ms} ms (--timeout-ms)")]
    Timeout { addr: String, api: String, ms: u128 },
    #[error("the gateway at {addr} closed the connection during {api}")]
    Closed { addr: String, api: String },
    #[error("connection to the gateway at {addr} failed during {api}: {source}")]
    Io {
        addr: String,
        api: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the gateway at {addr} does not serve {api} in a version this tool speaks (gateway {gateway}, tool {tool})"
    )]
    Unsupported { addr: String, api: String, gateway: String, tool: String },
    #[error("{api}: {reason}")]
    Protocol { api: String, reason: String },
    #[error(
        "the gateway at {addr} requires authentication ([auth] is on): give --user NAME and the password in \
         TRIBUTARY_PASSWORD or --password-file"
    )]
    AuthRequired { addr: String },
    #[error("authentication to the gateway at {addr} as '{user}' failed: {reason}")]
    AuthFailed { addr: String, user: String, reason: String },
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error("{context}: {error}")]
    Broker { context: String, error: BrokerError },
}

/// An error code (and message) the gateway answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", match message {
    Some(m) => format!("{m} [{}]", error_name(*code)),
    None => format!("{} (Kafka error code {code})", error_name(*code)),
})]
pub struct BrokerError {
    pub code: i16,
    pub message: Option<String>,
}

/// Kafka's name of an error code, e.g. `TopicAlreadyExists`.
fn error_name(code: i16) -> String {
    ResponseError::try_from_code(code).map_or_else(|| "NoError".to_string(), |e| e.to_string())
}

/// `Ok` for error code 0, else the broker's error with `context` (built only on failure).
pub fn check(code: i16, message: Option<&StrBytes>, context: impl FnOnce() -> String) -> Result<(), ClientError> {
    if code == 0 {
        return Ok(());
    }
    Err(ClientError::Broker {
        context: context(),
        error: BrokerError { code, message: message.map(|m| m.to_string()).filter(|m| !m.is_empty()) },
    })
}

/// Like [`check`], but UNKNOWN_TOPIC_OR_PARTITION names the topic as missing.
pub fn check_topic(code: i16, message: Option<&StrBytes>, topic: &str, context: &str) -> Result<(), ClientError> {
    if code == UNKNOWN_TOPIC_OR_PARTITION {
        return Err(ClientError::UnknownTopic(topic.to_string()));
    }
    check(code, message, || format!("{context} '{topic}'"))
}

fn api_name(key: i16) -> String {
    ApiKey::try_from(key).map_or_else(|_| format!("API {key}"), |k| format!("{k:?}"))
}

/// Why a connection failed, the way an operator says it, with the likely cause when nothing
/// answered.
fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => format!("connection refused{NOT_RUNNING}"),
        TimedOut => format!("connection timed out{NOT_RUNNING}"),
        _ => e.to_string(),
    }
}

const NOT_RUNNING: &str = " — is `tributary serve` running?";

/// A topic as Metadata describes it.
#[derive(Debug, Clone)]
pub struct TopicMeta {
    pub name: String,
    pub partitions: Vec<i32>,
}

/// What Metadata says about the cluster.
#[derive(Debug, Clone)]
pub struct ClusterMeta {
    pub cluster_id: Option<String>,
    pub topics: Vec<TopicMeta>,
}

/// One connection to the gateway, with the API versions it advertised.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
    addr: String,
    timeout: Duration,
    correlation: i32,
    /// (api key, min, max) as advertised by the gateway.
    apis: Vec<(i16, i16, i16)>,
    api_versions_version: i16,
}

impl Client {
    /// Connects, negotiates versions and, if the gateway asks for it, authenticates; every step
    /// is bounded by `timeout`.
    pub async fn connect(
        addr: &str,
        timeout: Duration,
        credentials: Option<&Credentials>,
    ) -> Result<Self, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable { addr: addr.to_string(), reason };
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| unreachable(format!("no connection within {} ms{NOT_RUNNING}", timeout.as_millis())))?
            .map_err(|e| unreachable(io_reason(&e)))?;
        // Only latency: a failure here changes nothing about correctness.
        let _ = stream.set_nodelay(true);
        let mut client =
            Self { stream, addr: addr.to_string(), timeout, correlation: 0, apis: Vec::new(), api_versions_version: 0 };
        client.negotiate().await?;
        // SaslHandshake is advertised only when the gateway requires authentication.
        let required = client.apis.iter().any(|a| a.0 == SaslHandshakeRequest::KEY);
        match (required, credentials) {
            (true, Some(c)) => client.authenticate(c).await?,
            (true, None) => return Err(ClientError::AuthRequired { addr: addr.to_string() }),
            // Credentials for a gateway without [auth] are not needed: go on.
            (false, _) => {}
        }
        Ok(client)
    }

    /// SaslHandshake v1, then the mechanism's messages in SaslAuthenticate requests.
    async fn authenticate(&mut self, c: &Credentials) -> Result<(), ClientError> {
        let addr = self.addr.clone();
        let failed = |reason: String| ClientError::AuthFailed { addr: addr.clone(), user: c.user.clone(), reason };
        let req = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(c.mechanism.name()));
        let resp = self.call(&req, 1..=1).await?;
        if resp.error_code != 0 {
            let offered: Vec<String> = resp.mechanisms.iter().map(|m| m.to_string()).collect();
            return Err(failed(format!(
                "{} is not offered (the gateway offers {}; --sasl-mechanism)",
                c.mechanism.name(),
                offered.join(", ")
            )));
        }
        let mut sasl = SaslClient::new(c.mechanism, &c.user, &c.password);
        let mut msg = sasl.start().map_err(&failed)?;
        loop {
            let req = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(msg));
            let resp = self.call(&req, 0..=2).await?;
            if resp.error_code != 0 {
                let error = BrokerError { code: resp.error_code, message: resp.error_message.map(|m| m.to_string()) };
                return Err(failed(error.to_string()));
            }
            match sasl.step(&resp.auth_bytes).map_err(&failed)? {
                Step::Send(next) => msg = next,
                Step::Done => return Ok(()),
            }
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// ApiVersions at the newest version we know; a gateway that does not serve it answers
    /// UNSUPPORTED_VERSION with a v0 body (KIP-511), and we ask again at v0.
    async fn negotiate(&mut self) -> Result<(), ClientError> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("tributary-cli"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut version = API_VERSIONS_MAX;
        let mut body = self.exchange::<ApiVersionsRequest>(&req, version).await?;
        if body.len() >= 2 && i16::from_be_bytes([body[0], body[1]]) == UNSUPPORTED_VERSION {
            version = 0;
            body = self.exchange::<ApiVersionsRequest>(&ApiVersionsRequest::default(), 0).await?;
        }
        let resp: ApiVersionsResponse = decode_body::<ApiVersionsRequest>(body, version)?;
        check(resp.error_code, None, || "ApiVersions".to_string())?;
        self.apis = resp.api_keys.iter().map(|a| (a.api_key, a.min_version, a.max_version)).collect();
        self.api_versions_version = version;
        Ok(())
    }

    /// The APIs the gateway serves: (name, min, max).
    pub fn apis(&self) -> Vec<(String, i16, i16)> {
        self.apis.iter().map(|(k, lo, hi)| (api_name(*k), *lo, *hi)).collect()
    }

    pub fn api_versions_version(&self) -> i16 {
        self.api_versions_version
    }

    /// The highest version of `R` inside `ours` (what the caller's code fills in), the protocol
    /// crate's range and the gateway's advertised range.
    pub fn version<R: Request>(&self, ours: RangeInclusive<i16>) -> Result<i16, ClientError> {
        let crate_range = <R as Message>::VERSIONS;
        let lo = (*ours.start()).max(crate_range.min);
        let hi = (*ours.end()).min(crate_range.max);
        let unsupported = |gateway: String| ClientError::Unsupported {
            addr: self.addr.clone(),
            api: api_name(R::KEY),
            gateway,
            tool: format!("{lo}-{hi}"),
        };
        let Some(&(_, g_lo, g_hi)) = self.apis.iter().find(|a| a.0 == R::KEY) else {
            return Err(unsupported("none".into()));
        };
        let v = hi.min(g_hi);
        if v < lo.max(g_lo) {
            return Err(unsupported(format!("{g_lo}-{g_hi}")));
        }
        Ok(v)
    }

    /// Sends `req` at the highest common version within `ours` and decodes the answer.
    pub async fn call<R: Request>(&mut self, req: &R, ours: RangeInclusive<i16>) -> Result<R::Response, ClientError> {
        let version = self.version::<R>(ours)?;
        self.call_at(req, version).await
    }

    /// Sends `req` at `version` (from [`Client::version`]) and decodes the answer.
    pub async fn call_at<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response, ClientError> {
        let body = self.exchange::<R>(req, version).await?;
        decode_body::<R>(body, version)
    }

    /// One request/response round trip within the timeout; returns the response body.
    async fn exchange<R: Request>(&mut self, req: &R, version: i16) -> Result<Bytes, ClientError> {
        let protocol = |reason: String| ClientError::Protocol { api: api_name(R::KEY), reason };
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("tributary-cli")));
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&[0; 4]);
        header.encode(&mut frame, R::header_version(version)).map_err(|e| protocol(format!("encode header: {e}")))?;
        req.encode(&mut frame, version).map_err(|e| protocol(format!("encode v{version} request: {e}")))?;
        let size = i32::try_from(frame.len() - 4).map_err(|_| protocol("request too large".into()))?;
        frame[..4].copy_from_slice(&size.to_be_bytes());
        self.round_trip(frame.freeze(), R::KEY, R::Response::header_version(version)).await
    }

    /// The network half of every request, the same for all APIs. Boxed, so the binary holds one
    /// copy of it instead of one inlined into every request type's future.
    fn round_trip(
        &mut self,
        frame: Bytes,
        api_key: i16,
        response_header_version: i16,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, ClientError>> + Send + '_>> {
        Box::pin(async move {
            let api = || api_name(api_key);
            let timeout = self.timeout;
            let io = async {
                self.stream.write_all(&frame).await?;
                let mut size = [0u8; 4];
                self.stream.read_exact(&mut size).await?;
                let size = i32::from_be_bytes(size);
                let len =
                    usize::try_from(size).ok().filter(|n| (4..=FRAME_BYTES_MAX).contains(n)).ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("response frame of {size} bytes"))
                    })?;
                let mut body = vec![0u8; len];
                self.stream.read_exact(&mut body).await?;
                Ok::<_, std::io::Error>(Bytes::from(body))
            };
            let mut body = match tokio::time::timeout(timeout, io).await {
                Err(_) => {
                    return Err(ClientError::Timeout { addr: self.addr.clone(), api: api(), ms: timeout.as_millis() })
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(ClientError::Closed { addr: self.addr.clone(), api: api() })
                }
                Ok(Err(e)) => return Err(ClientError::Io { addr: self.addr.clone(), api: api(), source: e }),
                Ok(Ok(body)) => body,
            };
            let protocol = |reason: String| ClientError::Protocol { api: api(), reason };
            let header = ResponseHeader::decode(&mut body, response_header_version)
                .map_err(|e| protocol(format!("response header: {e}")))?;
            if header.correlation_id != self.correlation {
                return Err(protocol(format!(
                    "response carries correlation id {} instead of {}",
                    header.correlation_id, self.correlation
                )));
            }
            Ok(body)
        })
    }

    // ---- queries shared by several commands ----

    /// Metadata of `topics` (all when `None`), never creating a topic. A named topic that does
    /// not exist is [`ClientError::UnknownTopic`].
    pub async fn metadata(&mut self, topics: Option<&[String]>) -> Result<ClusterMeta, ClientError> {
        let version = self.version::<MetadataRequest>(1..=9)?;
        let mut req = MetadataRequest::default().with_topics(topics.map(|names| {
            names
                .iter()
                .map(|n| metadata_request::MetadataRequestTopic::default().with_name(Some(topic_name(n))))
                .collect()
        }));
        if version >= 4 {
            req = req.with_allow_auto_topic_creation(false);
        }
        let resp = self.call_at(&req, version).await?;
        let mut out = Vec::with_capacity(resp.topics.len());
        for t in resp.topics {
            let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
            check_topic(t.error_code, None, &name, "metadata of topic")?;
            let mut partitions: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
            partitions.sort_unstable();
            out.push(TopicMeta { name, partitions });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(ClusterMeta { cluster_id: resp.cluster_id.map(|c| c.to_string()), topics: out })
    }

    /// The metadata of one topic; [`ClientError::UnknownTopic`] if it does not exist.
    pub async fn topic(&mut self, name: &str) -> Result<TopicMeta, ClientError> {
        let meta = self.metadata(Some(&[name.to_string()])).await?;
        meta.topics.into_iter().find(|t| t.name == name).ok_or_else(|| ClientError::UnknownTopic(name.to_string()))
    }

    /// (log start offset, high watermark) of every (topic, partition).
    pub async fn watermarks(
        &mut self,
        partitions: &[(String, i32)],
    ) -> Result<BTreeMap<(String, i32), (i64, i64)>, ClientError> {
        let start = self.list_offsets(partitions, OffsetSpec::Earliest).await?;
        let end = self.list_offsets(partitions, OffsetSpec::Latest).await?;
        Ok(start.into_iter().filter_map(|(k, lo)| end.get(&k).map(|hi| (k, (lo, *hi)))).collect())
    }

    /// ListOffsets for every (topic, partition): `LATEST` gives the high watermark, `EARLIEST`
    /// the log start offset.
    pub async fn list_offsets(
        &mut self,
        partitions: &[(String, i32)],
        which: OffsetSpec,
    ) -> Result<BTreeMap<(String, i32), i64>, ClientError> {
        if partitions.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
        for (t, p) in partitions {
            by_topic.entry(t).or_default().push(*p);
        }
        let req = ListOffsetsRequest::default().with_replica_id((-1).into()).with_topics(
            by_topic
                .into_iter()
                .map(|(t, ps)| {
                    list_offsets_request::ListOffsetsTopic::default().with_name(topic_name(t)).with_partitions(
                        ps.into_iter()
                            .map(|p| {
                                list_offsets_request::ListOffsetsPartition::default()
                                    .with_partition_index(p)
                                    .with_timestamp(which as i64)
                            })
                            .collect(),
                    )
                })
                .collect(),
        );
        let resp = self.call(&req, 1..=6).await?;
        let mut out = BTreeMap::new();
        for t in resp.topics {
            let topic = t.name.0.to_string();
            for p in t.partitions {
                check_topic(
                    p.error_code,
                    None,
                    &topic,
                    &format!("offsets of partition {} of topic", p.partition_index),
                )?;
                out.insert((topic.clone(), p.partition_index), p.offset);
            }
        }
        Ok(out)
    }

    /// A group's committed offsets: of `topics` (every partition of each), or of everything it
    /// committed when `None`. Partitions without a commit are left out.
    pub async fn committed(
        &mut self,
        group: &str,
        topics: Option<&[TopicMeta]>,
    ) -> Result<BTreeMap<(String, i32), i64>, ClientError> {
        let req = OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_topics(topics.map(|ts| {
                ts.iter()
                    .map(|t| {
                        offset_fetch_request::OffsetFetchRequestTopic::default()
                            .with_name(topic_name(&t.name))
                            .with_partition_indexes(t.partitions.clone())
                    })
                    .collect()
            }));
        // v2 is the first with "all topics" (null) and a top-level error code.
        let resp = self.call(&req, 2..=5).await?;
        check(resp.error_code, None, || format!("committed offsets of group '{group}'"))?;
        let mut out = BTreeMap::new();
        for t in resp.topics {
            let topic = t.name.0.to_string();
            for p in t.partitions {
                check(p.error_code, None, || {
                    format!("committed offset of group '{group}' for {topic}-{}", p.partition_index)
                })?;
                if p.committed_offset >= 0 {
                    out.insert((topic.clone(), p.partition_index), p.committed_offset);
                }
            }
        }
        Ok(out)
    }

    /// Commits `offsets` ((topic, partition) -> next offset to read) for `group` as a non-member
    /// (generation -1), which the gateway accepts only while the group has no members.
    pub async fn commit(&mut self, group: &str, offsets: &BTreeMap<(String, i32), i64>) -> Result<(), ClientError> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut topics: Vec<offset_commit_request::OffsetCommitRequestTopic> = Vec::new();
        for ((topic, partition), offset) in offsets {
            let p = offset_commit_request::OffsetCommitRequestPartition::default()
                .with_partition_index(*partition)
                .with_committed_offset(*offset)
                .with_committed_metadata(Some(StrBytes::from_static_str("")));
            match topics.last_mut() {
                Some(t) if t.name.0.as_str() == topic => t.partitions.push(p),
                _ => topics.push(
                    offset_commit_request::OffsetCommitRequestTopic::default()
                        .with_name(topic_name(topic))
                        .with_partitions(vec![p]),
                ),
            }
        }
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(topics);
        // v8 adds nothing we need; v2 is the oldest the protocol crate encodes.
        let resp = self.call(&req, 2..=7).await?;
        for t in resp.topics {
            for p in t.partitions {
                check(p.error_code, None, || {
                    format!("commit offset of group '{group}' for {}-{}", t.name.0, p.partition_index)
                })?;
            }
        }
        Ok(())
    }
}

/// Which end of a partition ListOffsets returns (its special timestamps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Latest = -1,
    Earliest = -2,
}

/// (topic, partition) of every partition of `topics`.
pub fn partition_keys(topics: &[TopicMeta]) -> Vec<(String, i32)> {
    topics.iter().flat_map(|t| t.partitions.iter().map(move |p| (t.name.clone(), *p))).collect()
}

pub fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

fn decode_body<R: Request>(mut body: Bytes, version: i16) -> Result<R::Response, ClientError> {
    let resp = R::Response::decode(&mut body, version).map_err(|e| ClientError::Protocol {
        api: api_name(R::KEY),
        reason: format!("decode v{version} response: {e}"),
    })?;
    if body.has_remaining() {
        return Err(ClientError::Protocol {
            api: api_name(R::KEY),
            reason: format!("{} bytes left after the v{version} response", body.remaining()),
        });
    }
    Ok(resp)
}
