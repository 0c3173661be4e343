// What the kafkajs scripts share: the client as every script makes it, and their output, one
// JSON object a line.
'use strict';
const { Kafka, logLevel } = require('kafkajs');

/** A kafkajs client of the comma-separated BOOTSTRAP, logging errors only (to stderr). */
function client(bootstrap) {
  return new Kafka({ clientId: 'compat-kafkajs', brokers: bootstrap.split(','), logLevel: logLevel.ERROR });
}

function print(line) {
  process.stdout.write(JSON.stringify(line) + '\n');
}

/** Runs `main`, printing {"error": ...} and exiting 1 if it throws. */
function run(main) {
  main().catch((error) => {
    print({ error: `${error.name}: ${error.message}` });
    process.exit(1);
  });
}

module.exports = { client, print, run };
