// A busd broker in JavaScript: the same broker as examples/plain_broker.py.
//
// busd sends frames on stdin and reads frames from stdout; a frame is a
// 4-byte big-endian length and then one msgpack map of that many bytes
// (docs/broker-protocol.md). stderr is the log: one line per event.
//
// It answers "ready", logs "got MESSAGE on CHANNEL" and acks each delivery,
// nacks a message that is not a string, and exits 0 on "stop" or when
// stdin ends.
"use strict";

const { encode, decode } = require("@msgpack/msgpack");

// stdout carries frames and nothing else: never console.log() here.
function send(frame) {
  const body = encode(frame);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(body.length);
  process.stdout.write(Buffer.concat([header, body]));
}

function log(line) {
  // A prefix "ERROR: " or "WARNING: " sets the line's level in busd's log.
  process.stderr.write(line + "\n");
}

function handle(frame) {
  if (frame.type === "stop") {
    process.exit(0);
  }
  if (frame.type !== "deliver") {
    log(`WARNING: ignoring a frame of type ${JSON.stringify(frame.type)}`);
    return; // a newer busd may send frame types we don't know: skip them
  }
  if (typeof frame.message === "string") {
    log(`got ${frame.message} on ${frame.channel}`);
    send({ type: "ack", id: frame.id });
  } else {
    const error = `TypeError: expected a string, got ${typeof frame.message}`;
    log(`ERROR: attempt ${frame.attempt}: ${error}`);
    send({ type: "nack", id: frame.id, error: error });
  }
}

// Bytes arrive in chunks of any size: cut whole frames off the front.
let pending = Buffer.alloc(0);
process.stdin.on("data", (chunk) => {
  pending = Buffer.concat([pending, chunk]);
  while (pending.length >= 4) {
    const length = pending.readUInt32BE(0);
    if (pending.length < 4 + length) {
      break;
    }
    const body = pending.subarray(4, 4 + length);
    pending = pending.subarray(4 + length);
    handle(decode(body));
  }
});
process.stdin.on("end", () => process.exit(0)); // busd closed stdin: done
// SIGTERM is busd insisting (stop_timeout / 2 after "stop"): leave now.
process.on("SIGTERM", () => process.exit(0));

send({ type: "ready", pid: process.pid });
