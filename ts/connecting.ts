/**
 * What `connect` does once its arguments are checked: the two handshake round trips over
 * the control plane, then opening the data path in the engine, all under the call's
 * deadline; and the attempts a deadline gave up on while the engine was still opening them.
 */
import type { NativeCommunicator } from '../index.js'
import { exchange } from './control'
import { type DeadlineOptions, type Expiry, withDeadline } from './deadline'
import { KvTransferError, abortError, native, nativeAsync } from './errors'

/** One `connect`: the peer, the tensor-parallel size it must have, and the call's bounds. */
export interface ConnectAttempt {
  ip: string
  port: number
  /** Checked already; undefined: not checked. */
  dstTpSize: number | undefined
  /** Undefined: none. */
  timeoutMs: number | undefined
  signal: AbortSignal | undefined
}

export class Connector {
  /**
   * Data connections that a `connect` gave up on at its deadline while the engine was still
   * opening them: each settles once that attempt ended and, if it opened, was torn down. A
   * later `connect` to the same peer waits for it first.
   */
  private readonly abandoned = new Map<string, Promise<void>>()

  constructor(private readonly engine: NativeCommunicator) {}

  /**
   * Handshakes with the communicator listening on `ip:port` and opens the data path;
   * resolves once the engine registered the peer under `ip:port`. Rejects with
   * `ERR_TIMEOUT` or `ERR_ABORTED` at the call's deadline, or with why the peer refused.
   */
  async open({ ip, port, dstTpSize, timeoutMs, signal }: ConnectAttempt): Promise<void> {
    const started = Date.now()
    // What is left of the timeout (at least 1 ms); undefined: none.
    const left = () =>
      timeoutMs === undefined ? undefined : Math.max(1, Math.ceil(timeoutMs - (Date.now() - started)))
    const key = `${ip}:${port}`
    const what = `connect to ${ip}:${port}`
    const deadline = (): DeadlineOptions => ({ timeoutMs: left(), signal })
    const expired = {
      timeout: (cause?: unknown) =>
        new KvTransferError('ERR_TIMEOUT', `timed out after ${timeoutMs} ms: ${what}`, { cause }),
      abort: () => abortError(what),
    }
    const earlier = this.abandoned.get(key)
    if (earlier) await withDeadline(earlier, deadline(), expired)
    // challenge → nonce (the acceptor proves the shared secret), then hello → welcome.
    const challenge = native(() => this.engine.authChallenge(key))
    const response = await exchange(ip, port, 'challenge', challenge, left(), signal, timeoutMs)
    if (signal?.aborted) throw abortError(what)
    const hello = native(() => this.engine.hello(key, response))
    const reply = await exchange(ip, port, 'hello', hello, left(), signal, timeoutMs)
    if (signal?.aborted) throw abortError(what)
    // The engine bounds opening the data path by `connectTimeoutMs`; this call's deadline
    // may end the wait earlier, and then the attempt is torn down once it ends.
    const opening = nativeAsync(this.engine.finishConnect(key, ip, reply, dstTpSize))
    const outcome = opening.catch((error: unknown) => {
      // The engine's bound and this call's deadline ended together: report the deadline.
      throw timeoutMs !== undefined && Date.now() - started >= timeoutMs ? expired.timeout(error) : error
    })
    await withDeadline(outcome, deadline(), {
      ...expired,
      abandon: (reason) => this.abandon(key, opening, reason, timeoutMs),
    })
  }

  /** Tears the data path that `opening` opens down as soon as it opened (see `abandoned`). */
  private abandon(key: string, opening: Promise<void>, reason: Expiry, timeoutMs: number | undefined): void {
    const ended: Promise<void> = opening
      .then(
        // Its caller never saw it connected: not a peer that left.
        () => this.engine.cancelPeer(key, reason, timeoutMs, true),
        () => undefined,
      )
      .then(
        () => undefined,
        () => undefined,
      )
      .finally(() => {
        if (this.abandoned.get(key) === ended) this.abandoned.delete(key)
      })
    this.abandoned.set(key, ended)
  }
}
