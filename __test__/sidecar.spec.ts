/**
 * The sidecar's socket (`kvtransfer serve`): its path and mode, admission by peer
 * credentials, the protocol's refusals, detaching, metrics. The worker side with shared
 * memory (descriptors over SCM_RIGHTS, byte-for-byte transfers, killed workers and
 * sidecars) is tested by the Python client's suite (clients/python/tests).
 */
import test, { type ExecutionContext } from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as http from 'node:http'
import * as net from 'node:net'
import * as os from 'node:os'
import * as path from 'node:path'
import { SIDECAR_PROTOCOL, Sidecar, sidecarStatus } from '../lib/index.js'

type Answer = { id: number; body: { ok?: Record<string, unknown>; error?: { code: string; message: string } } }

function socketPath(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kvt-sidecar-'))
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }))
  return path.join(dir, 's.sock')
}

async function start(t: ExecutionContext, options: Parameters<typeof Sidecar.start>[0] = {}): Promise<Sidecar> {
  const sidecar = await Sidecar.start({ socket: socketPath(t), ...options })
  t.teardown(() => sidecar.close())
  return sidecar
}

function frame(id: number, body: unknown): Buffer {
  const json = Buffer.from(typeof body === 'string' ? body : JSON.stringify(body))
  const header = Buffer.alloc(8)
  header.writeUInt32LE(json.length + 4, 0)
  header.writeUInt32LE(id, 4)
  return Buffer.concat([header, json])
}

/** A bare protocol client: sends frames, collects answers, notices the end. */
class Client {
  readonly answers: Answer[] = []
  private buffer = Buffer.alloc(0)
  private waiters: (() => void)[] = []
  ended = false

  constructor(readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk])
      while (this.buffer.length >= 8 && this.buffer.length >= 4 + this.buffer.readUInt32LE(0)) {
        const length = 4 + this.buffer.readUInt32LE(0)
        this.answers.push({
          id: this.buffer.readUInt32LE(4),
          body: JSON.parse(this.buffer.subarray(8, length).toString()),
        })
        this.buffer = this.buffer.subarray(length)
      }
      this.wake()
    })
    socket.on('close', () => {
      this.ended = true
      this.wake()
    })
    socket.on('error', () => undefined)
  }

  static connect(t: ExecutionContext, socket: string): Promise<Client> {
    return new Promise((resolve, reject) => {
      const connection = net.createConnection(socket, () => resolve(new Client(connection)))
      connection.once('error', reject)
      t.teardown(() => connection.destroy())
    })
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w()
  }

  /** Sends request `id` and resolves with its answer. */
  async request(id: number, body: unknown): Promise<Answer['body']> {
    this.socket.write(frame(id, body))
    return (await this.until((a) => a.id === id)).body
  }

  /** Resolves with the first answer matching, or rejects once the connection ended. */
  async until(match: (a: Answer) => boolean): Promise<Answer> {
    for (;;) {
      const found = this.answers.find(match)
      if (found) return found
      if (this.ended) throw new Error('the connection ended')
      await new Promise<void>((resolve) => this.waiters.push(resolve))
    }
  }

  async closed(): Promise<void> {
    while (!this.ended) await new Promise<void>((resolve) => this.waiters.push(resolve))
  }
}

const hello = { op: 'hello', protocol: SIDECAR_PROTOCOL, client: 'ava', pid: process.pid }
const isRoot = process.getuid?.() === 0

test('the socket is created with the given mode (default 0600) and removed at close', async (t) => {
  const sidecar = await start(t)
  t.is(fs.statSync(sidecar.socket).mode & 0o777, 0o600)
  const shared = await start(t, { mode: 0o660 })
  t.is(fs.statSync(shared.socket).mode & 0o777, 0o660)
  await sidecar.close()
  t.false(fs.existsSync(sidecar.socket))
})

test('a live sidecar socket and other files are refused; a stale socket is replaced', async (t) => {
  const sidecar = await start(t)
  const live = await t.throwsAsync(Sidecar.start({ socket: sidecar.socket }))
  t.is((live as { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  t.regex(live!.message, /another sidecar serves .*s\.sock/)
  const file = path.join(path.dirname(socketPath(t)), 'plain')
  fs.mkdirSync(path.dirname(file), { recursive: true })
  fs.writeFileSync(file, 'keep me')
  const plain = await t.throwsAsync(Sidecar.start({ socket: file }))
  t.regex(plain!.message, /exists and is not a socket/)
  t.is(fs.readFileSync(file, 'utf8'), 'keep me', 'the file is untouched')
  // A socket file whose process is gone (bound, never closed: the process exited).
  const stale = socketPath(t)
  const bound = spawnSync('python3', [
    '-c',
    `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(stale)})`,
  ])
  t.is(bound.status, 0, String(bound.stderr))
  t.true(fs.existsSync(stale))
  const replaced = await Sidecar.start({ socket: stale })
  t.teardown(() => replaced.close())
  const client = await Client.connect(t, stale)
  t.deepEqual((await client.request(1, hello)).ok?.protocol, SIDECAR_PROTOCOL)
})

test('the protocol refuses, typed: no hello first, another version, not JSON, unknown ops, calls before attach', async (t) => {
  const sidecar = await start(t)
  const client = await Client.connect(t, sidecar.socket)
  t.is((await client.request(1, { op: 'connect', ip: '127.0.0.1', port: 1 })).error?.code, 'ERR_PROTOCOL')
  const other = await client.request(2, { ...hello, protocol: 2 })
  t.is(other.error?.code, 'ERR_PROTOCOL')
  t.regex(other.error!.message, /protocol 2, this sidecar 1: upgrade the sidecar/)
  t.is((await client.request(3, '{not json')).error?.code, 'ERR_PROTOCOL')
  t.truthy((await client.request(4, hello)).ok)
  t.is((await client.request(5, { op: 'fly' })).error?.code, 'ERR_PROTOCOL')
  const early = await client.request(6, { op: 'write', peer: '127.0.0.1:1', layer: 0, local: [0], remote: [0] })
  t.is(early.error?.code, 'ERR_NOT_CONNECTED')
  t.regex(early.error!.message, /send "attach" first/)
  const noFd = await client.request(7, {
    op: 'attach',
    role: 'decode',
    blockNumber: 4,
    blockBytes: 64,
    keyCache: [{ fd: 0, offset: 0, bytes: 256 }],
  })
  t.is(noFd.error?.code, 'ERR_INVALID_ARGUMENT')
  t.regex(noFd.error!.message, /keyCache\[0\].*descriptor index 0 is not one of the 0 descriptors/)
  const badRole = await client.request(8, {
    op: 'attach',
    role: 'encoder',
    blockNumber: 4,
    blockBytes: 64,
    keyCache: [],
  })
  t.is(badRole.error?.code, 'ERR_INVALID_ARGUMENT')
  t.is(sidecar.workerCount, 0, 'nothing attached')
})

test('a frame beyond 16 MiB ends the connection; the sidecar serves others on', async (t) => {
  const sidecar = await start(t)
  const client = await Client.connect(t, sidecar.socket)
  const header = Buffer.alloc(8)
  header.writeUInt32LE(64 << 20, 0)
  client.socket.write(header)
  await client.closed()
  const other = await Client.connect(t, sidecar.socket)
  t.truthy((await other.request(1, hello)).ok)
})

const asRoot = isRoot ? test : test.skip
asRoot('only the sidecar’s uid (and root) attach unless --allow-uid admits more', async (t) => {
  const nobody = 65534
  // A client as uid 65534: sends hello and prints the first answer (or "closed").
  const script = `
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
body = json.dumps({"op": "hello", "protocol": 1, "client": "nobody", "pid": 0}).encode()
try:
    s.sendall(struct.pack("<II", 4 + len(body), 1) + body)
except OSError:
    pass  # refused: the sidecar answered and closed first
head = s.recv(8, socket.MSG_WAITALL)
print(s.recv(struct.unpack("<I", head[:4])[0] - 4, socket.MSG_WAITALL).decode() if len(head) == 8 else "closed")`
  // Spawned asynchronously: the sidecar answers from this process's event loop.
  const asNobody = async (socket: string) => {
    fs.chmodSync(path.dirname(socket), 0o755)
    const child = spawn('/usr/bin/python3', ['-c', script, socket], { uid: nobody, gid: nobody, timeout: 10_000 })
    let out = ''
    let err = ''
    child.stdout.on('data', (d: Buffer) => (out += d.toString()))
    child.stderr.on('data', (d: Buffer) => (err += d.toString()))
    const status = await new Promise((resolve) => child.on('close', resolve))
    t.is(status, 0, err)
    return JSON.parse(out) as Answer['body']
  }
  const own = await start(t, { mode: 0o666 })
  const refused = await asNobody(own.socket)
  t.is(refused.error?.code, 'ERR_AUTH')
  t.regex(
    refused.error!.message,
    /uid 65534 \(pid \d+\) may not attach: the sidecar admits uid 0 and root \(add --allow-uid/,
  )
  const open = await start(t, { allowUids: [nobody], mode: 0o666 })
  t.is((await asNobody(open.socket)).ok?.protocol, SIDECAR_PROTOCOL)
})

test('a worker that disconnects is detached; status and metrics report the sidecar', async (t) => {
  const sidecar = await start(t, { metricsPort: 0 })
  const client = await Client.connect(t, sidecar.socket)
  t.truthy((await client.request(1, hello)).ok)
  const status = await sidecarStatus(sidecar.socket)
  t.is(status.protocol, SIDECAR_PROTOCOL)
  t.is(status.pid, process.pid)
  t.is(status.workers.length, 1, 'the asking connection is not listed')
  t.is(status.workers[0].role, null)
  client.socket.destroy()
  for (let i = 0; i < 100 && (await sidecarStatus(sidecar.socket)).workers.length > 0; i++)
    await new Promise((r) => setTimeout(r, 20))
  t.is((await sidecarStatus(sidecar.socket)).workers.length, 0)
  const text = await new Promise<string>((resolve, reject) => {
    http
      .get(`http://127.0.0.1:${sidecar.metricsPort}/metrics`, (response) => {
        let body = ''
        response.on('data', (d: Buffer) => (body += d.toString()))
        response.on('end', () => resolve(body))
      })
      .on('error', reject)
  })
  t.regex(text, /^kvtransfer_sidecar_workers 0$/m)
  t.regex(text, /^kvtransfer_sidecar_attaches_total 0$/m)
})

test('close ends every connection', async (t) => {
  const sidecar = await start(t)
  const client = await Client.connect(t, sidecar.socket)
  t.truthy((await client.request(1, hello)).ok)
  await sidecar.close()
  await client.closed()
  t.true(client.ended)
})

test('warm re-attach settings are checked: the grace period and the slot, typed', async (t) => {
  const grace = await t.throwsAsync(Sidecar.start({ socket: socketPath(t), warmGraceMs: 3_600_000 }))
  t.is((grace as Error & { code?: string }).code, 'ERR_INVALID_ARGUMENT')
  t.regex(grace!.message, /warmGraceMs/)
  const sidecar = await start(t)
  const client = await Client.connect(t, sidecar.socket)
  t.truthy((await client.request(1, hello)).ok)
  for (const [id, slot] of [
    [2, ''],
    [3, 'x'.repeat(256)],
    [4, 7],
  ] as const) {
    const refused = await client.request(id, { op: 'attach', role: 'decode', blockNumber: 4, blockBytes: 64, slot })
    t.is(refused.error?.code, 'ERR_INVALID_ARGUMENT')
    t.regex(refused.error!.message, /slot/)
  }
  t.is(sidecar.workerCount, 0, 'nothing attached')
})
