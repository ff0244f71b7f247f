//! MQTT 5 behaviour end to end (issue 14): raw packets where the detail is a reason code or a
//! property a client library hides, rumqttc v5 where a real client shows it. Each test names
//! the clause of the OASIS MQTT 5.0 text it checks.

use std::io::Write;
use std::sync::atomic::Ordering;

use tributary_broker::mqtt::MqttConfig;

use crate::mqtt_faults::{connected, publish, read_packet};
use crate::support::{read_all, KafkaBroker};

/// 4.7.2, [MQTT-4.7.2-1]: `$TopicA/B` is a valid topic name, but `$` topics are the broker's. A
/// client publish to one is refused as an ACL denial is (MQTT 5: PUBACK/PUBREC 0x90 "topic
/// name invalid"; 3.1.1: acknowledged and dropped), counted, nothing is stored, and the
/// connection stays.
#[tokio::test]
async fn a_publish_to_a_dollar_topic_is_refused_and_the_connection_stays_mqtt_4_7_2_1() {
    let broker = KafkaBroker::start_with_mqtt(MqttConfig::default()).await;
    let addr = broker.mqtt;
    tokio::task::spawn_blocking(move || {
        let mut v5 = connected(addr, 5, "dollar-5");
        v5.write_all(&publish(1, b"$TopicA/B", 1, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x40, vec![0, 1, 0x90, 0])), "PUBACK 0x90");
        v5.write_all(&publish(2, b"$TopicA/B", 2, b"x", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x50, vec![0, 2, 0x90, 0])), "PUBREC 0x90");
        v5.write_all(&publish(1, b"TopicA/B", 3, b"kept", true)).expect("send");
        assert_eq!(read_packet(&mut v5), Some((0x40, vec![0, 3])), "still connected: PUBACK");
        let mut v4 = connected(addr, 4, "dollar-4");
        v4.write_all(&publish(1, b"$SYS/broker/version", 1, b"fake", false)).expect("send");
        assert_eq!(read_packet(&mut v4), Some((0x40, vec![0, 1])), "3.1.1: acknowledged");
        v4.write_all(&[0xC0, 0]).expect("PINGREQ");
        assert_eq!(read_packet(&mut v4), Some((0xD0, vec![])), "still connected: PINGRESP");
    })
    .await
    .expect("client");
    assert_eq!(broker.mqtt_stats.publishes_reserved.load(Ordering::Relaxed), 3);
    let topics: Vec<String> = read_all(&broker.store, "mqtt", 0)
        .iter()
        .filter_map(|r| r.headers.iter().find(|(k, _)| k == "mqtt.topic"))
        .filter_map(|(_, v)| v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned()))
        .collect();
    assert_eq!(topics, ["TopicA/B"], "only the plain publish was stored");
}
