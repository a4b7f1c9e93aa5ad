/**
 * Control plane over ZeroMQ: each communicator binds a ROUTER on its port; `connect`
 * sends its descriptor from a DEALER and waits for the peer's answer. Descriptors are
 * produced and checked by the native engine (versioned, length-checked); this layer only
 * frames and routes them.
 */
import * as zmq from 'zeromq'
import { KvTransferError } from './errors'

/** First frame of every control message: protocol name and version. */
export const CONTROL_PROTOCOL = 'KVT1'
const MAX_CONTROL_FRAME_BYTES = 256 * 1024

/**
 * What the acceptor does with a request: return the answer's body or throw a
 * KvTransferError. `identity` names the asking connection (an answer can be sent to it later).
 */
export type HelloHandler = (hello: Buffer, identity: Buffer) => Buffer

/** A message that gets no answer (`fenced`: a writer acknowledges a fence, see fences.ts). */
export type NoticeHandler = (body: Buffer, identity: Buffer) => void

/**
 * The acceptor's handlers, one per request kind:
 * - `challenge` (connector's nonce) → `nonce` (acceptor's nonce and proof of the shared secret)
 * - `hello` (authenticated descriptor envelope) → `welcome` (reply envelope)
 * - `listen` (a writer's name: it takes fences on this connection) → `listening` (fences.ts)
 */
export interface ControlHandlers {
  challenge: HelloHandler
  hello: HelloHandler
  listen: HelloHandler
}

/** Messages without an answer. */
export interface ControlNotices {
  fenced: NoticeHandler
}

const ANSWERS: Record<keyof ControlHandlers, string> = { challenge: 'nonce', hello: 'welcome', listen: 'listening' }

export class ControlServer {
  private readonly router: zmq.Router
  private closed = false
  private loop: Promise<void> | undefined
  /** Sends one at a time (a ZeroMQ socket takes one send at once): the tail of the queue. */
  private sending: Promise<void> = Promise.resolve()
  /** Resolves with the bound port once listening. */
  readonly ready: Promise<number>

  constructor(
    host: string,
    port: number,
    private readonly handlers: ControlHandlers,
    private readonly notices: ControlNotices,
  ) {
    this.router = new zmq.Router({ linger: 0, maxMessageSize: MAX_CONTROL_FRAME_BYTES })
    const endpoint = `tcp://${host}:${port === 0 ? '*' : port}`
    this.ready = this.router.bind(endpoint).then(
      () => {
        this.loop = this.serve()
        const bound = /:(\d+)$/.exec(this.router.lastEndpoint ?? '')
        return bound ? Number(bound[1]) : port
      },
      (error: unknown) => {
        throw new KvTransferError(
          'ERR_IO',
          `cannot listen on ${endpoint}: ${error instanceof Error ? error.message : String(error)} (is the port in use?)`,
          { cause: error },
        )
      },
    )
    // The error is reported by every later call that awaits `ready`.
    this.ready.catch(() => undefined)
  }

  private async serve(): Promise<void> {
    while (!this.closed) {
      let frames: Buffer[]
      try {
        frames = await this.router.receive()
      } catch {
        return // closed
      }
      const [identity, protocol, kind, body] = frames
      const request = kind?.toString() as keyof ControlHandlers
      let reply: Buffer[]
      if (frames.length === 4 && protocol.toString() === CONTROL_PROTOCOL && request === ('fenced' as string)) {
        this.notices.fenced(body, identity)
        continue
      }
      if (
        frames.length !== 4 ||
        protocol.toString() !== CONTROL_PROTOCOL ||
        (request !== 'hello' && request !== 'challenge' && request !== 'listen')
      ) {
        reply = refusal(
          'ERR_PROTOCOL',
          `expected [${CONTROL_PROTOCOL}, challenge|hello|listen, body], got ${frames.length - 1} frames`,
        )
      } else {
        try {
          reply = [Buffer.from(CONTROL_PROTOCOL), Buffer.from(ANSWERS[request]), this.handlers[request](body, identity)]
        } catch (error) {
          const e = error instanceof KvTransferError ? error : new KvTransferError('ERR_PROTOCOL', String(error))
          reply = refusal(e.code, e.message)
        }
      }
      await this.sendTo(identity, reply)
    }
  }

  /** Sends `frames` to the connection `identity`, after every earlier send; never rejects. */
  sendTo(identity: Buffer, frames: Buffer[]): Promise<void> {
    const sent = this.sending.then(() =>
      this.router.send([identity, ...frames]).catch(() => {
        // The connection went away; nothing to send to.
      }),
    )
    this.sending = sent
    return sent
  }

  async close(): Promise<void> {
    this.closed = true
    this.router.close()
    await this.loop
  }
}

function refusal(code: string, message: string): Buffer[] {
  return [Buffer.from(CONTROL_PROTOCOL), Buffer.from('refused'), Buffer.from(code), Buffer.from(message)]
}

/**
 * Sends one request (`challenge` or `hello`) to the communicator listening on `host:port`
 * and returns its answer's body. Waits up to `timeoutMs` for the peer, which may start later
 * (undefined: no timeout).
 */
export async function exchange(
  host: string,
  port: number,
  request: keyof ControlHandlers,
  body: Buffer,
  timeoutMs: number | undefined,
  signal?: AbortSignal,
  /** The caller's whole timeout, named in the error (`timeoutMs` may be what is left of it). */
  reportedTimeoutMs = timeoutMs,
): Promise<Buffer> {
  const peer = `${host}:${port}`
  const dealer = new zmq.Dealer({
    linger: 0,
    // -1: ZeroMQ's "no timeout".
    receiveTimeout: timeoutMs ?? -1,
    sendTimeout: timeoutMs ?? -1,
    maxMessageSize: MAX_CONTROL_FRAME_BYTES,
    reconnectInterval: 100,
    reconnectMaxInterval: 1000,
  })
  const onAbort = () => dealer.close()
  signal?.addEventListener('abort', onAbort, { once: true })
  try {
    if (signal?.aborted) throw new KvTransferError('ERR_ABORTED', `connect to ${peer} was aborted`)
    dealer.connect(`tcp://${host}:${port}`)
    let frames: Buffer[]
    try {
      await dealer.send([Buffer.from(CONTROL_PROTOCOL), Buffer.from(request), body])
      frames = await dealer.receive()
    } catch (error) {
      if (signal?.aborted) throw new KvTransferError('ERR_ABORTED', `connect to ${peer} was aborted`)
      const code = (error as { code?: string }).code
      if (code === 'EAGAIN') {
        throw new KvTransferError(
          'ERR_TIMEOUT',
          `timed out after ${reportedTimeoutMs} ms: no answer from a kvtransfer communicator at ${peer} (is it running and listening on port ${port}?)`,
        )
      }
      throw new KvTransferError('ERR_IO', `control connection to ${peer} failed: ${(error as Error).message}`)
    }
    const [protocol, kind, ...rest] = frames
    if (protocol?.toString() !== CONTROL_PROTOCOL) {
      throw new KvTransferError('ERR_PROTOCOL', `${peer} does not speak ${CONTROL_PROTOCOL}`)
    }
    if (kind?.toString() === ANSWERS[request] && rest.length === 1) return rest[0]
    if (kind?.toString() === 'refused' && rest.length === 2) {
      const code = rest[0].toString() as KvTransferError['code']
      throw new KvTransferError(code, `${peer} refused the connection: ${rest[1].toString()}`)
    }
    throw new KvTransferError('ERR_PROTOCOL', `unexpected answer '${kind?.toString()}' from ${peer}`)
  } finally {
    signal?.removeEventListener('abort', onAbort)
    if (!dealer.closed) dealer.close()
  }
}
