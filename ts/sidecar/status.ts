/**
 * A running sidecar's status, asked over its socket (`hello`, then `status`): what
 * `kvtransfer doctor --sidecar` reports.
 */
import * as net from 'node:net'
import { KvTransferError, describeValue, invalidArgument } from '../errors'
import { checkType, toTimeout } from '../options'
import { SIDECAR_PROTOCOL } from './protocol'

/** One attached worker, as the sidecar reports it. */
export interface SidecarWorkerStatus {
  pid: number
  uid: number
  role: string | null
  /** Its communicator's control port (null until attached). */
  port: number | null
  transport: string | null
  /** Peers it wrote to, with their transport. */
  peers: { peer: string; transport: string | null }[]
  callsSucceeded: number
  callsFailed: number
}

/** What `status` answers. */
export interface SidecarStatus {
  socket: string
  protocol: number
  sidecar: string
  pid: number
  uptimeS: number
  metricsPort: number | null
  workers: SidecarWorkerStatus[]
}

function frame(id: number, body: unknown): Buffer {
  const json = Buffer.from(JSON.stringify(body))
  const header = Buffer.alloc(8)
  header.writeUInt32LE(json.length + 4, 0)
  header.writeUInt32LE(id, 4)
  return Buffer.concat([header, json])
}

/** Asks the sidecar on `socket` for its status; rejects `ERR_IO` when none answers. */
export function sidecarStatus(socket: string, timeoutMs = 5000): Promise<SidecarStatus> {
  return new Promise((resolve, reject) => {
    try {
      checkType('socket', socket, 'string')
      if (toTimeout('timeoutMs', timeoutMs) === undefined) timeoutMs = 0x7fff_ffff
    } catch (error) {
      reject(error)
      return
    }
    const connection = net.createConnection(socket)
    let received = Buffer.alloc(0)
    const fail = (error: KvTransferError) => {
      connection.destroy()
      reject(error)
    }
    const timer = setTimeout(
      () => fail(new KvTransferError('ERR_TIMEOUT', `the sidecar on ${socket} did not answer within ${timeoutMs} ms`)),
      timeoutMs,
    )
    connection.on('error', (error) =>
      fail(
        new KvTransferError(
          'ERR_IO',
          `no sidecar answers on ${socket} (${error.message}); start one with kvtransfer serve`,
        ),
      ),
    )
    connection.on('connect', () => {
      connection.write(
        frame(1, { op: 'hello', protocol: SIDECAR_PROTOCOL, client: 'kvtransfer-doctor', pid: process.pid }),
      )
      connection.write(frame(2, { op: 'status' }))
    })
    connection.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk])
      while (received.length >= 8 && received.length >= 4 + received.readUInt32LE(0)) {
        const length = 4 + received.readUInt32LE(0)
        const id = received.readUInt32LE(4)
        const answer = JSON.parse(received.subarray(8, length).toString('utf8')) as {
          ok?: unknown
          error?: { code: string; message: string }
        }
        received = received.subarray(length)
        if (answer.error) {
          clearTimeout(timer)
          fail(new KvTransferError(answer.error.code as never, answer.error.message))
          return
        }
        if (id === 2) {
          clearTimeout(timer)
          connection.end()
          resolve({ socket, ...(answer.ok as Omit<SidecarStatus, 'socket'>) })
        }
      }
    })
  })
}

/** The status as lines of text. */
export function formatSidecarStatus(status: SidecarStatus): string {
  if (typeof status !== 'object' || status === null || !Array.isArray(status.workers))
    throw invalidArgument('status', `expected what sidecarStatus resolves with, got ${describeValue(status)}`)
  const lines = [
    `sidecar: ${status.socket}: ${status.sidecar} (protocol ${status.protocol}), pid ${status.pid}, up ${status.uptimeS} s` +
      (status.metricsPort === null ? '' : `, metrics on port ${status.metricsPort}`),
    `  workers: ${status.workers.length}`,
  ]
  for (const w of status.workers) {
    lines.push(
      `  - pid ${w.pid} (uid ${w.uid}): ${w.role ?? 'not attached'}` +
        (w.port === null ? '' : `, port ${w.port}, ${w.transport}`) +
        `, calls ${w.callsSucceeded} ok / ${w.callsFailed} failed`,
    )
    for (const p of w.peers) lines.push(`      peer ${p.peer} over ${p.transport ?? 'none'}`)
  }
  return `${lines.join('\n')}\n`
}
