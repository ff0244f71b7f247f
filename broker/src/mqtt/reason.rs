//! MQTT 5 reason codes (OASIS MQTT 5.0, 2.4) by name, with their meanings: the one table the
//! session, the listener and the codec use instead of hex literals. 3.1.1 has no reason codes:
//! `wire` maps the CONNACK and SUBACK ones to 3.1.1 return codes and leaves the others out.

/// Success (CONNACK, PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK), Normal disconnection, Granted
/// QoS 0 (SUBACK).
pub(crate) const SUCCESS: u8 = 0x00;
/// DISCONNECT from the client: close normally, but publish the will message (3.14.2.1).
pub(crate) const DISCONNECT_WITH_WILL: u8 = 0x04;
/// UNSUBACK: no subscription existed for the filter.
pub(crate) const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
/// Unspecified error: the server does not wish to say more, or none of the others applies.
pub(crate) const UNSPECIFIED_ERROR: u8 = 0x80;
/// Malformed Packet: the packet could not be parsed as the specification says.
pub(crate) const MALFORMED_PACKET: u8 = 0x81;
/// Protocol Error: a packet that parses but breaks a rule (a second CONNECT, an unknown topic
/// alias, ...).
pub(crate) const PROTOCOL_ERROR: u8 = 0x82;
/// CONNACK: the server does not support the protocol level the client asked for.
pub(crate) const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
/// CONNACK: the client identifier is valid UTF-8 but not allowed (too long, another user's).
pub(crate) const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
/// CONNACK: the user name or password is not accepted.
pub(crate) const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
/// Not authorized: the client may not do this (log in, publish, subscribe).
pub(crate) const NOT_AUTHORIZED: u8 = 0x87;
/// Server busy: try again later (the connection limit).
pub(crate) const SERVER_BUSY: u8 = 0x89;
/// DISCONNECT: the server is shutting down.
pub(crate) const SERVER_SHUTTING_DOWN: u8 = 0x8B;
/// DISCONNECT: nothing arrived within 1.5 times the Keep Alive.
pub(crate) const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
/// DISCONNECT: another connection with the same client identifier took the session over.
pub(crate) const SESSION_TAKEN_OVER: u8 = 0x8E;
/// SUBACK: the topic filter is well formed but not accepted (or not well formed).
pub(crate) const TOPIC_FILTER_INVALID: u8 = 0x8F;
/// The topic name is well formed but not accepted by this server.
pub(crate) const TOPIC_NAME_INVALID: u8 = 0x90;
/// PUBREC/PUBREL/PUBCOMP: the packet identifier is not known.
pub(crate) const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
/// DISCONNECT: more QoS 1/2 publishes unacknowledged than the server's Receive Maximum.
pub(crate) const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
/// DISCONNECT: a topic alias of 0 or above the Topic Alias Maximum.
pub(crate) const TOPIC_ALIAS_INVALID: u8 = 0x94;
/// The packet is larger than the Maximum Packet Size (or the message than the log allows).
pub(crate) const PACKET_TOO_LARGE: u8 = 0x95;
/// Quota exceeded: a configured limit (disk, retained messages, subscriptions) is reached.
pub(crate) const QUOTA_EXCEEDED: u8 = 0x97;
/// PUBACK/PUBREC: the payload does not match its Payload Format Indicator (1 = UTF-8).
pub(crate) const PAYLOAD_FORMAT_INVALID: u8 = 0x99;

/// The meaning of a reason code, for logs and the conformance notes.
pub(crate) fn meaning(code: u8) -> &'static str {
    match code {
        SUCCESS => "success",
        0x01 => "granted QoS 1",
        0x02 => "granted QoS 2",
        DISCONNECT_WITH_WILL => "disconnect with will message",
        NO_SUBSCRIPTION_EXISTED => "no subscription existed",
        UNSPECIFIED_ERROR => "unspecified error",
        MALFORMED_PACKET => "malformed packet",
        PROTOCOL_ERROR => "protocol error",
        UNSUPPORTED_PROTOCOL_VERSION => "unsupported protocol version",
        CLIENT_IDENTIFIER_NOT_VALID => "client identifier not valid",
        BAD_USER_NAME_OR_PASSWORD => "bad user name or password",
        NOT_AUTHORIZED => "not authorized",
        SERVER_BUSY => "server busy",
        SERVER_SHUTTING_DOWN => "server shutting down",
        KEEP_ALIVE_TIMEOUT => "keep alive timeout",
        SESSION_TAKEN_OVER => "session taken over",
        TOPIC_FILTER_INVALID => "topic filter invalid",
        TOPIC_NAME_INVALID => "topic name invalid",
        PACKET_IDENTIFIER_NOT_FOUND => "packet identifier not found",
        RECEIVE_MAXIMUM_EXCEEDED => "receive maximum exceeded",
        TOPIC_ALIAS_INVALID => "topic alias invalid",
        PACKET_TOO_LARGE => "packet too large",
        QUOTA_EXCEEDED => "quota exceeded",
        PAYLOAD_FORMAT_INVALID => "payload format invalid",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_code_has_its_own_meaning() {
        let named = [
            SUCCESS,
            DISCONNECT_WITH_WILL,
            NO_SUBSCRIPTION_EXISTED,
            UNSPECIFIED_ERROR,
            MALFORMED_PACKET,
            PROTOCOL_ERROR,
            UNSUPPORTED_PROTOCOL_VERSION,
            CLIENT_IDENTIFIER_NOT_VALID,
            BAD_USER_NAME_OR_PASSWORD,
            NOT_AUTHORIZED,
            SERVER_BUSY,
            SERVER_SHUTTING_DOWN,
            KEEP_ALIVE_TIMEOUT,
            SESSION_TAKEN_OVER,
            TOPIC_FILTER_INVALID,
            TOPIC_NAME_INVALID,
            PACKET_IDENTIFIER_NOT_FOUND,
            RECEIVE_MAXIMUM_EXCEEDED,
            TOPIC_ALIAS_INVALID,
            PACKET_TOO_LARGE,
            QUOTA_EXCEEDED,
        ];
        let meanings: std::collections::HashSet<_> = named.iter().map(|&c| meaning(c)).collect();
        assert_eq!(meanings.len(), named.len());
        assert!(!meanings.contains("other"));
    }
}
