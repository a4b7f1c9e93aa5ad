/**
 * A chaos prefill process: for every decode it keeps `slots` lanes, each writing seeded
 * blocks (pattern.ts) into its own slot of that decode's cache, one call at a time, and
 * reporting every settled call. A call that resolves OK is handed to the supervisor for
 * verification on the decode side; the lane reuses its slot only after that verdict, so
 * no other call of this process can touch the blocks being checked.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import { RDMACommunicator } from '../../lib/index.js'
import { fill } from './pattern.js'
import {
  type DecodeAddress,
  type Failure,
  type ToWorker,
  type WorkerConfig,
  localBase,
  now,
  prefillBlocks,
  random,
  remoteBase,
  tell,
  toFailure,
} from './protocol.js'

const config = JSON.parse(process.env.KVT_CHAOS_CONFIG ?? '{}') as WorkerConfig
const HOST = config.host
/** A call or connect not settled this long after its own timeout is a hang. */
const HANG_GRACE_MS = 5000
const BLOCKS = prefillBlocks(config)
const rand = random(config.seed)
const region = () => Buffer.alloc(BLOCKS * config.blockBytes)
const keys = Array.from({ length: config.layers }, region)
const values = Array.from({ length: config.layers }, region)

let table: DecodeAddress[] = []
let stopping = false
let seq = 0
let nextVerify = 1
const verifying = new Map<number, () => void>()
const connecting = new Map<number, Promise<boolean>>()

/** `k` distinct block ids from `base .. base + config.maxBlocks`, in random order. */
function pick(base: number, k: number): number[] {
  const ids = Array.from({ length: config.maxBlocks }, (_, i) => base + i)
  for (let i = ids.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1))
    ;[ids[i], ids[j]] = [ids[j]!, ids[i]!]
  }
  return ids.slice(0, k)
}

/** Calls `what` after the hang bound unless cancelled; a timer that does not keep the process alive. */
function hangWatch(what: 'writeCache' | 'connect', d: DecodeAddress, timeoutMs: number): () => void {
  const started = now()
  const timer = setTimeout(
    () => tell({ kind: 'hang', what, decode: d.index, decodeIncarnation: d.incarnation, waitedMs: now() - started }),
    timeoutMs + HANG_GRACE_MS,
  )
  timer.unref()
  return () => clearTimeout(timer)
}

function connected(comm: RDMACommunicator, d: DecodeAddress): Promise<boolean> {
  if (comm.isConnected(HOST, d.port)) return Promise.resolve(true)
  const key = d.index * 0x1_0000 + d.port
  let attempt = connecting.get(key)
  if (!attempt) {
    attempt = (async () => {
      const started = now()
      const done = hangWatch('connect', d, config.connectTimeoutMs)
      let failure: Failure | undefined
      try {
        await comm.connect(HOST, d.port, { timeoutMs: config.connectTimeoutMs })
      } catch (error) {
        failure = toFailure(error)
      }
      done()
      tell({ kind: 'connect', decode: d.index, decodeIncarnation: d.incarnation, ms: now() - started, failure })
      if (failure) await sleep(50 + rand() * 100)
      return !failure
    })().finally(() => connecting.delete(key))
    connecting.set(key, attempt)
  }
  return attempt
}

async function lane(comm: RDMACommunicator, decode: number, slot: number): Promise<void> {
  while (!stopping) {
    const d = table[decode]
    if (!d) {
      await sleep(20)
      continue
    }
    if (!(await connected(comm, d)) || stopping) continue
    const callSeq = ++seq
    const layer = Math.floor(rand() * config.layers)
    const k = 1 + Math.floor(rand() * config.maxBlocks)
    const local = pick(localBase(config, decode, slot), k)
    const remote = pick(remoteBase(config, config.index, slot), k)
    for (const [kind, list] of [keys, values].entries()) {
      const r = list[layer]!
      local.forEach((id, index) =>
        fill(r.subarray(id * config.blockBytes, (id + 1) * config.blockBytes), {
          writer: config.index,
          incarnation: config.incarnation,
          seq: callSeq,
          layer,
          kind,
          index,
        }),
      )
    }
    const tag = `p${config.index}.${config.incarnation}.${callSeq}`
    let signal: AbortSignal | undefined
    let abortTimer: NodeJS.Timeout | undefined
    if (rand() < config.abortRate) {
      const controller = new AbortController()
      signal = controller.signal
      abortTimer = setTimeout(() => controller.abort(), rand() * Math.min(50, config.timeoutMs))
    }
    const issuedAt = now()
    const done = hangWatch('writeCache', d, config.timeoutMs)
    let failure: Failure | undefined
    try {
      // --inject-lie: a call never made, reported as resolved OK (the verifier must catch it).
      if (!(rand() < config.lieRate))
        await comm.writeCache(HOST, d.port, local, remote, layer, { tag, timeoutMs: config.timeoutMs, signal })
    } catch (error) {
      failure = toFailure(error)
    }
    done()
    clearTimeout(abortTimer)
    const settledAt = now()
    tell({
      kind: 'call',
      decode,
      decodeIncarnation: d.incarnation,
      issuedAt,
      settledAt,
      failure,
      aborted: signal?.aborted ?? false,
    })
    if (failure) {
      await sleep(10 + rand() * 20)
      continue
    }
    const id = nextVerify++
    const verdict = new Promise<void>((resolve) => verifying.set(id, resolve))
    tell({
      kind: 'verify',
      id,
      writer: config.index,
      writerIncarnation: config.incarnation,
      seq: callSeq,
      tag,
      layer,
      remoteIds: remote,
      decode,
      decodeIncarnation: d.incarnation,
      issuedAt,
      settledAt,
    })
    await verdict
  }
}

async function main(): Promise<void> {
  let comm: RDMACommunicator
  try {
    comm = await RDMACommunicator.create({
      role: 'prefill',
      gpuIdx: 0,
      port: 0,
      host: config.host,
      localKeyCache: keys,
      localValueCache: values,
      blockNumber: BLOCKS,
      blockBytes: config.blockBytes,
      transport: config.transport,
      name: `chaos-p${config.index}.${config.incarnation}`,
    })
  } catch (error) {
    tell({ kind: 'startup-error', failure: toFailure(error) })
    process.exit(1)
  }
  const lanes: Promise<void>[] = []
  for (let decode = 0; decode < config.decodes; decode++)
    for (let slot = 0; slot < config.slots; slot++) lanes.push(lane(comm, decode, slot))
  let settled = 0
  for (const l of lanes) void l.finally(() => settled++)
  process.on('message', (message: ToWorker) => {
    if (message.kind === 'decodes') table = message.table
    else if (message.kind === 'verified') {
      verifying.get(message.id)?.()
      verifying.delete(message.id)
    } else if (message.kind === 'stop') {
      stopping = true
      // Lanes finish their call (bounded by its timeout) and its verification; a hung one is reported, not awaited.
      const bound = sleep(config.timeoutMs + HANG_GRACE_MS + 1000)
      void Promise.race([Promise.all(lanes), bound]).then(() => {
        tell({ kind: 'drained', pending: lanes.length - settled })
        void comm.close().finally(() => process.exit(0))
      })
    }
  })
  process.on('disconnect', () => process.exit(0))
  tell({ kind: 'up', port: comm.port })
}

void main()
