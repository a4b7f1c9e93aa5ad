/**
 * The sidecar's `fence` request (ts/sidecar/protocol.ts): its fields become the target and
 * options of `RDMACommunicator.fence`, whose checks (ts/fences.ts) refuse a bad request,
 * typed, before anything is sent to a writer. This is the path `serve.ts` takes.
 */
import test from 'ava'
import { KvTransferError } from '../../ts/errors'
import { checkFenceOptions, checkFenceTarget } from '../../ts/fences'
import { fenceArguments, parseRequest } from '../../ts/sidecar/protocol'
import { assertRefused } from './refusal'

/** What the sidecar hands to `fence` for this request body, checked as `fence` checks it. */
function checked(request: Record<string, unknown>) {
  const { target, options } = fenceArguments(parseRequest(Buffer.from(JSON.stringify({ op: 'fence', ...request }))))
  return { target: checkFenceTarget(target), options: checkFenceOptions(options) }
}

test('a fence by tag or by writer becomes fence({ tag } | { peer }, options)', (t) => {
  t.deepEqual(checked({ tag: { s: 'req-1' }, holdMs: 500, ackTimeoutMs: 0 }), {
    target: { tag: 'req-1' },
    options: { holdMs: 500, ackTimeoutMs: 0 },
  })
  t.deepEqual(checked({ tag: { u: '18446744073709551615' } }), {
    target: { tag: 0xffff_ffff_ffff_ffffn },
    options: { holdMs: 30_000, ackTimeoutMs: 1000 },
  })
  t.deepEqual(checked({ peer: 'prefill-0', tag: null }).target, { peer: 'prefill-0' })
})

test('a bad fence request is refused, typed, naming what is wrong', (t) => {
  assertRefused(t, () => checked({}), 'target', 'neither of tag and peer')
  assertRefused(t, () => checked({ tag: { s: 'a' }, peer: 'b' }), 'target', 'both of tag and peer')
  assertRefused(t, () => checked({ tag: { x: 1 } }), 'tag', '{"s": text}')
  assertRefused(t, () => checked({ tag: { u: '18446744073709551616' } }), 'tag', 'not a u64')
  assertRefused(t, () => checked({ tag: { s: 'x'.repeat(255) } }), 'tag', 'at most 254')
  assertRefused(t, () => checked({ peer: '' }), 'target.peer', "a writer's name")
  assertRefused(t, () => checked({ peer: 7 }), 'target.peer', "a writer's name")
  assertRefused(t, () => checked({ tag: { s: 'a' }, holdMs: -1 }), 'holdMs')
  assertRefused(t, () => checked({ tag: { s: 'a' }, holdMs: 3_600_001 }), 'holdMs', '3600000')
  assertRefused(t, () => checked({ tag: { s: 'a' }, ackTimeoutMs: 1.5 }), 'ackTimeoutMs')
  const notJson = t.throws(() => parseRequest(Buffer.from('{"op": "fence", ')), { instanceOf: KvTransferError })
  t.is(notJson?.code, 'ERR_PROTOCOL')
})
