/**
 * The `writeCache` calls of a communicator that the engine has not settled yet: their
 * Promises, the keep-alive that holds the process open while any is pending, and their
 * aborts.
 */
import { type ExternalObject, type NativeCommunicator, abortCall } from '../index.js'
import { KvTransferError, fromNative } from './errors'

/** A call handed to the engine, settled by `settled`. */
interface PendingCall {
  resolve: () => void
  reject: (error: KvTransferError) => void
}

/** Never fires in practice: the interval only holds the event loop open while referenced. */
const KEEP_ALIVE_INTERVAL_MS = 0x7fff_ffff

function keepAliveTick(): void {}

/** What the engine returns for a call made with a signal: `abortCall` takes it. */
export type CallAbortHandle = ExternalObject<'CallAbort'>

export class PendingCalls {
  private readonly calls = new Map<number, PendingCall>()
  private nextCallId = 0
  /**
   * Referenced exactly while calls are pending: the native function that settles them is
   * weak (shared by all calls), so an idle communicator lets the process exit while a
   * pending call keeps it running. Made with the first call.
   */
  private keepAlive: NodeJS.Timeout | undefined
  private closed = false

  /** The id of the next call (a u32 counter: the engine reports calls by it). */
  nextId(): number {
    const id = this.nextCallId
    this.nextCallId = (id + 1) >>> 0
    return id
  }

  /**
   * The Promise of call `callId`, just handed to the engine (which settles it
   * asynchronously, through the event loop: registering it now cannot miss its outcome).
   * With a `signal`, `abort` is the engine's handle on the call: an abort asks the engine
   * to abort it, and the engine does so only while the call is pending there. A call the
   * engine has completed, whose outcome is on its way to this thread, keeps that outcome,
   * and its connection (and the other calls on it) are left alone. An aborted call
   * rejects with `ERR_ABORTED` from the engine, after its connection was torn down.
   */
  track(callId: number, signal: AbortSignal | undefined, abort: CallAbortHandle | null): Promise<void> {
    const settled = new Promise<void>((resolve, reject) => {
      this.calls.set(callId, { resolve, reject })
    })
    if (this.calls.size === 1) (this.keepAlive ??= setInterval(keepAliveTick, KEEP_ALIVE_INTERVAL_MS)).ref()
    if (!signal || !abort) return settled
    const onAbort = () => {
      // Settled here already: too late. Else the engine decides, against the completion.
      if (this.calls.has(callId)) void abortCall(abort).catch(() => undefined)
    }
    signal.addEventListener('abort', onAbort, { once: true })
    return settled.finally(() => signal.removeEventListener('abort', onAbort))
  }

  /** The engine's outcome of call `callId`: `error` (with its `code`) when it failed. */
  settled(callId: number, error?: Error | null): void {
    const call = this.calls.get(callId)
    if (!call) return
    this.calls.delete(callId)
    if (this.calls.size === 0) {
      // Closing: no call can start any more, so the keep-alive is done for good.
      if (this.closed) clearInterval(this.keepAlive)
      else this.keepAlive?.unref()
    }
    if (error == null) call.resolve()
    else call.reject(fromNative(error))
  }

  /** No call starts any more: the keep-alive goes once the pending ones settled. */
  close(): void {
    this.closed = true
    if (this.calls.size === 0) clearInterval(this.keepAlive)
  }
}

/** Counts a `writeCache` refused before it reached the engine, under its code. */
export function countRefused(native: NativeCommunicator, key: string, error: unknown): void {
  const code = error instanceof KvTransferError ? error.code : 'ERR_INVALID_ARGUMENT'
  try {
    native.countRefusedCall(key, code)
  } catch {
    // Counting must never turn a refusal into another error.
  }
}
