/**
 * What `connect` does once its arguments are checked: resolving the host (retried until it
 * resolves: a peer's name may appear only once it starts), the two handshake round trips
 * over the control plane, then opening the data path in the engine, all under the call's
 * deadline; and the attempts a deadline gave up on while the engine was still opening them.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type { NativeCommunicator } from '../index.js'
import { exchange } from './control'
import { type DeadlineOptions, type Expiry, withDeadline } from './deadline'
import { KvTransferError, abortError, native, nativeAsync } from './errors'
import { type Hosts, lookupFailure } from './hosts'

/** Pauses between lookups of a name that does not resolve (yet): doubling, at most the last. */
const LOOKUP_RETRY_MS = [100, 200, 400, 800, 1000]

/** One `connect`: the peer, the tensor-parallel size it must have, and the call's bounds. */
export interface ConnectAttempt {
  /** As the caller gave it: a name or an address. */
  host: string
  port: number
  /** Checked already; undefined: not checked. */
  dstTpSize: number | undefined
  /** Undefined: none. */
  timeoutMs: number | undefined
  signal: AbortSignal | undefined
}

/** A connection opened: the peer's address and its handshake reply. */
export interface Opened {
  ip: string
  reply: Buffer
}

export class Connector {
  /**
   * Data connections that a `connect` gave up on at its deadline while the engine was still
   * opening them: each settles once that attempt ended and, if it opened, was torn down. A
   * later `connect` to the same peer waits for it first.
   */
  private readonly abandoned = new Map<string, Promise<void>>()

  constructor(
    private readonly engine: NativeCommunicator,
    private readonly hosts: Hosts,
  ) {}

  /**
   * Resolves `host`, handshakes with the communicator listening on that address and `port`
   * and opens the data path; resolves with the address and the acceptor's reply (the fence
   * registration proves it came from this handshake) once the engine registered the peer
   * under `address:port`. Rejects with `ERR_TIMEOUT` or `ERR_ABORTED` at the call's
   * deadline, or with why the peer refused.
   */
  async open({ host, port, dstTpSize, timeoutMs, signal }: ConnectAttempt): Promise<Opened> {
    const started = Date.now()
    // What is left of the timeout (at least 1 ms); undefined: none.
    const left = () =>
      timeoutMs === undefined ? undefined : Math.max(1, Math.ceil(timeoutMs - (Date.now() - started)))
    const what = `connect to ${host}:${port}`
    const deadline = (): DeadlineOptions => ({ timeoutMs: left(), signal })
    const expired = {
      timeout: (cause?: unknown) =>
        new KvTransferError('ERR_TIMEOUT', `timed out after ${timeoutMs} ms: ${what}`, { cause }),
      abort: () => abortError(what),
    }
    const ip = this.hosts.known(host) ?? (await this.resolve(host, deadline(), what, timeoutMs))
    const key = `${ip}:${port}`
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
    return { ip, reply }
  }

  /**
   * Looks `host` up, again after a pause while it does not resolve, until it does or the
   * deadline ends the wait (`ERR_TIMEOUT` naming the resolver's last reason).
   */
  private async resolve(host: string, bounds: DeadlineOptions, what: string, timeoutMs: number | undefined) {
    let failure: unknown
    let gaveUp = false
    const attempts = (async () => {
      for (let attempt = 0; ; attempt++) {
        try {
          return await this.hosts.lookup(host)
        } catch (error) {
          failure = error
        }
        if (!gaveUp) await sleep(LOOKUP_RETRY_MS[Math.min(attempt, LOOKUP_RETRY_MS.length - 1)])
        if (gaveUp) throw failure
      }
    })()
    return withDeadline(attempts, bounds, {
      timeout: () =>
        new KvTransferError(
          'ERR_TIMEOUT',
          `timed out after ${timeoutMs} ms: ${what} (${host} does not resolve: ${lookupFailure(failure)})`,
          { cause: failure },
        ),
      abort: () => abortError(what),
      abandon: () => {
        gaveUp = true
      },
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
