//! MirrorMaker 2 in dedicated mode as a child JVM, for the benchmarks that set it beside our
//! mirror (`mirror-vs-mm2`, `dr-bench`): its `mm2.properties` (one source cluster alias
//! mirrored into `central`, default replication policy) and the process, restartable on the
//! same configuration, with the tail of its log for error messages.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use anyhow::Context;

use crate::kafka_cluster::KafkaJars;

/// The lines every run shares: `alias` (the source cluster at `source`) mirrored one way into
/// `central` (at `central`), the topics `topics` (a regex list), `tasks` tasks, and `replicas`
/// for the remote topics and MM2's internal topics. The offset syncs live on the target (a
/// gateway is not where MM2's bookkeeping belongs). Callers add what their run turns on or off.
pub fn base_properties(
    alias: &str,
    source: &str,
    central: &str,
    topics: &str,
    tasks: u32,
    replicas: u32,
) -> Vec<String> {
    vec![
        format!("clusters = {alias}, central"),
        format!("{alias}.bootstrap.servers = {source}"),
        format!("central.bootstrap.servers = {central}"),
        format!("{alias}->central.enabled = true"),
        format!("{alias}->central.topics = {topics}"),
        format!("central->{alias}.enabled = false"),
        "offset-syncs.topic.location = target".into(),
        format!("tasks.max = {tasks}"),
        format!("replication.factor = {replicas}"),
        format!("offset-syncs.topic.replication.factor = {replicas}"),
        format!("checkpoints.topic.replication.factor = {replicas}"),
        format!("heartbeats.topic.replication.factor = {replicas}"),
        format!("config.storage.replication.factor = {replicas}"),
        format!("offset.storage.replication.factor = {replicas}"),
        format!("status.storage.replication.factor = {replicas}"),
    ]
}

/// A MirrorMaker 2 process (`org.apache.kafka.connect.mirror.MirrorMaker DIR/mm2.properties`),
/// its output appended to `DIR/mm2.log`. Killed when dropped.
#[derive(Debug)]
pub struct Mm2 {
    jars: KafkaJars,
    heap_mb: u32,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mm2 {
    /// Writes `properties` to `dir/mm2.properties` and starts the JVM.
    pub fn start(jars: &KafkaJars, heap_mb: u32, dir: &Path, properties: &[String]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("mm2.properties");
        std::fs::write(&config, properties.join("\n") + "\n").context("write mm2.properties")?;
        let mut m = Self { jars: jars.clone(), heap_mb, config, log: dir.join("mm2.log"), child: None };
        m.spawn()?;
        Ok(m)
    }

    /// Starts the JVM (again) on the same configuration.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = self
            .jars
            .java(self.heap_mb)
            .arg("org.apache.kafka.connect.mirror.MirrorMaker")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start MirrorMaker 2")?;
        self.child = Some(child);
        Ok(())
    }

    /// The running JVM's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error if the JVM exited.
    pub fn check(&mut self) -> anyhow::Result<()> {
        match self.child.as_mut().map(Child::try_wait).transpose()? {
            Some(Some(status)) => anyhow::bail!("MirrorMaker 2 exited: {status}"),
            _ => Ok(()),
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> std::io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The last `lines` lines of its log, with the log's path.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!("MirrorMaker 2 log ({}):\n{}", self.log.display(), all[all.len().saturating_sub(lines)..].join("\n"))
    }
}

impl Drop for Mm2 {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
