/**
 * The bench agent (decode side): owns the decode communicator and answers the driver's
 * requests (setup, verify, reference stream, perftest server).
 */
import * as net from 'node:net'
import * as os from 'node:os'
import { RDMACommunicator } from '../index'
import { Channel, type Json } from './channel'
import { type BenchTransport, digest, errorText, findOnPath, listen, machineInfo } from './common'
import { allocRegions, hostBuffers, type Region } from './regions'
import { type PerftestServer, type PerftestSettings, startPerftestServer, stopPerftestServer } from './perftest'
import { shardOf } from './shards'

interface AgentState {
  layers: number
  blocks: number
  /** The GPU of the decode regions (`--dst-gpu`); host memory when absent. */
  gpu?: number
  keys: Region[]
  values: Region[]
  comm?: RDMACommunicator
  blockBytes: number
  /** The shard one block receives: `piece` bytes at the start of each of `rows` rows. */
  rows: number
  piece: number
  perftest?: PerftestServer
}

async function handleAgentRequest(state: AgentState, message: Json, channel: Channel): Promise<Json> {
  switch (message.op) {
    case 'init': {
      state.layers = Number(message.layers)
      state.blocks = Number(message.blocks)
      const bytes = state.blocks * Number(message.maxBlockBytes)
      // Touched now (fill), so that neither the reference stream nor the first size pays
      // first-touch page faults that a resident KV cache would not have.
      state.gpu = message.gpu === undefined || message.gpu === null ? undefined : Number(message.gpu)
      for (const region of [...(state.keys ?? []), ...(state.values ?? [])]) region.free()
      state.keys = allocRegions(state.layers, bytes, state.gpu, false)
      state.values = allocRegions(state.layers, bytes, state.gpu, false)
      return { ok: true, host: os.hostname(), machine: machineInfo() }
    }
    case 'setup': {
      await state.comm?.close()
      state.comm = undefined
      const blockBytes = Number(message.blockBytes)
      const used = state.blocks * blockBytes
      // Zero the part in use so that stale bytes from an earlier size cannot pass verification.
      for (const region of [...state.keys, ...state.values]) region.zero(used)
      const scaleBlockBytes = Number(message.scaleBlockBytes ?? 0)
      const scaleRegions = () =>
        scaleBlockBytes > 0 ? state.keys.map(() => Buffer.alloc(state.blocks * scaleBlockBytes)) : []
      const comm = new RDMACommunicator({
        role: 'decode',
        gpuIdx: state.gpu ?? 0,
        port: 0,
        localKeyCache: state.keys.map((r) => r.cache(used)),
        localValueCache: state.values.map((r) => r.cache(used)),
        keyScaleCache: scaleRegions(),
        valueScaleCache: scaleRegions(),
        scaleBlockBytes,
        blockNumber: state.blocks,
        blockBytes,
        transport: message.transport as BenchTransport,
        ...((message.tp ?? {}) as object),
      })
      await comm.ready
      state.comm = comm
      state.blockBytes = blockBytes
      state.rows = Number(message.rows ?? 1)
      state.piece = Number(message.piece ?? blockBytes)
      return { ok: true, port: comm.port, transport: comm.transport }
    }
    case 'verify': {
      const samples = message.samples as Array<[number, number, number, string]>
      const mismatches: string[] = []
      let bad = 0
      for (const [layer, kind, remote, expected] of samples) {
        const region = (kind === 0 ? state.keys : state.values)[layer]
        const got = digest(shardOf(region, remote, state.blockBytes, state.rows, state.piece))
        if (got !== expected) {
          bad++
          if (mismatches.length < 5) mismatches.push(`layer ${layer} ${kind === 0 ? 'K' : 'V'} block ${remote}`)
        }
      }
      return { ok: true, checked: samples.length, mismatches: bad, detail: mismatches }
    }
    case 'stream': {
      // The reference: a plain TCP stream from the driver into this process, counted and
      // discarded. This side connects (so that it can read with a 4 MiB `onread` buffer,
      // one syscall per up to 4 MiB like iperf, instead of net's default 64 KiB chunks).
      const host = String(message.host ?? channel.socket.remoteAddress ?? '127.0.0.1')
      let bytes = 0
      let first = 0n
      // walk: read into successive 4 MiB slices of the decode regions (the transfer's
      // memory footprint: cold destination pages); else into one hot 4 MiB buffer.
      const chunk = 4 * 2 ** 20
      const hot = Buffer.allocUnsafe(chunk)
      const slices = message.walk
        ? hostBuffers([...state.keys, ...state.values]).flatMap((r) =>
            Array.from({ length: Math.floor(r.length / chunk) }, (_, i) => r.subarray(i * chunk, (i + 1) * chunk)),
          )
        : []
      let next = 0
      const socket = net.connect({
        host,
        port: Number(message.port),
        onread: {
          buffer: slices.length > 0 ? () => slices[next++ % slices.length] : hot,
          callback: (n: number) => {
            if (bytes === 0) first = process.hrtime.bigint()
            bytes += n
            return true
          },
        },
      })
      socket.on('error', () => undefined)
      socket.on('end', () => {
        const seconds = Number(process.hrtime.bigint() - first) / 1e9
        channel.send({ op: 'stream-done', bytes, seconds })
        socket.end()
      })
      return { ok: true }
    }
    case 'perftest-server': {
      const binary = findOnPath('ib_write_bw')
      if (!binary) return { ok: false, skipped: 'ib_write_bw is not installed on the decode host' }
      // The previous size's server must be gone (it could still hold its port or its QP).
      await stopPerftestServer(state.perftest)
      state.perftest = await startPerftestServer(binary, message.settings as PerftestSettings)
      if (state.perftest.child.exitCode !== null) {
        const output = state.perftest.output().trim().split('\n').slice(-2).join(' | ')
        return { ok: false, skipped: `ib_write_bw server exited (${state.perftest.child.exitCode}): ${output}` }
      }
      return { ok: true }
    }
    case 'perftest-stop': {
      const output = await stopPerftestServer(state.perftest)
      state.perftest = undefined
      return { ok: true, output: output.slice(-4000) }
    }
    case 'close': {
      await state.comm?.close()
      state.comm = undefined
      return { ok: true }
    }
    default:
      return { error: `unknown request ${JSON.stringify(message.op)}` }
  }
}

async function serveDriver(socket: net.Socket): Promise<void> {
  const channel = new Channel(socket)
  const state: AgentState = { layers: 0, blocks: 0, keys: [], values: [], blockBytes: 0, rows: 1, piece: 0 }
  try {
    for (;;) {
      const message = await channel.next()
      let reply: Json
      try {
        reply = await handleAgentRequest(state, message, channel)
      } catch (error) {
        reply = { error: errorText(error) }
      }
      channel.send(reply)
      if (message.op === 'close') break
    }
  } catch {
    // The driver went away.
  } finally {
    await state.comm?.close().catch(() => undefined)
    state.perftest?.child.kill()
    socket.end()
  }
}

/**
 * Runs the decode agent on `port` (0: any). With `ipc` (forked by a local driver) it
 * reports the port over IPC and exits after one driver; otherwise it serves drivers one
 * after the other until killed.
 */
export async function runAgent(port: number, ipc: boolean): Promise<void> {
  const server = net.createServer()
  const bound = await listen(server, port, ipc ? '127.0.0.1' : undefined)
  if (ipc) {
    process.send?.({ port: bound })
    const socket = await new Promise<net.Socket>((resolve) => server.once('connection', resolve))
    server.close()
    await serveDriver(socket)
    process.disconnect?.()
    return
  }
  console.error(
    `kvtransfer bench agent: listening on port ${bound}; run 'kvtransfer bench --connect <this-host>:${bound}' on the prefill host`,
  )
  let busy = Promise.resolve()
  server.on('connection', (socket) => {
    console.error(`kvtransfer bench agent: driver ${socket.remoteAddress}:${socket.remotePort} connected`)
    busy = busy.then(() => serveDriver(socket))
  })
  await new Promise<void>(() => undefined)
}
