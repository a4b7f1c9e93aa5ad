/**
 * Coordination between the bench driver and its agent: newline-delimited JSON over one TCP
 * socket.
 */
import type { ChildProcess } from 'node:child_process'
import type * as net from 'node:net'

export type Json = Record<string, unknown>

export class Channel {
  private buffered = ''
  private readonly queue: Json[] = []
  private readonly waiting: Array<{ resolve: (m: Json) => void; reject: (e: Error) => void }> = []
  private closedError: Error | undefined

  constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true)
    socket.setEncoding('utf8')
    socket.on('data', (chunk: string) => {
      this.buffered += chunk
      let nl: number
      while ((nl = this.buffered.indexOf('\n')) >= 0) {
        const line = this.buffered.slice(0, nl)
        this.buffered = this.buffered.slice(nl + 1)
        if (line.trim() === '') continue
        const message = JSON.parse(line) as Json
        const waiter = this.waiting.shift()
        if (waiter) waiter.resolve(message)
        else this.queue.push(message)
      }
    })
    const onClose = (error?: Error) => {
      this.closedError ??= error ?? new Error('the bench peer closed the coordination socket')
      for (const waiter of this.waiting.splice(0)) waiter.reject(this.closedError)
    }
    socket.on('error', onClose)
    socket.on('close', () => onClose())
  }

  send(message: Json): void {
    this.socket.write(`${JSON.stringify(message)}\n`)
  }

  next(): Promise<Json> {
    const queued = this.queue.shift()
    if (queued) return Promise.resolve(queued)
    if (this.closedError) return Promise.reject(this.closedError)
    return new Promise((resolve, reject) => this.waiting.push({ resolve, reject }))
  }

  /** Sends a request and returns the reply; a reply with `error` becomes an exception. */
  async call(message: Json): Promise<Json> {
    this.send(message)
    const reply = await this.next()
    if (typeof reply.error === 'string') throw new Error(`bench agent: ${reply.error}`)
    return reply
  }
}

/** The driver's handle on its agent. */
export interface Agent {
  channel: Channel
  /** Address of the agent as seen from here (for the communicator and the stream). */
  host: string
  child?: ChildProcess
  describe: string
}
