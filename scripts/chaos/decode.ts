/**
 * A chaos decode process: a decode communicator whose regions start zeroed; it answers
 * the supervisor's `verify` requests (a call some prefill saw resolve OK) by waiting for
 * the call's arrival notice and then checking every block the call named, K and V.
 */
import { RDMACommunicator } from '../../lib/index.js'
import { type BlockVerdict, verdict } from './pattern.js'
import {
  type BlockCounts,
  type ToWorker,
  type VerifyRequest,
  type WorkerConfig,
  decodeBlocks,
  tell,
  toFailure,
} from './protocol.js'

const config = JSON.parse(process.env.KVT_CHAOS_CONFIG ?? '{}') as WorkerConfig
const BLOCKS = decodeBlocks(config)
/** How long a verification waits for the call's arrival notice. */
const ARRIVAL_WAIT_MS = Number(process.env.KVT_CHAOS_ARRIVAL_WAIT_MS || 5000)
const region = () => Buffer.alloc(BLOCKS * config.blockBytes)
const keys = Array.from({ length: config.layers }, region)
const values = Array.from({ length: config.layers }, region)

async function verify(comm: RDMACommunicator, request: VerifyRequest): Promise<void> {
  let arrived = true
  try {
    await comm.waitForArrival(request.tag, { layers: [request.layer], timeoutMs: ARRIVAL_WAIT_MS })
  } catch {
    arrived = false
  }
  comm.forgetArrivals(request.tag)
  const blocks: BlockCounts = { ok: 0, missing: 0, stale: 0, torn: 0, foreign: 0 }
  const bad: string[] = []
  for (const [kind, list] of [keys, values].entries()) {
    const r = list[request.layer]!
    request.remoteIds.forEach((id, index) => {
      const block = r.subarray(id * config.blockBytes, (id + 1) * config.blockBytes)
      const v: BlockVerdict = verdict(block, {
        writer: request.writer,
        incarnation: request.writerIncarnation,
        seq: request.seq,
        layer: request.layer,
        kind,
        index,
      })
      blocks[v]++
      if (v !== 'ok' && bad.length < 4) bad.push(`${kind ? 'V' : 'K'}[${request.layer}] block ${id}: ${v}`)
    })
  }
  tell({ kind: 'verdict', id: request.id, blocks, arrived, detail: bad.length ? bad.join(', ') : undefined })
}

async function main(): Promise<void> {
  let comm: RDMACommunicator
  try {
    comm = await RDMACommunicator.create({
      role: 'decode',
      gpuIdx: 0,
      port: 0,
      host: config.host,
      localKeyCache: keys,
      localValueCache: values,
      blockNumber: BLOCKS,
      blockBytes: config.blockBytes,
      transport: config.transport,
      name: `chaos-d${config.index}.${config.incarnation}`,
    })
  } catch (error) {
    tell({ kind: 'startup-error', failure: toFailure(error) })
    process.exit(1)
  }
  process.on('message', (message: ToWorker) => {
    if (message.kind === 'verify') void verify(comm, message)
    else if (message.kind === 'stop') void comm.close().finally(() => process.exit(0))
  })
  process.on('disconnect', () => process.exit(0))
  tell({ kind: 'up', port: comm.port })
}

void main()
