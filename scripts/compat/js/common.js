// What the kafkajs scripts share: the client as every script makes it, and their output, one
// JSON object a line.
'use strict';
const { Kafka, logLevel } = require('kafkajs');

/**
 * A kafkajs client of the comma-separated BOOTSTRAP, logging errors only, or at the level
 * $PYRALOG_KAFKAJS_LOG names (DEBUG, INFO, WARN) for chasing a failure.
 */
function client(bootstrap) {
  const level = logLevel[process.env.PYRALOG_KAFKAJS_LOG || 'ERROR'];
  // kafkajs logs INFO and DEBUG through console.info and console.log: stdout is the scripts'.
  console.log = console.info = console.error;
  return new Kafka({ clientId: 'compat-kafkajs', brokers: bootstrap.split(','), logLevel: level });
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
