//! The committed Kafka codecs are what the generator makes from Kafka's schemas today.

use std::path::Path;
use std::process::Command;

#[test]
fn generated_kafka_codecs_are_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let schemas = root.parent().expect("repository parent").join("shared/kafka-messages");
    if !schemas.is_dir() {
        eprintln!("skipped: no schemas at {} to regenerate from", schemas.display());
        return;
    }
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new("python3")
        .arg(root.join("scripts/gen-kafka-codecs.py"))
        .arg(&schemas)
        .arg(out.path())
        .status()
        .expect("python3 runs the generator");
    assert!(status.success());
    let fresh = std::fs::read_to_string(out.path()).unwrap();
    let committed = std::fs::read_to_string(root.join("net/src/kafka/messages.rs")).unwrap();
    assert!(fresh == committed, "net/src/kafka/messages.rs is stale: run scripts/gen-kafka-codecs.py");
}
