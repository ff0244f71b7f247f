// kafkajs (the most used Node.js Kafka client) against a tributary gateway, for
// tests/interop/mqtt.sh. kafkajs is installed outside the repository (.ci/run puts it in
// ~/.cache/tributary-node; NODE_PATH points there).
//
//   node kafkajs_client.js version
//   node kafkajs_client.js consume BROKER TOPIC COUNT
//       reads COUNT records from the beginning of TOPIC in a fresh consumer group and prints
//       "partition offset key=value [mqtt.topic]" per record, in each partition's order
//   node kafkajs_client.js fails BROKER TOPIC
//       reads TOPIC from the beginning and prints the error that stops the consumer; exits 1 if
//       it gets a record instead (or nothing within 30 s)
// With KAFKAJS_LZ4=1 the kafkajs-lz4 codec is registered first (README's fix for lz4 topics).
'use strict';

const { Kafka, logLevel, CompressionTypes, CompressionCodecs } = require('kafkajs');

if (process.env.KAFKAJS_LZ4 === '1') {
  const lz4 = require('kafkajs-lz4');
  const LZ4Codec = lz4.default || lz4;
  CompressionCodecs[CompressionTypes.LZ4] = new LZ4Codec().codec;
}

const [mode, broker, topic, countArg] = process.argv.slice(2);
const deadlineMs = 30000;

function client() {
  return new Kafka({ clientId: 'tributary-interop', brokers: [broker], logLevel: logLevel.NOTHING, retry: { retries: 2 } });
}

function fail(why) {
  console.error(why);
  process.exit(1);
}

async function consume() {
  const want = Number(countArg);
  const consumer = client().consumer({ groupId: `kafkajs-${topic}-${process.pid}`, maxWaitTimeInMs: 100 });
  const lines = [];
  const timer = setTimeout(() => fail(`${lines.length} of ${want} records within ${deadlineMs} ms:\n${lines.join('\n')}`), deadlineMs);
  consumer.on(consumer.events.CRASH, (e) => fail(`consumer crashed: ${e.payload.error}`));
  await consumer.connect();
  await consumer.subscribe({ topics: [topic], fromBeginning: true });
  await new Promise((resolve) => {
    consumer.run({
      eachMessage: async ({ partition, message }) => {
        const header = message.headers['mqtt.topic'];
        lines.push(`${partition} ${message.offset} ${message.key}=${message.value} [${header}]`);
        if (lines.length === want) resolve();
      },
    });
  });
  clearTimeout(timer);
  await consumer.disconnect();
  console.log(lines.join('\n'));
}

async function fails() {
  const consumer = client().consumer({ groupId: `kafkajs-fails-${topic}-${process.pid}`, maxWaitTimeInMs: 100 });
  const timer = setTimeout(() => fail(`no error within ${deadlineMs} ms`), deadlineMs);
  const crashed = new Promise((resolve) => {
    consumer.on(consumer.events.CRASH, (e) => resolve(e.payload.error));
  });
  await consumer.connect();
  await consumer.subscribe({ topics: [topic], fromBeginning: true });
  await consumer.run({
    eachMessage: async ({ message }) => fail(`read a record: ${message.value}`),
  });
  const error = await crashed;
  clearTimeout(timer);
  console.log(`${error.name}: ${error.message}`);
  await consumer.disconnect().catch(() => {});
}

async function main() {
  switch (mode) {
    case 'version':
      console.log(require('kafkajs/package.json').version);
      return;
    case 'consume':
      return consume();
    case 'fails':
      return fails();
    default:
      fail(`unknown mode ${mode}`);
  }
}

main().then(
  () => process.exit(0),
  (e) => fail(`${e.name}: ${e.message}`),
);
