// kafkajs's consumer group reading a topic from its committed offsets (or its start), printing
// each record as a JSON line {"p": partition, "o": offset, "v": value}, until it has read
// MIN_RECORDS and fetched twice, then nothing new for a second, or for DEADLINE_MS at most,
// or until SIGTERM. It commits what it read as it goes (kafkajs's auto commit) and ends with
// {"done": records read}.
// Usage: node consumer.js BOOTSTRAP TOPIC GROUP MIN_RECORDS DEADLINE_MS
'use strict';
const { client, print, run } = require('./common');

const [bootstrap, topic, group, minArg, deadlineArg] = process.argv.slice(2);
const minRecords = Number(minArg);
const deadlineMs = Number(deadlineArg);
const QUIET_MS = 1000;

let stopping = false;
process.on('SIGTERM', () => { stopping = true; });

async function main() {
  const kafka = client(bootstrap);
  // A 10 s session (kafkajs's default is 30 s): a member lost with a crashed consumer holds up
  // the group's next join until its session ends.
  const consumer = kafka.consumer({ groupId: group, maxWaitTimeInMs: 500, sessionTimeout: 10000 });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  let read = 0;
  let lastAt = Date.now();
  // Fetches answered since the group assigned partitions: a run that has nothing to read
  // ends only once it has asked (the join takes the group's initial delay, 3 s).
  let fetches = 0;
  consumer.on(consumer.events.FETCH, () => { fetches++; });
  await consumer.run({
    eachMessage: async ({ partition, message }) => {
      read++;
      lastAt = Date.now();
      print({ p: partition, o: Number(message.offset), v: message.value.toString() });
    },
  });
  const started = Date.now();
  const done = () => stopping || (read >= minRecords && fetches >= 2 && Date.now() - lastAt > QUIET_MS);
  while (Date.now() - started < deadlineMs && !done()) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  await consumer.disconnect();
  print({ done: read });
  // A consumer that crashed (a lost connection) restarts itself after a pause, even past a
  // disconnect, and would keep the process alive.
  process.exit(0);
}

run(main);
