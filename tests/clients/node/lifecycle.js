#!/usr/bin/env node
// A vmmd client written from proto/vmmd/v1/vmm.proto alone (loaded at run
// time; no generated code), driving one micro-guest through its lifecycle.
//
//   node lifecycle.js <socket> <kernel>
//
// <kernel> is a micro-guest ELF (tests/guests): `mg=spin` prints MG-START
// and spins.  One JSON line per step goes to stdout:
//   {"step":"StartVm","ok":true,...}
// Exit 0 when every check held; 1 after the first failing step (its line
// has "ok":false and "error"); 2 on bad usage.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_DIR = path.resolve(__dirname, "..", "..", "..", "proto");
const PROTO_FILE = "vmmd/v1/vmm.proto";
const CALL_TIMEOUT_MS = 30000; // hang guard for each call
const STREAM_TIMEOUT_MS = 30000; // hang guard for waiting on a stream

class CheckFailed extends Error {}

function check(cond, message) {
  if (!cond) throw new CheckFailed(message);
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function deadline(ms = CALL_TIMEOUT_MS) {
  return new Date(Date.now() + ms);
}

function codeName(code) {
  return Object.keys(grpc.status).find((k) => grpc.status[k] === code) || String(code);
}

function describeError(e) {
  if (e && typeof e.code === "number") return `${codeName(e.code)}: ${e.details}`;
  return String((e && e.stack) || e);
}

// A unary call as a promise: the response, or the gRPC error.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline() }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// A unary call that must fail: the error (a success is a failed check).
async function unaryError(client, method, request) {
  try {
    const response = await unary(client, method, request);
    throw new CheckFailed(`${method} succeeded, expected an error: ${JSON.stringify(response)}`);
  } catch (e) {
    if (e instanceof CheckFailed || typeof e.code !== "number") throw e;
    return e;
  }
}

// Reads a server stream until pred(message, all so far) is true, then cancels it.
// Resolves with every message read; rejects on a stream error, an early end or the timeout.
function readUntil(call, pred, what) {
  return new Promise((resolve, reject) => {
    const seen = [];
    let done = false;
    const finish = (err) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      call.cancel();
      if (err) reject(err);
      else resolve(seen);
    };
    const timer = setTimeout(
      () => finish(new CheckFailed(`${what}: not seen within ${STREAM_TIMEOUT_MS} ms`)),
      STREAM_TIMEOUT_MS);
    call.on("data", (msg) => {
      if (done) return;
      seen.push(msg);
      if (pred(msg, seen)) finish(null);
    });
    call.on("error", (e) => finish(e)); // ignored once done (our own cancel)
    call.on("end", () => finish(new CheckFailed(`${what}: the stream ended first`)));
  });
}

// Resolves once the server sent the response headers: the stream is attached
// (VM found, watcher subscribed), so nothing published later is missed.
function attached(call, what) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new CheckFailed(`${what}: no response headers within ${STREAM_TIMEOUT_MS} ms`)),
      STREAM_TIMEOUT_MS);
    call.once("metadata", () => {
      clearTimeout(timer);
      resolve();
    });
    call.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

function vmSummary(vm) {
  return { vm_id: vm.vm_id, state: vm.state, cmdline: vm.cmdline };
}

async function main() {
  const [socket, kernel] = process.argv.slice(2);
  if (!socket || !kernel) {
    process.stderr.write("usage: node lifecycle.js <socket> <kernel>\n");
    return 2;
  }

  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_DIR],
    keepCase: true, // field names as in the .proto: vm_id, memory_mib
    longs: String,
    enums: String, // enum values by name: "VM_STATE_RUNNING"
    defaults: true,
    oneofs: true,
  });
  const { VmService } = grpc.loadPackageDefinition(definition).vmmd.v1;
  const client = new VmService(`unix:${socket}`, grpc.credentials.createInsecure());

  const vmId = `node-${process.pid}`;
  let current = "connect";
  let created = false;
  let watch = null;

  // Runs one step: fn returns extra fields for the step's line; a throw fails it.
  const step = async (name, fn) => {
    current = name;
    const extra = (await fn()) || {};
    emit({ step: name, ok: true, ...extra });
  };

  const expectState = (vm, state, what) =>
    check(vm.state === state, `${what}: state ${vm.state}, expected ${state}`);

  try {
    await step("connect", () => new Promise((resolve, reject) => {
      client.waitForReady(deadline(), (err) => (err ? reject(err) : resolve({ socket })));
    }));

    await step("CreateVm", async () => {
      const vm = await unary(client, "CreateVm", {
        vm_id: vmId,
        config: { vcpus: 1, memory_mib: 64, boot: { kernel_path: kernel, cmdline: "mg=spin" } },
      });
      created = true;
      check(vm.vm_id === vmId, `vm_id ${vm.vm_id}, expected ${vmId}`);
      expectState(vm, "VM_STATE_CREATED", "CreateVm");
      check(vm.config.vcpus === 1 && vm.config.memory_mib === 64,
        `config ${JSON.stringify(vm.config)}, expected 1 vCPU and 64 MiB`);
      check(vm.config.boot.kernel_path === kernel, `kernel_path ${vm.config.boot.kernel_path}`);
      check(vm.cmdline === "mg=spin", `effective cmdline ${JSON.stringify(vm.cmdline)}`);
      check(vm.created_at !== null && Number(vm.created_at.seconds) > 0, "created_at not set");
      return vmSummary(vm);
    });

    await step("GetVm", async () => {
      const vm = await unary(client, "GetVm", { vm_id: vmId });
      check(vm.vm_id === vmId, `vm_id ${vm.vm_id}`);
      expectState(vm, "VM_STATE_CREATED", "GetVm");
      return vmSummary(vm);
    });

    await step("StartVm", async () => {
      const vm = await unary(client, "StartVm", { vm_id: vmId });
      expectState(vm, "VM_STATE_RUNNING", "StartVm");
      check(vm.started_at !== null, "started_at not set");
      return vmSummary(vm);
    });

    await step("StreamConsole", async () => {
      const call = client.StreamConsole({ vm_id: vmId, from_start: true, follow: true });
      let text = "";
      const chunks = await readUntil(call, (chunk) => {
        text += Buffer.from(chunk.data).toString("latin1");
        return text.includes("MG-START\n");
      }, "MG-START on the console");
      check(chunks[0].offset === "0", `first chunk at offset ${chunks[0].offset}, expected 0`);
      return { chunks: chunks.length, console: text };
    });

    await step("PauseVm", async () => {
      const vm = await unary(client, "PauseVm", { vm_id: vmId });
      expectState(vm, "VM_STATE_PAUSED", "PauseVm");
      return vmSummary(vm);
    });

    await step("GetVm(paused)", async () => {
      const vm = await unary(client, "GetVm", { vm_id: vmId });
      expectState(vm, "VM_STATE_PAUSED", "GetVm");
      return vmSummary(vm);
    });

    await step("ResumeVm", async () => {
      const vm = await unary(client, "ResumeVm", { vm_id: vmId });
      expectState(vm, "VM_STATE_RUNNING", "ResumeVm");
      return vmSummary(vm);
    });

    // Watched in parallel with the StopVm and DeleteVm below.
    let events;
    await step("WatchEvents", async () => {
      watch = client.WatchEvents({ vm_id: vmId });
      const isAttached = attached(watch, "WatchEvents");
      events = readUntil(watch, (ev) => ev.type === "EVENT_TYPE_DELETED", "the DELETED event");
      events.catch(() => {}); // awaited below; no unhandled rejection meanwhile
      await isAttached;
      return { vm_id: vmId, attached: true };
    });

    await step("StopVm", async () => {
      const vm = await unary(client, "StopVm", { vm_id: vmId, force: true });
      expectState(vm, "VM_STATE_STOPPED", "StopVm");
      check(vm.stop !== null && vm.stop.reason === "STOP_REASON_STOPPED_BY_API",
        `stop ${JSON.stringify(vm.stop)}, expected reason STOP_REASON_STOPPED_BY_API`);
      return { ...vmSummary(vm), reason: vm.stop.reason };
    });

    await step("DeleteVm", async () => {
      await unary(client, "DeleteVm", { vm_id: vmId });
      created = false;
      return { vm_id: vmId };
    });

    await step("WatchEvents(events)", async () => {
      const got = await events;
      const types = got.map((ev) => ev.type);
      check(JSON.stringify(types) === JSON.stringify(["EVENT_TYPE_STOPPED", "EVENT_TYPE_DELETED"]),
        `events ${JSON.stringify(types)}, expected STOPPED then DELETED`);
      check(got.every((ev) => ev.vm_id === vmId), "an event for another VM");
      check(got[0].stop !== null && got[0].stop.reason === "STOP_REASON_STOPPED_BY_API",
        `STOPPED event stop ${JSON.stringify(got[0].stop)}`);
      return { events: types, reason: got[0].stop.reason };
    });

    await step("GetVm(deleted)", async () => {
      const e = await unaryError(client, "GetVm", { vm_id: vmId });
      check(e.code === grpc.status.NOT_FOUND, `GetVm after delete: ${describeError(e)}, expected NOT_FOUND`);
      return { code: codeName(e.code), details: e.details };
    });

    await step("CreateVm(vcpus=99)", async () => {
      const e = await unaryError(client, "CreateVm", {
        vm_id: `${vmId}-bad`,
        config: { vcpus: 99, memory_mib: 64, boot: { kernel_path: kernel, cmdline: "mg=spin" } },
      });
      check(e.code === grpc.status.INVALID_ARGUMENT,
        `CreateVm with vcpus 99: ${describeError(e)}, expected INVALID_ARGUMENT`);
      check(e.details.includes("config.vcpus"), `message ${JSON.stringify(e.details)} does not name config.vcpus`);
      return { code: codeName(e.code), details: e.details };
    });

    emit({ step: "done", ok: true });
    return 0;
  } catch (e) {
    emit({ step: current, ok: false, error: e instanceof CheckFailed ? e.message : describeError(e) });
    return 1;
  } finally {
    if (watch) watch.cancel();
    if (created) {
      try {
        await unary(client, "DeleteVm", { vm_id: vmId }); // best effort: leave nothing behind
      } catch (e) {
        process.stderr.write(`cleanup: DeleteVm ${vmId}: ${describeError(e)}\n`);
      }
    }
    client.close();
  }
}

main().then(
  (rc) => { process.exitCode = rc; },
  (e) => {
    emit({ step: "internal", ok: false, error: describeError(e) });
    process.exitCode = 1;
  });
