/**
 * Scale test: one decode communicator (this process) takes links from many prefill
 * communicators in child processes (by default 8 processes × 32 communicators = 256
 * links). Every prefill communicator writes its own blocks with its own bytes; every call
 * must resolve, and every written block of the decode is compared byte for byte at the end.
 *
 *   node --import @oxc-node/core/register scripts/scale.ts [--procs N] [--comms N]
 *        [--calls N] [--max-threads N] [--max-fds-per-link N] [--max-connect-ms N]
 *   (defaults: 8 processes, 32 communicators each, 8 calls per communicator; no bounds
 *   asserted unless given; transport from KVTRANSFER_TEST_TRANSPORT, default tcp)
 *
 * Reports the decode process's threads, file descriptors and RSS before and after the
 * links were opened (and per link), and the time from "connect" to the last link up, as
 * one line `scale: {...}`. Exits 1 when a call failed, a block differs, or a bound given
 * on the command line was exceeded.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { RDMACommunicator } from '../lib/index.js'
import type { Transport } from '../lib/index.js'

const args = process.argv.slice(2)
const arg = (name: string, fallback: number): number => {
  const i = args.indexOf(`--${name}`)
  return i >= 0 ? Number(args[i + 1]) : fallback
}
const PROCS = arg('procs', 8)
const COMMS = arg('comms', 32)
const CALLS = arg('calls', 8)
const TRANSPORT = (process.env.KVTRANSFER_TEST_TRANSPORT || 'tcp') as Transport
const HOST = process.env.KVTRANSFER_TEST_HOST || '127.0.0.1'
const BLOCK_BYTES = 1024

/** The byte at `offset` of the block that communicator `link` writes in call `call`. */
function byteOf(link: number, call: number, offset: number): number {
  return (link * 131 + call * 17 + offset * 7 + 1) & 0xff
}

function fillBlock(region: Buffer, block: number, link: number, call: number): void {
  for (let o = 0; o < BLOCK_BYTES; o++) region[block * BLOCK_BYTES + o] = byteOf(link, call, o)
}

function sample() {
  const status = readFileSync('/proc/self/status', 'utf8')
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0)
  return { rssKiB: kb('VmRSS'), fds: readdirSync('/proc/self/fd').length, threads: kb('Threads') }
}

function send(message: object): void {
  process.stdout.write(`${JSON.stringify(message)}\n`)
}

/** Child: COMMS prefill communicators; connects on "connect", writes on "write". */
async function prefillProcess(index: number, port: number): Promise<void> {
  const comms = await Promise.all(
    Array.from({ length: COMMS }, async (_, c) => {
      const link = index * COMMS + c
      const keys = Buffer.alloc(CALLS * BLOCK_BYTES)
      const values = Buffer.alloc(CALLS * BLOCK_BYTES)
      for (let call = 0; call < CALLS; call++) {
        fillBlock(keys, call, link, call)
        fillBlock(values, call, link, call + 1000)
      }
      const comm = new RDMACommunicator({
        role: 'prefill',
        gpuIdx: 0,
        port: 0,
        localKeyCache: [keys],
        localValueCache: [values],
        blockNumber: CALLS,
        blockBytes: BLOCK_BYTES,
        transport: TRANSPORT,
        name: `scale-${link}`,
      })
      await comm.ready
      return { comm, link }
    }),
  )
  send({ ready: index })
  const before = sample()
  for await (const line of createInterface({ input: process.stdin })) {
    if (line === 'connect') {
      const started = Date.now()
      await Promise.all(comms.map(({ comm }) => comm.connect(HOST, port, { timeoutMs: 60_000 })))
      const ms = Date.now() - started
      const after = sample()
      send({
        connected: index,
        ms,
        threads: (after.threads - before.threads) / COMMS,
        fds: (after.fds - before.fds) / COMMS,
        rssKiB: (after.rssKiB - before.rssKiB) / COMMS,
      })
    } else if (line === 'write') {
      let failed = 0
      await Promise.all(
        comms.map(async ({ comm, link }) => {
          for (let call = 0; call < CALLS; call++) {
            try {
              await comm.writeCache(HOST, port, [call], [link * CALLS + call], 0, { timeoutMs: 30_000 })
            } catch (error) {
              failed++
              console.error(`scale: link ${link} call ${call}: ${String(error)}`)
            }
          }
        }),
      )
      send({ written: index, failed })
    } else if (line === 'close') {
      await Promise.all(comms.map(({ comm }) => comm.close()))
      process.exit(0)
    }
  }
}

interface Child {
  process: ChildProcess
  next: (key: string) => Promise<Record<string, number>>
}

function startChild(index: number, port: number): Child {
  const child = spawn(
    process.execPath,
    [...process.execArgv, process.argv[1], ...args, '--prefill', String(index), '--port', String(port)],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  )
  const waiting = new Map<string, (message: Record<string, number>) => void>()
  const early = new Map<string, Record<string, number>>()
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const message = JSON.parse(line) as Record<string, number>
    for (const key of Object.keys(message)) {
      const resolve = waiting.get(key)
      if (resolve) {
        waiting.delete(key)
        resolve(message)
      } else early.set(key, message)
    }
  })
  const next = (key: string) =>
    new Promise<Record<string, number>>((resolve, reject) => {
      const got = early.get(key)
      if (got) {
        early.delete(key)
        return resolve(got)
      }
      waiting.set(key, resolve)
      child.once('exit', (code) => reject(new Error(`prefill process ${index} exited (${code}) before '${key}'`)))
    })
  return { process: child, next }
}

async function decodeProcess(): Promise<void> {
  const links = PROCS * COMMS
  const keys = Buffer.alloc(links * CALLS * BLOCK_BYTES)
  const values = Buffer.alloc(links * CALLS * BLOCK_BYTES)
  const beforeComm = sample()
  const decode = new RDMACommunicator({
    role: 'decode',
    gpuIdx: 0,
    port: 0,
    localKeyCache: [keys],
    localValueCache: [values],
    blockNumber: links * CALLS,
    blockBytes: BLOCK_BYTES,
    transport: TRANSPORT,
    name: 'scale-decode',
  })
  await decode.ready
  const children = Array.from({ length: PROCS }, (_, i) => startChild(i, decode.port))
  await Promise.all(children.map((c) => c.next('ready')))
  const before = sample()
  const started = Date.now()
  children.forEach((c) => c.process.stdin!.write('connect\n'))
  const connected = await Promise.all(children.map((c) => c.next('connected')))
  const connectMs = Date.now() - started
  const after = sample()
  children.forEach((c) => c.process.stdin!.write('write\n'))
  const written = await Promise.all(children.map((c) => c.next('written')))
  const afterWrites = sample()
  const failedCalls = written.reduce((sum, w) => sum + w.failed, 0)
  let wrongBlocks = 0
  for (let link = 0; link < links; link++) {
    for (let call = 0; call < CALLS; call++) {
      const block = link * CALLS + call
      for (const [region, salt] of [
        [keys, 0],
        [values, 1000],
      ] as const) {
        for (let o = 0; o < BLOCK_BYTES; o++) {
          if (region[block * BLOCK_BYTES + o] !== byteOf(link, call + salt, o)) {
            wrongBlocks++
            break
          }
        }
      }
    }
  }
  const receivers = decode.stats().receivers
  children.forEach((c) => c.process.stdin!.write('close\n'))
  await Promise.all(children.map((c) => new Promise((resolve) => c.process.once('exit', resolve))))
  await decode.close()
  const perLink = (a: number, b: number) => Math.round(((a - b) / links) * 100) / 100
  const report = {
    transport: TRANSPORT,
    links,
    procs: PROCS,
    comms: COMMS,
    calls: links * CALLS,
    failedCalls,
    wrongBlocks,
    receivers,
    connectMs,
    slowestProcessConnectMs: Math.max(...connected.map((c) => c.ms)),
    decode: {
      beforeCommunicator: beforeComm,
      beforeLinks: before,
      afterLinks: after,
      afterWrites,
      communicatorThreads: after.threads - beforeComm.threads,
      perLink: {
        threads: perLink(after.threads, before.threads),
        fds: perLink(after.fds, before.fds),
        rssKiB: perLink(after.rssKiB, before.rssKiB),
        rssKiBAfterWrites: perLink(afterWrites.rssKiB, before.rssKiB),
      },
    },
    prefillPerLink: {
      threads: Math.max(...connected.map((c) => c.threads)),
      fds: Math.max(...connected.map((c) => c.fds)),
      rssKiB: Math.round(Math.max(...connected.map((c) => c.rssKiB)) * 100) / 100,
    },
  }
  console.log(`scale: ${JSON.stringify(report)}`)
  const problems: string[] = []
  if (failedCalls > 0) problems.push(`${failedCalls} calls failed`)
  if (wrongBlocks > 0) problems.push(`${wrongBlocks} blocks differ`)
  if (receivers !== links) problems.push(`${receivers} receiving connections for ${links} links`)
  const maxThreads = arg('max-threads', Infinity)
  if (report.decode.communicatorThreads > maxThreads)
    problems.push(`the decode communicator runs ${report.decode.communicatorThreads} threads (at most ${maxThreads})`)
  const maxFds = arg('max-fds-per-link', Infinity)
  if (report.decode.perLink.fds > maxFds)
    problems.push(`${report.decode.perLink.fds} file descriptors per link (at most ${maxFds})`)
  const maxConnect = arg('max-connect-ms', Infinity)
  if (connectMs > maxConnect) problems.push(`connecting every link took ${connectMs} ms (at most ${maxConnect})`)
  if (problems.length > 0) {
    console.error(`scale FAILED: ${problems.join('; ')}`)
    process.exit(1)
  }
}

const prefillIndex = args.indexOf('--prefill')
const run = prefillIndex >= 0 ? prefillProcess(Number(args[prefillIndex + 1]), arg('port', 0)) : decodeProcess()
run.catch((error: unknown) => {
  console.error(error)
  process.exit(1)
})
