//! The Kafka APIs and version ranges this broker serves and advertises in ApiVersions, and where
//! each API's flexible (compact, tagged-field) encoding begins.
//!
//! Every range here is exercised by a real client in the test suite. Some minimums are kept low
//! on purpose because librdkafka enables features only when a specific old version is inside the
//! advertised range (see ARCHITECTURE.md): Produce 0 (else it never compresses), Produce 3 and 7,
//! Fetch 4 and 10, ListOffsets 1, InitProducerId 0, FindCoordinator 0 (else no LZ4).

/// API keys, as numbered by Kafka.
pub(crate) mod key {
    pub const PRODUCE: i16 = 0;
    pub const FETCH: i16 = 1;
    pub const LIST_OFFSETS: i16 = 2;
    pub const METADATA: i16 = 3;
    pub const OFFSET_COMMIT: i16 = 8;
    pub const OFFSET_FETCH: i16 = 9;
    pub const FIND_COORDINATOR: i16 = 10;
    pub const JOIN_GROUP: i16 = 11;
    pub const HEARTBEAT: i16 = 12;
    pub const LEAVE_GROUP: i16 = 13;
    pub const SYNC_GROUP: i16 = 14;
    pub const DESCRIBE_GROUPS: i16 = 15;
    pub const LIST_GROUPS: i16 = 16;
    pub const DELETE_GROUPS: i16 = 42;
    pub const OFFSET_DELETE: i16 = 47;
    pub const API_VERSIONS: i16 = 18;
    pub const CREATE_TOPICS: i16 = 19;
    pub const DELETE_TOPICS: i16 = 20;
    pub const DELETE_RECORDS: i16 = 21;
    pub const INIT_PRODUCER_ID: i16 = 22;
    pub const DESCRIBE_CONFIGS: i16 = 32;
    pub const ALTER_CONFIGS: i16 = 33;
    pub const CREATE_PARTITIONS: i16 = 37;
    pub const INCREMENTAL_ALTER_CONFIGS: i16 = 44;
    pub const DESCRIBE_CLUSTER: i16 = 60;
    pub const SASL_HANDSHAKE: i16 = 17;
    pub const SASL_AUTHENTICATE: i16 = 36;
}

/// One served API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ApiSupport {
    pub key: i16,
    pub name: &'static str,
    pub min: i16,
    pub max: i16,
    /// First flexible version (`i16::MAX` if none in range).
    pub flex_from: i16,
}

pub(crate) const SUPPORTED: &[ApiSupport] = &[
    // Produce v0-v2 are advertised (librdkafka needs v0 in the range to compress) but refused at
    // run time with UNSUPPORTED_VERSION, as Kafka 4 does: they carry the old message formats.
    ApiSupport { key: key::PRODUCE, name: "Produce", min: 0, max: 9, flex_from: 9 },
    ApiSupport { key: key::FETCH, name: "Fetch", min: 4, max: 11, flex_from: 12 },
    ApiSupport { key: key::LIST_OFFSETS, name: "ListOffsets", min: 1, max: 6, flex_from: 6 },
    ApiSupport { key: key::METADATA, name: "Metadata", min: 0, max: 9, flex_from: 9 },
    // The node is every group's coordinator. librdkafka also enables LZ4 only when FindCoordinator
    // v0 is advertised.
    ApiSupport { key: key::FIND_COORDINATOR, name: "FindCoordinator", min: 0, max: 4, flex_from: 3 },
    ApiSupport { key: key::API_VERSIONS, name: "ApiVersions", min: 0, max: 3, flex_from: 3 },
    // Consumer groups (classic protocol). librdkafka needs OffsetCommit 1-2, OffsetFetch 1 and
    // Join/Sync/Heartbeat/Leave 0 inside the ranges before it uses groups at all.
    ApiSupport { key: key::OFFSET_COMMIT, name: "OffsetCommit", min: 2, max: 7, flex_from: 8 },
    ApiSupport { key: key::OFFSET_FETCH, name: "OffsetFetch", min: 1, max: 5, flex_from: 6 },
    ApiSupport { key: key::JOIN_GROUP, name: "JoinGroup", min: 0, max: 5, flex_from: 6 },
    ApiSupport { key: key::HEARTBEAT, name: "Heartbeat", min: 0, max: 3, flex_from: 4 },
    ApiSupport { key: key::LEAVE_GROUP, name: "LeaveGroup", min: 0, max: 3, flex_from: 4 },
    ApiSupport { key: key::SYNC_GROUP, name: "SyncGroup", min: 0, max: 3, flex_from: 4 },
    ApiSupport { key: key::DESCRIBE_GROUPS, name: "DescribeGroups", min: 0, max: 4, flex_from: 5 },
    ApiSupport { key: key::LIST_GROUPS, name: "ListGroups", min: 0, max: 2, flex_from: 3 },
    ApiSupport { key: key::DELETE_GROUPS, name: "DeleteGroups", min: 0, max: 1, flex_from: 2 },
    ApiSupport { key: key::OFFSET_DELETE, name: "OffsetDelete", min: 0, max: 0, flex_from: i16::MAX },
    ApiSupport { key: key::CREATE_TOPICS, name: "CreateTopics", min: 2, max: 5, flex_from: 5 },
    ApiSupport { key: key::DELETE_TOPICS, name: "DeleteTopics", min: 1, max: 4, flex_from: 4 },
    ApiSupport { key: key::DELETE_RECORDS, name: "DeleteRecords", min: 0, max: 2, flex_from: 2 },
    ApiSupport { key: key::INIT_PRODUCER_ID, name: "InitProducerId", min: 0, max: 4, flex_from: 2 },
    ApiSupport { key: key::DESCRIBE_CONFIGS, name: "DescribeConfigs", min: 1, max: 4, flex_from: 4 },
    ApiSupport { key: key::ALTER_CONFIGS, name: "AlterConfigs", min: 0, max: 2, flex_from: 2 },
    ApiSupport { key: key::CREATE_PARTITIONS, name: "CreatePartitions", min: 0, max: 2, flex_from: 2 },
    ApiSupport { key: key::INCREMENTAL_ALTER_CONFIGS, name: "IncrementalAlterConfigs", min: 0, max: 1, flex_from: 1 },
    ApiSupport { key: key::DESCRIBE_CLUSTER, name: "DescribeCluster", min: 0, max: 1, flex_from: 0 },
    // Served (and advertised) only with `[auth] enabled`. SaslHandshake v0 is followed by bare
    // SASL tokens (kafka-python 2.0), v1 by SaslAuthenticate requests (librdkafka, Java).
    ApiSupport { key: key::SASL_HANDSHAKE, name: "SaslHandshake", min: 0, max: 1, flex_from: i16::MAX },
    ApiSupport { key: key::SASL_AUTHENTICATE, name: "SaslAuthenticate", min: 0, max: 2, flex_from: 2 },
];

pub(crate) fn lookup(api_key: i16) -> Option<&'static ApiSupport> {
    SUPPORTED.iter().find(|a| a.key == api_key)
}

impl ApiSupport {
    pub(crate) fn supports(&self, version: i16) -> bool {
        (self.min..=self.max).contains(&version)
    }

    /// SaslHandshake and SaslAuthenticate: only served with authentication on.
    pub(crate) fn is_sasl(&self) -> bool {
        matches!(self.key, key::SASL_HANDSHAKE | key::SASL_AUTHENTICATE)
    }

    pub(crate) fn flexible(&self, version: i16) -> bool {
        version >= self.flex_from
    }

    /// Whether the request header carries tagged fields (header v2) at this version.
    pub(crate) fn request_header_flexible(&self, version: i16) -> bool {
        self.flexible(version)
    }

    /// Whether the response header carries tagged fields (header v1). ApiVersions responses
    /// always use header v0, so a client that does not know our versions can read them.
    pub(crate) fn response_header_flexible(&self, version: i16) -> bool {
        self.key != key::API_VERSIONS && self.flexible(version)
    }
}

/// A Kafka API's name for log lines, including APIs we do not serve.
pub(crate) fn api_name(api_key: i16) -> &'static str {
    if let Some(a) = lookup(api_key) {
        return a.name;
    }
    match api_key {
        21 => "DeleteRecords",
        24..=28 => "a transaction API",
        _ => "an unknown API",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Message;

    /// Every advertised range must be encodable by the response types we use (the protocol
    /// crate's own ranges), except Produce v0-v2 which we answer by hand.
    #[test]
    fn ranges_within_the_protocol_crate() {
        use kafka_protocol::messages::*;
        let crate_range = |k: i16| -> (i16, i16) {
            let v = match k {
                key::PRODUCE => ProduceResponse::VERSIONS,
                key::FETCH => FetchResponse::VERSIONS,
                key::LIST_OFFSETS => ListOffsetsResponse::VERSIONS,
                key::METADATA => MetadataResponse::VERSIONS,
                key::FIND_COORDINATOR => FindCoordinatorResponse::VERSIONS,
                key::OFFSET_COMMIT => OffsetCommitResponse::VERSIONS,
                key::OFFSET_FETCH => OffsetFetchResponse::VERSIONS,
                key::JOIN_GROUP => JoinGroupResponse::VERSIONS,
                key::HEARTBEAT => HeartbeatResponse::VERSIONS,
                key::LEAVE_GROUP => LeaveGroupResponse::VERSIONS,
                key::SYNC_GROUP => SyncGroupResponse::VERSIONS,
                key::DESCRIBE_GROUPS => DescribeGroupsResponse::VERSIONS,
                key::LIST_GROUPS => ListGroupsResponse::VERSIONS,
                key::DELETE_GROUPS => DeleteGroupsResponse::VERSIONS,
                key::OFFSET_DELETE => OffsetDeleteResponse::VERSIONS,
                key::API_VERSIONS => ApiVersionsResponse::VERSIONS,
                key::CREATE_TOPICS => CreateTopicsResponse::VERSIONS,
                key::DELETE_TOPICS => DeleteTopicsResponse::VERSIONS,
                key::DELETE_RECORDS => DeleteRecordsResponse::VERSIONS,
                key::INIT_PRODUCER_ID => InitProducerIdResponse::VERSIONS,
                key::DESCRIBE_CONFIGS => DescribeConfigsResponse::VERSIONS,
                key::ALTER_CONFIGS => AlterConfigsResponse::VERSIONS,
                key::CREATE_PARTITIONS => CreatePartitionsResponse::VERSIONS,
                key::INCREMENTAL_ALTER_CONFIGS => IncrementalAlterConfigsResponse::VERSIONS,
                key::DESCRIBE_CLUSTER => DescribeClusterResponse::VERSIONS,
                key::SASL_HANDSHAKE => SaslHandshakeResponse::VERSIONS,
                key::SASL_AUTHENTICATE => SaslAuthenticateResponse::VERSIONS,
                _ => unreachable!(),
            };
            (v.min, v.max)
        };
        for a in SUPPORTED {
            let (lo, hi) = crate_range(a.key);
            let min = if a.key == key::PRODUCE { 3 } else { a.min };
            assert!(lo <= min && a.max <= hi, "{} {}..{} outside {lo}..{hi}", a.name, a.min, a.max);
        }
    }

    /// The versions librdkafka checks for before it enables a feature.
    #[test]
    fn librdkafka_feature_probes_are_in_range() {
        for (k, v) in [(key::PRODUCE, 0), (key::PRODUCE, 3), (key::PRODUCE, 7), (key::FETCH, 4), (key::FETCH, 10)]
            .into_iter()
            .chain([(key::LIST_OFFSETS, 1), (key::INIT_PRODUCER_ID, 0), (key::API_VERSIONS, 0)])
            .chain([(key::FIND_COORDINATOR, 0), (key::OFFSET_COMMIT, 2), (key::OFFSET_FETCH, 1)])
            .chain([(key::JOIN_GROUP, 0), (key::SYNC_GROUP, 0), (key::HEARTBEAT, 0), (key::LEAVE_GROUP, 0)])
        {
            assert!(lookup(k).is_some_and(|a| a.supports(v)), "api {k} v{v}");
        }
    }
}
