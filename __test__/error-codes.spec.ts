/**
 * One source of truth for error codes: the engine's `ERROR_CODES`, exported by the addon as
 * `errorCodes()`, equals the TypeScript `KvTransferErrorCode` list; the addon's errors carry
 * the code in `err.code` and the bare text in `err.message`.
 */
import test from 'ava'
import { NativeCommunicator, errorCodes } from '../index.js'
import { KV_TRANSFER_ERROR_CODES, KvTransferError, fromNative } from '../lib/errors.js'
import type { KvTransferErrorCode } from '../lib/index.js'

/** True only when `A` and `B` are the same type. */
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false
// The public union is the list's element type (checked by `tsc -p __test__/tsconfig.json`).
const unionIsTheList: Equal<KvTransferErrorCode, (typeof KV_TRANSFER_ERROR_CODES)[number]> = true

test('the TypeScript error codes are exactly the engine list', (t) => {
  t.true(unionIsTheList)
  t.deepEqual([...KV_TRANSFER_ERROR_CODES], errorCodes())
})

const nativeOptions = {
  role: 'prefill',
  gpuIdx: 0,
  name: 'codes',
  localKeyCache: [new Uint8Array(1024)],
  localValueCache: [],
  blockNumber: 1,
  blockBytes: 1024,
  transport: 'tcp',
  authToken: '',
}

test('the addon throws and rejects with the code in err.code and the bare message', async (t) => {
  const thrown = t.throws(() => new NativeCommunicator({ ...nativeOptions, role: 'encoder' }, () => undefined))
  t.is((thrown as Error & { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  t.is(thrown?.message, `invalid role: "encoder" is not 'prefill' or 'decode'`)

  const comm = new NativeCommunicator(nativeOptions, () => undefined)
  t.teardown(() => comm.close())
  const notConnected = t.throws(() => comm.peer('nowhere:1'))
  t.is((notConnected as Error & { code?: string }).code, 'ERR_NOT_CONNECTED')
  t.is(notConnected?.message, "peer nowhere:1 is not connected: call connect('nowhere', 1) first")

  const rejected = await t.throwsAsync(comm.finishConnect('nowhere:1', '127.0.0.1', Buffer.alloc(3)))
  t.is((rejected as Error & { code?: string }).code, 'ERR_PROTOCOL')
  t.regex(rejected?.message ?? '', /^protocol error from nowhere:1: /)
  const lifted = fromNative(rejected)
  t.true(lifted instanceof KvTransferError)
  t.is(lifted.code, 'ERR_PROTOCOL')
  t.is(lifted.message, rejected?.message)
})

test('fromNative: an error without a known code becomes ERR_IO with the original as cause', (t) => {
  const napiFailure = Object.assign(new Error('Failed to convert JavaScript value'), { code: 'InvalidArg' })
  const lifted = fromNative(napiFailure)
  t.is(lifted.code, 'ERR_IO')
  t.is(lifted.message, 'Failed to convert JavaScript value')
  t.is(lifted.cause, napiFailure)
  t.is(fromNative('text').code, 'ERR_IO')
  const own = new KvTransferError('ERR_CLOSED', 'closed')
  t.is(fromNative(own), own)
})
