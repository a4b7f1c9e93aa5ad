/**
 * Fences over the control plane (`decode.fence`): a receiver that reclaims blocks makes
 * sure no earlier write of a tag (or of a writer) can still land in them.
 *
 * Each writer keeps one DEALER per peer it connected to (`FenceListener`): `listen` (its
 * name) → `listening` (the receiver's hub id) before `connect` resolves, then it takes
 * `fence` messages on it and answers each with `fenced` once its engine has settled the
 * fenced calls (`fenceWrites`: pending ones fail `ERR_FENCED` and their connection is torn
 * down). The receiver (`FenceHub`) sends the fence to every writer concerned and waits for
 * their answers; a writer that does not answer in time is cut off by the engine (`cutOff`:
 * no byte it sent can land afterwards; it must connect again).
 *
 * A writer may reach one receiver by several keys (two of its addresses: two links, two
 * channels). The receiver knows a writer by its name and sends the fence on the channel
 * that listened last; the writer fences every link whose channel reached the same hub id.
 *
 * A warm re-attach (sidecar/warm.ts) also sends `rekey` on the channel: the receiver's new
 * region keys after a swap (RDMA registers the new pages again), which the writer applies
 * to every link to that receiver (`NativeCommunicator.rekey`) before it answers, while its
 * fence still holds. The answer travels as `fenced` too (`{ id, rekeyed }`), matched by id.
 * A writer that does not answer (or cannot take the keys) is cut off: it stays fenced and
 * connects again, getting the keys with the handshake.
 */
import { randomUUID } from 'node:crypto'
import * as zmq from 'zeromq'
import type { NativeCommunicator } from '../index.js'
import { CONTROL_PROTOCOL, type ControlServer } from './control'
import { KvTransferError, describeValue, fromNative, invalidArgument, native, nativeAsync } from './errors'
import { type FenceOptions, checkNonNegativeInteger } from './options'
import { type RequestTag, encodeTag } from './tags'

/** What `fence` covers: every call of a tag, or every call of one writer (its name). */
export type FenceTarget = { tag: RequestTag } | { peer: string }

/** How a fence went. */
export interface FenceResult {
  /** Writers that acknowledged: none of the fenced calls of theirs can land any more. */
  acknowledged: string[]
  /** Writers that did not answer in time and were cut off (they must connect again). */
  cutOff: string[]
}

/** A fence request as sent: its id, the encoded tag (base64; null: every call), the hold. */
interface FenceRequest {
  id: number
  tag: string | null
  holdMs: number
}

/** A rekey request as sent: its id and, per transport, the new keys (base64). */
interface RekeyRequest {
  id: number
  keys: { transport: string; keys: string }[]
}

/** A writer's answer: how many pending calls it fenced (or rail pairs it rekeyed), or why it could not. */
interface FenceAnswer {
  id: number
  fenced?: number
  rekeyed?: number
  error?: { code: string; message: string }
}

/** A transport's new region keys after a swap (`NativeCommunicator.regionKeys`). */
export interface RegionKeys {
  transport: string
  keys: Buffer
}

const MAX_WAIT_MS = 3_600_000

/** Checks `fence`'s target: exactly one of `tag` (a request tag) or `peer` (a writer's name). */
export function checkFenceTarget(target: unknown): FenceTarget {
  if (typeof target !== 'object' || target === null) {
    throw invalidArgument('target', `expected { tag } or { peer }, got ${describeValue(target)}`)
  }
  const hasTag = 'tag' in target && (target as { tag?: unknown }).tag !== undefined
  const hasPeer = 'peer' in target && (target as { peer?: unknown }).peer !== undefined
  if (hasTag === hasPeer) {
    throw invalidArgument('target', `an object with ${hasTag ? 'both' : 'neither'} of tag and peer; give exactly one`)
  }
  if (hasTag) {
    const tag = (target as { tag: RequestTag }).tag
    encodeTag(tag)
    return { tag }
  }
  const peer = (target as { peer: unknown }).peer
  if (typeof peer !== 'string' || peer.length === 0) {
    throw invalidArgument('target.peer', `expected a writer's name (a non-empty string), got ${describeValue(peer)}`)
  }
  return { peer }
}

/** `fence`'s options, checked, with their defaults. */
export function checkFenceOptions(options: FenceOptions): { ackTimeoutMs: number; holdMs: number } {
  return {
    ackTimeoutMs:
      options.ackTimeoutMs === undefined
        ? 1000
        : checkNonNegativeInteger('ackTimeoutMs', options.ackTimeoutMs, 600_000),
    holdMs: options.holdMs === undefined ? 30_000 : checkNonNegativeInteger('holdMs', options.holdMs, 3_600_000),
  }
}

/** The receiving side: who listens for fences, and the fences waiting for answers. */
export class FenceHub {
  /** This hub's id, answered to `listen`: a writer's channels that got the same one reach this side. */
  private readonly id = randomUUID()
  /** Writer name → the identity of its listening connection (the latest one). */
  private readonly listeners = new Map<string, Buffer>()
  private readonly waiting = new Map<number, (answer: FenceAnswer) => void>()
  private nextId = 0
  /** Writing side: the fence channel to each connected peer, by `address:port`. */
  private readonly channels = new Map<string, FenceListener>()

  constructor(
    private readonly engine: NativeCommunicator,
    private readonly control: () => ControlServer,
  ) {}

  /** Writing side: the fence channels open now. */
  get channelCount(): number {
    return this.channels.size
  }

  /** Writing side: opens the fence channel to the peer `key` (replacing an earlier one). */
  async follow(host: string, port: number, key: string, reply: Buffer, timeoutMs: number | undefined): Promise<void> {
    const channel = await FenceListener.open(this.engine, host, port, key, reply, timeoutMs, (c) => this.linksOf(c))
    void this.channels.get(key)?.closed()
    this.channels.set(key, channel)
    // Channels of links that are gone (a receiver restarted on another port) end here, as
    // the engine releases those links at a connect: each would reconnect to a dead port.
    for (const [other, stale] of this.channels) {
      if (other !== key && !this.engine.isConnected(other)) {
        this.channels.delete(other)
        void stale.closed()
      }
    }
  }

  /**
   * Writing side: the keys of every link to the receiver that `channel` reaches (its own,
   * and those of the other channels that got the same hub id): a fence on one channel
   * covers them all.
   */
  private linksOf(channel: FenceListener): string[] {
    const keys = new Set([channel.key])
    if (channel.receiver !== '') {
      for (const other of this.channels.values()) if (other.receiver === channel.receiver) keys.add(other.key)
    }
    return [...keys]
  }

  /** Writing side: closes every fence channel (at close). */
  async unfollowAll(): Promise<void> {
    await Promise.all([...this.channels.values()].map((channel) => channel.closed()))
  }

  /** Receiving side: the writers that take this side's fences. */
  writers(): string[] {
    return [...this.listeners.keys()]
  }

  /**
   * `listen`: the writer `name` takes fences on connection `identity`. The body is the name,
   * then a zero byte and the proof that it registers for its own handshake (checked by the
   * engine when this side has an auth token: `ERR_AUTH` otherwise, and nothing changes).
   */
  listen(body: Buffer, identity: Buffer): Buffer {
    const end = body.indexOf(0)
    const name = body.subarray(0, end < 0 ? body.length : end).toString('utf8')
    const proof = end < 0 ? Buffer.alloc(0) : body.subarray(end + 1)
    if (name.length === 0 || name.length > 255) throw new KvTransferError('ERR_PROTOCOL', 'listen: bad writer name')
    native(() => this.engine.checkListen(name, proof))
    this.listeners.set(name, Buffer.from(identity))
    return Buffer.from(this.id)
  }

  /** `fenced`: a writer's answer. */
  fenced(body: Buffer): void {
    let answer: FenceAnswer
    try {
      answer = JSON.parse(body.toString('utf8')) as FenceAnswer
    } catch {
      return
    }
    this.waiting.get(answer.id)?.(answer)
  }

  /**
   * Sends the fence to the writers concerned and resolves once each acknowledged or was
   * cut off. `waitMs`: how long a writer has to answer; `holdMs`: how long writers refuse
   * new calls of the fenced tag (or, for a writer, every call).
   */
  async fence(target: FenceTarget, waitMs: number, holdMs: number): Promise<FenceResult> {
    const tag = 'tag' in target ? encodeTag(target.tag).toString('base64') : null
    const writers = 'tag' in target ? [...this.listeners.keys()] : [target.peer].filter((w) => this.listeners.has(w))
    const answers = await Promise.all(writers.map((writer) => this.fenceOne(writer, tag, holdMs, waitMs)))
    const result: FenceResult = { acknowledged: [], cutOff: [] }
    const silent: string[] = []
    writers.forEach((writer, i) => (answers[i] !== undefined ? result.acknowledged : silent).push(writer))
    // A writer that fenced calls in flight tore its connection down, but a receiver may
    // still be applying frames it read before the reset (a TCP receive loop descheduled
    // mid-copy): close that writer's connections here too, so none of it lands after this
    // resolves. Where this side cannot (NVLink), the writer's acknowledgement is the proof.
    for (const [i, writer] of writers.entries()) {
      if ((answers[i] ?? 0) > 0) await nativeAsync(this.engine.cutOff(writer, 0)).catch(() => 0)
    }
    // A writer by name that never listened may still have connections: cut them too.
    if ('peer' in target && writers.length === 0) silent.push(target.peer)
    for (const writer of silent) {
      this.listeners.delete(writer)
      const cut = await nativeAsync(this.engine.cutOff(writer, waitMs))
      if (cut > 0 || 'peer' in target) result.cutOff.push(writer)
    }
    return result
  }

  /**
   * Warm re-attach: sends `keys` (this side's new region keys) to each of `writers` and
   * resolves once each applied them to its links to this side, or was cut off: it did not
   * answer within `waitMs`, or could not take them (it stays fenced and connects again).
   */
  async rekey(writers: string[], keys: RegionKeys[], waitMs: number): Promise<FenceResult> {
    const body = keys.map((k) => ({ transport: k.transport, keys: k.keys.toString('base64') }))
    const answers = await Promise.all(
      writers.map((writer) =>
        this.ask(writer, 'rekey', (id) => ({ id, keys: body }) satisfies RekeyRequest, waitMs).then((answer) =>
          answer?.error === undefined && typeof answer?.rekeyed === 'number' ? answer.rekeyed : undefined,
        ),
      ),
    )
    const result: FenceResult = { acknowledged: [], cutOff: [] }
    for (const [i, writer] of writers.entries()) {
      if (answers[i] !== undefined) {
        result.acknowledged.push(writer)
        continue
      }
      this.listeners.delete(writer)
      await nativeAsync(this.engine.cutOff(writer, waitMs)).catch(() => 0)
      result.cutOff.push(writer)
    }
    return result
  }

  /** Asks `writer` to fence; resolves with how many calls it fenced, undefined without an answer within `waitMs`. */
  private async fenceOne(
    writer: string,
    tag: string | null,
    holdMs: number,
    waitMs: number,
  ): Promise<number | undefined> {
    const answer = await this.ask(writer, 'fence', (id) => ({ id, tag, holdMs }) satisfies FenceRequest, waitMs)
    return answer?.error === undefined && typeof answer?.fenced === 'number' ? answer.fenced : undefined
  }

  /** Sends `writer` a `kind` request (built around its id); resolves with its answer, undefined without one within `waitMs`. */
  private ask(
    writer: string,
    kind: 'fence' | 'rekey',
    request: (id: number) => { id: number },
    waitMs: number,
  ): Promise<FenceAnswer | undefined> {
    const identity = this.listeners.get(writer)
    if (!identity) return Promise.resolve(undefined)
    const id = this.nextId++
    return new Promise<FenceAnswer | undefined>((resolve) => {
      const timer = setTimeout(() => done(undefined), Math.min(waitMs, MAX_WAIT_MS))
      const done = (answer: FenceAnswer | undefined) => {
        clearTimeout(timer)
        this.waiting.delete(id)
        resolve(answer)
      }
      this.waiting.set(id, done)
      void this.control().sendTo(identity, [
        Buffer.from(CONTROL_PROTOCOL),
        Buffer.from(kind),
        Buffer.from(JSON.stringify(request(id))),
      ])
    })
  }
}

/** The writing side: takes the fences of the peer it connected to as `key`. */
export class FenceListener {
  private readonly dealer: zmq.Dealer
  private loop: Promise<void> | undefined
  private sending: Promise<void> = Promise.resolve()
  /** The receiver's hub id from `listening` ('' from a receiver that sends none). */
  receiver = ''

  constructor(
    private readonly engine: NativeCommunicator,
    readonly key: string,
    /** The keys of every link of this writer to the same receiver (this one's included). */
    private readonly links: (channel: FenceListener) => string[],
  ) {
    this.dealer = new zmq.Dealer({ linger: 0, reconnectInterval: 100, reconnectMaxInterval: 1000 })
  }

  /**
   * Takes the fences of the peer just connected as `key`. When it cannot, the connection
   * is torn down again (a writer that cannot be fenced must not write) and this rejects.
   */
  static async open(
    engine: NativeCommunicator,
    host: string,
    port: number,
    key: string,
    reply: Buffer,
    timeoutMs: number | undefined,
    links: (channel: FenceListener) => string[],
  ): Promise<FenceListener> {
    const listener = new FenceListener(engine, key, links)
    try {
      await listener.start(host, port, engine.metrics().name, reply, timeoutMs)
    } catch (error) {
      await nativeAsync(engine.cancelPeer(key, 'abort', undefined, true)).catch(() => undefined)
      throw error
    }
    return listener
  }

  /**
   * Registers this writer (`name`) with the peer at `host:port`, with the proof that the
   * registration belongs to the handshake that peer answered with `reply`; resolves once it
   * listens, rejects with the peer's refusal (e.g. `ERR_AUTH`).
   */
  private async start(
    host: string,
    port: number,
    name: string,
    reply: Buffer,
    timeoutMs: number | undefined,
  ): Promise<void> {
    this.dealer.receiveTimeout = timeoutMs ?? -1
    this.dealer.connect(`tcp://${host}:${port}`)
    try {
      const proof = native(() => this.engine.listenProof(reply, name))
      const body = Buffer.concat([Buffer.from(name), Buffer.alloc(1), proof])
      await this.dealer.send([Buffer.from(CONTROL_PROTOCOL), Buffer.from('listen'), body])
      const [protocol, kind, answer, message] = await this.dealer.receive()
      if (protocol?.toString() === CONTROL_PROTOCOL && kind?.toString() === 'refused' && message !== undefined) {
        const code = answer.toString() as KvTransferError['code']
        throw new KvTransferError(code, `${this.key} refused this writer's fence registration: ${message.toString()}`)
      }
      if (protocol?.toString() !== CONTROL_PROTOCOL || kind?.toString() !== 'listening') {
        throw new KvTransferError('ERR_PROTOCOL', `${this.key} did not take this writer's fences (${kind?.toString()})`)
      }
      // A hub id is a UUID; anything longer is not one (the channel then covers its own link).
      const receiver = answer?.toString('utf8') ?? ''
      this.receiver = receiver.length <= 64 ? receiver : ''
    } catch (error) {
      this.close()
      throw error instanceof KvTransferError
        ? error
        : new KvTransferError('ERR_IO', `fence channel to ${this.key}: ${(error as Error).message}`)
    }
    this.dealer.receiveTimeout = -1
    this.loop = this.serve()
  }

  private async serve(): Promise<void> {
    for (;;) {
      let frames: Buffer[]
      try {
        frames = await this.dealer.receive()
      } catch {
        return // closed
      }
      const [protocol, kind, body] = frames
      if (frames.length !== 3 || protocol.toString() !== CONTROL_PROTOCOL) continue
      if (kind.toString() === 'fence') void this.answer(body)
      else if (kind.toString() === 'rekey') void this.rekey(body)
    }
  }

  /** `rekey`: the receiver swapped its memory; every link to it takes the new keys, then this answers. */
  private async rekey(body: Buffer): Promise<void> {
    let request: RekeyRequest
    try {
      request = JSON.parse(body.toString('utf8')) as RekeyRequest
      if (typeof request.id !== 'number' || !Array.isArray(request.keys)) return
    } catch {
      return
    }
    let answer: FenceAnswer
    try {
      let rekeyed = 0
      for (const key of this.links(this)) {
        for (const k of request.keys) {
          rekeyed += await this.engine.rekey(key, String(k.transport), Buffer.from(String(k.keys), 'base64'))
        }
      }
      answer = { id: request.id, rekeyed }
    } catch (error) {
      const e = fromNative(error)
      answer = { id: request.id, error: { code: e.code, message: e.message } }
    }
    await this.send(answer)
  }

  private async answer(body: Buffer): Promise<void> {
    let request: FenceRequest
    try {
      request = JSON.parse(body.toString('utf8')) as FenceRequest
    } catch {
      return
    }
    let answer: FenceAnswer
    try {
      const tag = request.tag === null ? null : Buffer.from(request.tag, 'base64')
      // Every link to that receiver, not only this channel's: none of them may land.
      const counts = await Promise.all(this.links(this).map((key) => this.engine.fenceWrites(key, tag, request.holdMs)))
      answer = { id: request.id, fenced: counts.reduce((sum, n) => sum + n, 0) }
    } catch (error) {
      const e = fromNative(error)
      answer = { id: request.id, error: { code: e.code, message: e.message } }
    }
    await this.send(answer)
  }

  /** Sends an answer (`fenced`, for a fence or a rekey), after those before it. */
  private async send(answer: FenceAnswer): Promise<void> {
    const frames = [Buffer.from(CONTROL_PROTOCOL), Buffer.from('fenced'), Buffer.from(JSON.stringify(answer))]
    this.sending = this.sending.then(() => this.dealer.send(frames).catch(() => undefined))
    await this.sending
  }

  close(): void {
    if (!this.dealer.closed) this.dealer.close()
  }

  /** Closes and waits for the receive loop to end. */
  async closed(): Promise<void> {
    this.close()
    await this.loop
  }
}
