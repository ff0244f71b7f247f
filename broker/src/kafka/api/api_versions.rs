//! ApiVersions: the APIs and versions served (the SASL ones only with authentication on), and
//! KIP-511's answer to a version this broker does not know.

use bytes::Bytes;
use kafka_protocol::messages::{api_versions_response, ApiVersionsResponse};
use kafka_protocol::protocol::Encodable;

use crate::kafka::codec::frame_response;
use crate::kafka::context::{reply, Call, PendingReply};
use crate::kafka::errors::{self};
use crate::kafka::versions::SUPPORTED;

/// The APIs served; the SASL ones only with authentication on (a client that sees them
/// advertised may try to use them).
fn api_versions_body(error_code: i16, auth: bool) -> ApiVersionsResponse {
    ApiVersionsResponse::default().with_error_code(error_code).with_api_keys(
        SUPPORTED
            .iter()
            .filter(|a| auth || !a.is_sasl())
            .map(|a| {
                api_versions_response::ApiVersion::default()
                    .with_api_key(a.key)
                    .with_min_version(a.min)
                    .with_max_version(a.max)
            })
            .collect(),
    )
}

pub(super) fn api_versions(call: Call, auth: bool) -> PendingReply {
    reply(call, &api_versions_body(errors::NONE, auth))
}

/// KIP-511: the answer to an ApiVersions request at a version we do not know.
pub(crate) fn unsupported(correlation_id: i32, auth: bool) -> Result<Bytes, String> {
    let body = api_versions_body(errors::UNSUPPORTED_VERSION, auth);
    let size = body.compute_size(0).map_err(|e| e.to_string())?;
    frame_response(correlation_id, false, size, |buf| body.encode(buf, 0).map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_fallback_is_a_v0_body() {
        let b = unsupported(7, true).unwrap();
        let size = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        assert_eq!(size as usize, b.len() - 4);
        assert_eq!(i32::from_be_bytes([b[4], b[5], b[6], b[7]]), 7);
        assert_eq!(i16::from_be_bytes([b[8], b[9]]), errors::UNSUPPORTED_VERSION);
        assert_eq!(i32::from_be_bytes([b[10], b[11], b[12], b[13]]) as usize, SUPPORTED.len());
    }
}
