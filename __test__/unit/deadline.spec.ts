/**
 * withDeadline (ts/deadline.ts): the timeout-and-AbortSignal race of connect,
 * waitForArrival and close, on a fake clock.
 */
import { getEventListeners } from 'node:events'
import test from 'ava'
import { type DeadlineHandlers, type Expiry, withDeadline } from '../../ts/deadline'
import { KvTransferError } from '../../ts/errors'
import { stateOf, useFakeClock } from './fake-clock'

/** Handlers that record what the deadline did, in order. */
function recordingHandlers() {
  const events: string[] = []
  const abandoned: Expiry[] = []
  const handlers: DeadlineHandlers = {
    timeout: () => {
      events.push('timeout built')
      return new KvTransferError('ERR_TIMEOUT', 'too slow')
    },
    abort: () => {
      events.push('abort built')
      return new KvTransferError('ERR_ABORTED', 'stopped')
    },
    abandon: (reason) => {
      events.push(`abandon ${reason}`)
      abandoned.push(reason)
    },
  }
  return { events, abandoned, handlers }
}

/** A promise settled by hand. */
function manual<T>() {
  let resolve!: (value: T) => void
  let reject!: (error: unknown) => void
  const promise = new Promise<T>((res, rej) => {
    resolve = res
    reject = rej
  })
  return { promise, resolve, reject }
}

const abortListeners = (signal: AbortSignal) => getEventListeners(signal, 'abort').length

test.serial('without a timeout or a signal, the work itself is returned and no timer is set', (t) => {
  const clock = useFakeClock(t)
  const work = Promise.resolve(7)
  t.is(withDeadline(work, {}, recordingHandlers().handlers), work)
  t.is(clock.pending, 0)
})

test.serial('work that resolves first wins: its value, the timer cleared, nothing abandoned', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const work = manual<string>()
  const raced = withDeadline(work.promise, { timeoutMs: 100 }, handlers)
  t.deepEqual(clock.pendingDelays, [100])
  clock.advance(99)
  t.is(await stateOf(raced), 'pending')
  work.resolve('done')
  t.is(await raced, 'done')
  t.is(clock.pending, 0, 'the timer is cleared once the work settled')
  clock.advance(1000)
  t.deepEqual(events, [], 'neither the timeout error nor abandon is built')
})

test.serial('work that rejects first passes its own error through', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const failure = new Error('the work failed')
  const raced = withDeadline(Promise.reject(failure), { timeoutMs: 100 }, handlers)
  t.is(await t.throwsAsync(raced), failure)
  t.is(clock.pending, 0)
  t.deepEqual(events, [])
})

test.serial('the timeout fires at timeoutMs: abandon("timeout") first, then the timeout error', async (t) => {
  const clock = useFakeClock(t)
  const { events, abandoned, handlers } = recordingHandlers()
  const work = manual<string>()
  const raced = withDeadline(work.promise, { timeoutMs: 50 }, handlers)
  clock.advance(49)
  t.is(await stateOf(raced), 'pending', 'not a millisecond early')
  clock.advance(1)
  const error = await t.throwsAsync(raced, { instanceOf: KvTransferError, message: 'too slow' })
  t.is(error?.code, 'ERR_TIMEOUT')
  t.deepEqual(events, ['abandon timeout', 'timeout built'])
  // The abandoned work settling later changes nothing (a late rejection is not unhandled:
  // ava would fail the file).
  work.reject(new Error('late failure'))
  await stateOf(work.promise)
  t.deepEqual(abandoned, ['timeout'])
})

test.serial('a timeout of 0 is "no timeout", as everywhere in the API: no timer is set', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const work = manual<string>()
  t.is(withDeadline(work.promise, { timeoutMs: 0 }, handlers), work.promise, 'the work itself')
  const signal = new AbortController().signal
  const raced = withDeadline(work.promise, { timeoutMs: 0, signal }, handlers)
  t.deepEqual(clock.pendingDelays, [], 'no timer with a signal either')
  clock.advance(1_000_000)
  work.resolve('done')
  t.is(await raced, 'done')
  t.deepEqual(events, [])
})

test.serial('an abort rejects with the abort error, clears the timer and removes its listener', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const controller = new AbortController()
  const raced = withDeadline(manual<void>().promise, { timeoutMs: 1000, signal: controller.signal }, handlers)
  t.is(abortListeners(controller.signal), 1)
  controller.abort()
  const error = await t.throwsAsync(raced, { instanceOf: KvTransferError, message: 'stopped' })
  t.is(error?.code, 'ERR_ABORTED')
  t.deepEqual(events, ['abandon abort', 'abort built'])
  t.is(clock.pending, 0, 'the timer is cleared')
  t.is(abortListeners(controller.signal), 0, 'the abort listener is removed')
  clock.advance(5000)
  t.deepEqual(events, ['abandon abort', 'abort built'], 'the timeout does not fire afterwards')
})

test.serial('an already aborted signal rejects at once, with no timer and no listener left', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const signal = AbortSignal.abort()
  const raced = withDeadline(Promise.resolve('too late'), { timeoutMs: 1000, signal }, handlers)
  await t.throwsAsync(raced, { instanceOf: KvTransferError, message: 'stopped' })
  t.deepEqual(events, ['abandon abort', 'abort built'])
  t.is(clock.pending, 0)
  t.is(abortListeners(signal), 0)
})

test.serial('with a signal only, the work wins and the listener is removed', async (t) => {
  const clock = useFakeClock(t)
  const { events, handlers } = recordingHandlers()
  const controller = new AbortController()
  const work = manual<number>()
  const raced = withDeadline(work.promise, { signal: controller.signal }, handlers)
  t.is(clock.pending, 0, 'no timer without timeoutMs')
  work.resolve(3)
  t.is(await raced, 3)
  t.is(abortListeners(controller.signal), 0)
  controller.abort()
  t.deepEqual(events, [], 'an abort after the work settled does nothing')
})

test.serial('after the timeout fired, an abort does not abandon a second time', async (t) => {
  const clock = useFakeClock(t)
  const { abandoned, handlers } = recordingHandlers()
  const controller = new AbortController()
  const raced = withDeadline(manual<void>().promise, { timeoutMs: 10, signal: controller.signal }, handlers)
  clock.advance(10)
  controller.abort()
  await t.throwsAsync(raced, { instanceOf: KvTransferError, message: 'too slow' })
  t.deepEqual(abandoned, ['timeout'])
  t.is(abortListeners(controller.signal), 0)
})

test.serial('abandon is optional', async (t) => {
  const clock = useFakeClock(t)
  const { timeout, abort } = recordingHandlers().handlers
  const raced = withDeadline(manual<void>().promise, { timeoutMs: 5 }, { timeout, abort })
  clock.advance(5)
  await t.throwsAsync(raced, { instanceOf: KvTransferError, message: 'too slow' })
})
