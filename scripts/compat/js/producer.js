// kafkajs's idempotent producer (acks=all, one request in flight: its requirement for
// idempotence) writing to the partitions of a topic in turn until SIGTERM, each send to one
// partition. Each acknowledged record goes to stdout as a JSON line {"p": partition, "o":
// offset, "v": value}, each failed send as {"error": message}; the last line is {"done":
// records sent}.
//
// One partition per send: kafkajs 2.2.4 keeps a send's retry state per broker, not per
// partition, so a send spanning brokers that is retried after a leader change re-sends records
// one broker already acknowledged, under new sequence numbers (stored twice: no broker can
// tell), or skips a partition whose new leader is a broker that had answered (tulios/kafkajs
// pull request 1798). Pyralog's per-shard brokers make such a send span brokers even when one
// node leads every partition.
// Usage: node producer.js BOOTSTRAP TOPIC PARTITIONS
'use strict';
const { client, print, run } = require('./common');

const [bootstrap, topic, partitionsArg] = process.argv.slice(2);
const partitions = Number(partitionsArg);
const RECORDS_PER_SEND = 10;

let stopping = false;
process.on('SIGTERM', () => { stopping = true; });

async function main() {
  const kafka = client(bootstrap);
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 });
  await producer.connect();
  let sent = 0;
  for (let send = 0; !stopping; send++) {
    const partition = send % partitions;
    const messages = [];
    for (let i = 0; i < RECORDS_PER_SEND; i++, sent++) {
      messages.push({ partition, key: String(sent), value: `js-${sent}` });
    }
    try {
      const results = await producer.send({ topic, acks: -1, messages });
      if (results.length !== 1 || results[0].partition !== partition) {
        print({ error: `a send to partition ${partition} answered for ${JSON.stringify(results)}` });
        continue;
      }
      // The records keep their order: the k-th is at the base offset + k.
      const base = Number(results[0].baseOffset);
      messages.forEach((m, k) => print({ p: partition, o: base + k, v: m.value }));
    } catch (error) {
      print({ error: `${error.name}: ${error.message}` });
    }
  }
  await producer.disconnect();
  print({ done: sent });
}

run(main);
