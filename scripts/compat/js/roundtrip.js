// kafkajs against one node, as an application uses it: its admin client creates two topics
// and deletes one, its idempotent producer writes gzip-compressed records with headers, its
// consumer group reads them back and commits, and the admin client reads the commits. Prints
// one JSON object of what each step saw; the test (test_kafkajs.py) judges it.
// Usage: node roundtrip.js BOOTSTRAP RECORDS
'use strict';
const { CompressionTypes } = require('kafkajs');
const { client } = require('./common');

const [bootstrap, recordsArg] = process.argv.slice(2);
const records = Number(recordsArg);
const TOPIC = 'js-orders';
const SCRATCH = 'js-scratch';
const GROUP = 'js-readers';
const PARTITIONS = 3;
const RECORDS_PER_SEND = 100;
const DEADLINE_MS = 30000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function within(what, condition) {
  const deadline = Date.now() + DEADLINE_MS;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

async function main() {
  const kafka = client(bootstrap);
  const seen = {};
  const admin = kafka.admin();
  await admin.connect();
  seen.created = await admin.createTopics({
    topics: [{ topic: TOPIC, numPartitions: PARTITIONS }, { topic: SCRATCH, numPartitions: 1 }],
    waitForLeaders: true,
  });
  seen.metadata = await admin.fetchTopicMetadata({ topics: [TOPIC] });

  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  seen.acknowledged = [];
  for (let n = 0; n < records; n += RECORDS_PER_SEND) {
    const messages = [];
    for (let i = n; i < Math.min(n + RECORDS_PER_SEND, records); i++) {
      messages.push({ partition: i % PARTITIONS, key: `customer-${i % 37}`, value: `order-${i}`, headers: { n: String(i) } });
    }
    const results = await producer.send({ topic: TOPIC, acks: -1, compression: CompressionTypes.GZIP, messages });
    const base = new Map(results.map((r) => [r.partition, Number(r.baseOffset)]));
    const next = new Map();
    for (const m of messages) {
      const k = next.get(m.partition) || 0;
      next.set(m.partition, k + 1);
      seen.acknowledged.push({ p: m.partition, o: base.get(m.partition) + k, k: m.key, v: m.value, n: m.headers.n });
    }
  }
  await producer.disconnect();
  seen.offsets = await admin.fetchTopicOffsets(TOPIC);

  const consumer = kafka.consumer({ groupId: GROUP, maxWaitTimeInMs: 500 });
  await consumer.connect();
  await consumer.subscribe({ topic: TOPIC, fromBeginning: true });
  seen.read = [];
  await consumer.run({
    eachMessage: async ({ partition, message }) => {
      seen.read.push({
        p: partition, o: Number(message.offset), k: message.key.toString(), v: message.value.toString(),
        n: message.headers.n.toString(),
      });
    },
  });
  await within('the group to read every record', () => seen.read.length >= records);
  await consumer.disconnect();
  seen.committed = await admin.fetchOffsets({ groupId: GROUP, topics: [TOPIC] });

  await admin.deleteTopics({ topics: [SCRATCH] });
  seen.listed = await within(`${SCRATCH} to leave the topic list`, async () => {
    const listed = await admin.listTopics();
    return listed.includes(SCRATCH) ? null : listed;
  });
  await admin.disconnect();
  process.stdout.write(JSON.stringify(seen) + '\n');
}

main().catch((error) => {
  process.stderr.write(`${error.name}: ${error.message}\n`);
  process.exit(1);
});
