/**
 * The one "timeout plus AbortSignal" race of the public API (`connect`, `waitForArrival`,
 * `close`).
 */
import type { KvTransferError } from './errors'

/** Why a deadline ended the wait. */
export type Expiry = 'timeout' | 'abort'

/** A caller's bounds: either, both or none. */
export interface DeadlineOptions {
  /**
   * Milliseconds until the wait ends with `timeout()`; undefined or 0: no timeout (the
   * API's meaning of 0, see `toTimeout` in options.ts, which checks every timeout given).
   */
  timeoutMs?: number
  /** Ends the wait with `abort()`; an already aborted signal ends it at once. */
  signal?: AbortSignal
}

export interface DeadlineHandlers {
  /** The rejection of a timeout, built when it fires (it may describe what is missing). */
  timeout: () => KvTransferError
  /** The rejection of an abort. */
  abort: () => KvTransferError
  /**
   * Called once, before the rejection, when the deadline ends the wait: cleans up after
   * the work, which may still settle later (its outcome is then ignored).
   */
  abandon?: (reason: Expiry) => void
}

/**
 * Settles like `work`, unless the timeout fires or the signal aborts first: then it rejects
 * with `timeout()` / `abort()` and calls `abandon`. The timer and the abort listener are
 * removed as soon as either side wins. Without a timeout (undefined or 0) or signal, returns
 * `work` itself.
 */
export function withDeadline<T>(work: Promise<T>, options: DeadlineOptions, on: DeadlineHandlers): Promise<T> {
  const { timeoutMs, signal } = options
  if (!timeoutMs && !signal) return work
  return new Promise<T>((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined
    let settled = false
    const finish = (): boolean => {
      if (settled) return false
      settled = true
      if (timer) clearTimeout(timer)
      signal?.removeEventListener('abort', onAbort)
      return true
    }
    const expire = (reason: Expiry) => {
      if (!finish()) return
      on.abandon?.(reason)
      reject(reason === 'abort' ? on.abort() : on.timeout())
    }
    const onAbort = () => expire('abort')
    // Attached first, so that a rejection of abandoned work is never unhandled.
    work.then(
      (value) => {
        if (finish()) resolve(value)
      },
      (error: unknown) => {
        if (finish()) reject(error)
      },
    )
    if (signal?.aborted) return expire('abort')
    signal?.addEventListener('abort', onAbort, { once: true })
    if (timeoutMs) timer = setTimeout(() => expire('timeout'), timeoutMs)
  })
}
