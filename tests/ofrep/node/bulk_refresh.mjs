// The real OpenFeature web SDK with its OFREP provider (@openfeature/ofrep-web-provider
// on @openfeature/ofrep-core, from npm; `npm ci` by .ci/run) against a running
// `entitled`. Run by tests/suite/ofrep.rs:
//
//   node tests/ofrep/node/bulk_refresh.mjs http://127.0.0.1:PORT PLANS_FILE
//
// 1. A polling provider evaluates every feature in one bulk request, answers from
//    its cache, and re-asks with If-None-Match: the unchanged snapshot answers 304.
// 2. PLANS_FILE is rewritten (pro's support tier: standard -> priority); the server
//    reloads it and the next poll brings the fresh value (200, ConfigurationChanged).
// 3. A provider with change detection by event stream (the default; no polling)
//    connects to the `eventStreams` the bulk answer advertises; the file is
//    rewritten back and the `refetchEvaluation` event alone makes it fetch the
//    fresh value.
//
// Node 20 has fetch but no EventSource: the `eventsource` package (the WHATWG
// EventSource on fetch) stands in for the browser's, counting the streams it opens.
// Every wait is bounded; prints `ok` or fails with what was seen.

import { readFileSync, writeFileSync } from 'node:fs';
import { EventSource as FetchEventSource } from 'eventsource';
import { OpenFeature, ProviderEvents } from '@openfeature/web-sdk';
import { OFREPWebProvider } from '@openfeature/ofrep-web-provider';

const [base, plansFile] = process.argv.slice(2);
if (!base || !plansFile) {
  console.error('usage: bulk_refresh.mjs BASE_URL PLANS_FILE');
  process.exit(2);
}

let streamsOpened = 0;
globalThis.EventSource = class extends FetchEventSource {
  constructor(url, init) {
    super(url, init);
    this.addEventListener('open', () => streamsOpened++);
  }
};

function fail(message) {
  console.error(`FAIL: ${message}`);
  process.exit(1);
}

function expect(what, got, want) {
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    fail(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
}

/** Waits for `cond()` to hold, checking every 20 ms for at most `ms`. */
async function waitFor(what, ms, cond) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  fail(`timed out after ${ms} ms waiting for ${what}`);
}

/** A fetch that records the status and request of every bulk exchange. */
function recording(log) {
  return async (req, init) => {
    const res = await fetch(req, init);
    log.push({ status: res.status, url: req.url, ifNoneMatch: req.headers.get('if-none-match'), etag: res.headers.get('etag') });
    return res;
  };
}

function rewrite(from, to) {
  const text = readFileSync(plansFile, 'utf8');
  if (!text.includes(from)) fail(`${plansFile} has no \`${from}\``);
  writeFileSync(plansFile, text.replace(from, to));
}

const context = { targetingKey: 'acme' };

// --- 1. bulk evaluation, answered from the cache, 304 while nothing changes ---------
const polled = [];
const poller = new OFREPWebProvider({
  baseUrl: base,
  pollInterval: 100,
  changeDetection: 'polling',
  cacheMode: 'disabled',
  fetchImplementation: recording(polled),
});
let pollerChanged = 0;
poller.events.addHandler(ProviderEvents.ConfigurationChanged, () => pollerChanged++);
await OpenFeature.setContext('poll', context);
await OpenFeature.setProviderAndWait('poll', poller);
const pc = OpenFeature.getClient('poll');

expect('first bulk status', polled[0]?.status, 200);
const firstTag = polled[0].etag;
if (!firstTag) fail('the bulk answer has no ETag');
const cached = Object.keys(poller.flagCache).sort();
for (const key of ['sso', 'api.calls', 'max_upload_mb', 'support.tier', 'cpu.share']) {
  if (!cached.includes(key)) fail(`bulk answer lacks ${key}: ${cached}`);
}
expect('sso', pc.getBooleanValue('sso', false), true);
expect('support.tier', pc.getStringValue('support.tier', 'none'), 'standard');
expect('max_upload_mb', pc.getNumberValue('max_upload_mb', 0), 250);
expect('cpu.share', pc.getNumberValue('cpu.share', 0), 2.5);
const calls = pc.getBooleanDetails('api.calls', false);
expect('api.calls', calls.value, true);
expect('api.calls limit', calls.flagMetadata.limit, 1000);
expect('api.calls used', calls.flagMetadata.used, 0);
const exhausted = pc.getBooleanDetails('sso', true);
expect('sso reason', exhausted.reason, 'TARGETING_MATCH');
expect('sso plan', exhausted.flagMetadata.plan, 'pro');
// A flag the catalog lacks is not in the bulk answer: the default, FLAG_NOT_FOUND.
const missing = pc.getBooleanDetails('no.such.feature', true);
expect('missing flag', [missing.value, missing.errorCode], [true, 'FLAG_NOT_FOUND']);

await waitFor('a 304 to a poll with the first ETag', 10_000, () =>
  polled.some((e) => e.status === 304 && e.ifNoneMatch === firstTag),
);
if (polled.some((e, i) => i > 0 && e.status === 200)) {
  fail(`a poll answered 200 while nothing changed: ${JSON.stringify(polled)}`);
}

// --- 2. a policy change: the next poll brings the fresh value ----------------------
const before = polled.length;
rewrite('support.tier: standard', 'support.tier: priority');
await waitFor('the polling provider to see support.tier = priority', 15_000, () =>
  pc.getStringValue('support.tier', 'none') === 'priority',
);
if (pollerChanged < 1) fail('no ConfigurationChanged event from the polling provider');
const fresh = polled.slice(before).find((e) => e.status === 200);
if (!fresh || fresh.etag === firstTag) fail(`no fresh 200 with a new ETag: ${JSON.stringify(polled.slice(before))}`);
await OpenFeature.clearProviders?.();

// --- 3. change detection by the event stream, without polling ----------------------
const streamed = [];
const listener = new OFREPWebProvider({
  baseUrl: base,
  cacheMode: 'disabled',
  fetchImplementation: recording(streamed),
});
let listenerChanged = 0;
listener.events.addHandler(ProviderEvents.ConfigurationChanged, () => listenerChanged++);
await OpenFeature.setContext('sse', context);
await OpenFeature.setProviderAndWait('sse', listener);
const sc = OpenFeature.getClient('sse');
expect('support.tier before', sc.getStringValue('support.tier', 'none'), 'priority');
await waitFor('the event stream to open', 10_000, () => streamsOpened > 0);
const fetchedBefore = streamed.length;
rewrite('support.tier: priority', 'support.tier: standard');
await waitFor('the event-stream provider to see support.tier = standard', 15_000, () =>
  sc.getStringValue('support.tier', 'none') === 'standard',
);
if (listenerChanged < 1) fail('no ConfigurationChanged event from the event-stream provider');
const refetch = streamed.slice(fetchedBefore);
if (!refetch.some((e) => e.status === 200)) fail(`no refetch after the event: ${JSON.stringify(refetch)}`);

await OpenFeature.close();
console.log(`ok: ${cached.length} flags; ${polled.filter((e) => e.status === 304).length} answers 304; ${streamsOpened} event stream(s)`);
process.exit(0);
