//! librdkafka as a benchmark client, shared by `kafka-bench` and `kafka-vs`: a producer at full
//! speed or at a fixed offered rate (each record's send-to-delivery-report latency recorded), and
//! a consumer assigned every partition from the beginning (no group) reading a known count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientConfig;

/// The producer's settings besides `bootstrap.servers` and `compression.type`, printed with the
/// figures: `acks=all`; batches of up to 1 MB / 100,000 records, sent after at most 5 ms; a
/// client queue deep enough that the producer is never the one waiting.
pub const PRODUCER_SETTINGS: &[(&str, &str)] = &[
    ("acks", "all"),
    ("linger.ms", "5"),
    ("batch.size", "1000000"),
    ("batch.num.messages", "100000"),
    ("queue.buffering.max.messages", "1000000"),
    ("queue.buffering.max.kbytes", "1048576"),
    ("message.timeout.ms", "120000"),
];

/// The consumer's settings besides `bootstrap.servers`. librdkafka stops fetching once
/// `queued.min.messages` wait in its queue and rechecks only about once a second; a deep queue
/// keeps it fetching (client memory, not the broker's).
pub const CONSUMER_SETTINGS: &[(&str, &str)] = &[
    ("group.id", "bench"),
    ("enable.auto.commit", "false"),
    ("max.partition.fetch.bytes", "4194304"),
    ("fetch.max.bytes", "8388608"),
    ("queued.min.messages", "2000000"),
    ("queued.max.messages.kbytes", "1048576"),
];

/// Counts delivery reports and records each one's latency: the opaque of a record is the
/// nanoseconds from `start` at which it was handed to `send`.
struct Timed {
    start: Instant,
    ok: AtomicU64,
    failed: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

impl ClientContext for Timed {}

impl ProducerContext for Timed {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, sent_ns: usize) {
        let now_ns = self.start.elapsed().as_nanos() as usize;
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                let us = (now_ns.saturating_sub(sent_ns) / 1000).min(u32::MAX as usize) as u32;
                if let Ok(mut l) = self.latencies_us.lock() {
                    l.push(us);
                }
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What a produce run measured.
#[derive(Debug)]
pub struct Produced {
    /// From the first send to the last delivery report.
    pub secs: f64,
    pub records: u64,
    /// Send-to-delivery-report latency of every record, sorted.
    pub latencies_us: Vec<u32>,
}

impl Produced {
    pub fn records_s(&self) -> f64 {
        self.records as f64 / self.secs
    }

    /// The `q` quantile (0..=1) of the latencies, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

/// Produces `records` records of `value_bytes` bytes (no key) to `topic`, first one warm-up
/// record (so the topic's metadata and the connections are up; not counted, but it is in the
/// topic). `rate`: records per second offered at a fixed pace, or `None` for as fast as the
/// client goes. `sample` is called every 100,000 records.
pub fn produce(
    bootstrap: &str,
    topic: &str,
    records: u64,
    value_bytes: usize,
    compression: &str,
    rate: Option<f64>,
    mut sample: impl FnMut(),
) -> anyhow::Result<Produced> {
    let value = vec![b'v'; value_bytes];
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap).set("compression.type", compression);
    for (k, v) in PRODUCER_SETTINGS {
        config.set(*k, *v);
    }
    let context = Timed { start: Instant::now(), ok: 0.into(), failed: 0.into(), latencies_us: Mutex::default() };
    let producer: ThreadedProducer<Timed> = config.create_with_context(context).context("producer")?;
    let ns = |p: &ThreadedProducer<Timed>| p.context().start.elapsed().as_nanos() as usize;
    producer
        .send(BaseRecord::<(), _, usize>::with_opaque_to(topic, ns(&producer)).payload(&value[..]))
        .map_err(|(e, _)| e)?;
    producer.flush(Duration::from_secs(30))?;
    let timed = producer.context();
    let base = timed.ok.load(Ordering::Relaxed);
    timed.latencies_us.lock().map_err(|_| anyhow::anyhow!("latency list poisoned"))?.clear();
    let start = Instant::now();
    for i in 0..records {
        if let Some(rate) = rate {
            // Ahead of the pace by more than a millisecond: wait (a burst of at most a
            // millisecond's records, so the pace holds at rates above the sleep's resolution).
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
            }
        }
        // Waiting in the client's queue is part of this record's latency.
        send_waiting(&producer, BaseRecord::<(), _, usize>::with_opaque_to(topic, ns(&producer)).payload(&value[..]))?;
        if i % 100_000 == 0 {
            sample();
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let secs = start.elapsed().as_secs_f64();
    let timed = producer.context();
    let ok = timed.ok.load(Ordering::Relaxed) - base;
    let failed = timed.failed.load(Ordering::Relaxed);
    if ok != records || failed != 0 {
        bail!("{ok} of {records} records acknowledged, {failed} failed");
    }
    let mut latencies_us = std::mem::take(&mut *timed.latencies_us.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    latencies_us.sort_unstable();
    Ok(Produced { secs, records, latencies_us })
}

/// What a consume run measured.
#[derive(Debug)]
pub struct Consumed {
    /// From the assignment to the last record.
    pub secs: f64,
    pub records: u64,
    /// Value bytes read.
    pub bytes: u64,
}

impl Consumed {
    pub fn records_s(&self) -> f64 {
        self.records as f64 / self.secs
    }
}

/// Reads `records` records from partitions `0..partitions` of `topic` from the beginning,
/// assigned (no group join). `sample` is called every 100,000 records.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    partitions: u32,
    records: u64,
    mut sample: impl FnMut(),
) -> anyhow::Result<Consumed> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    for (k, v) in CONSUMER_SETTINGS {
        config.set(*k, *v);
    }
    let consumer: BaseConsumer = config.create().context("consumer")?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    let start = Instant::now();
    consumer.assign(&tpl)?;
    let (mut n, mut bytes) = (0u64, 0u64);
    while n < records {
        match consumer.poll(Duration::from_secs(10)) {
            Some(Ok(m)) => {
                n += 1;
                bytes += m.payload_len() as u64;
                if n % 100_000 == 0 {
                    sample();
                }
            }
            Some(Err(e)) => bail!("consume: {e}"),
            None => bail!("consume stalled at {n} of {records}"),
        }
    }
    Ok(Consumed { secs: start.elapsed().as_secs_f64(), records, bytes })
}

/// Queues `record` on `producer`, waiting a millisecond at a time while the client's queue is
/// full; any other error ends the run.
pub fn send_waiting<K, P, C>(
    producer: &ThreadedProducer<C>,
    mut record: BaseRecord<'_, K, P, C::DeliveryOpaque>,
) -> anyhow::Result<()>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
    C: ProducerContext + 'static,
{
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("produce: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_index_the_sorted_list() {
        let p = Produced { secs: 1.0, records: 100, latencies_us: (1..=100).map(|i| i * 1000).collect() };
        assert_eq!(p.latency_ms(0.5), 51.0); // index round(99 * 0.5) = 50
        assert_eq!(p.latency_ms(0.99), 99.0);
        assert_eq!(p.latency_ms(0.0), 1.0);
        assert_eq!(p.latency_ms(1.0), 100.0);
        assert!(Produced { secs: 1.0, records: 0, latencies_us: Vec::new() }.latency_ms(0.5).is_nan());
    }
}
